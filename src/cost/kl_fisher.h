#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "formats/weight_format.h"
#include "model/model_spec.h"
#include "probe/probe_accumulator.h"
#include "probe/probe_stage.h"
#include "runtime/model.h"

namespace pq::cost {

// What one (Linear, format) changes in the Linear's output: the weight error dW = W_q - W of the
// weights as export writes them and, for a format whose activations vLLM quantizes, that
// quantizer with the source weight W, so the output error is Q(X) W_q^T - X W^T (issue 15: the
// activation term dX W^T + dX dW^T beside X dW^T).
struct Perturbation {
  std::vector<float> delta;  // [out, in]
  std::shared_ptr<const formats::ActivationQuantizer> activations;
  std::vector<float> weight;  // [out, in], only with `activations`
};

// The perturbations of some candidate Linears (spec indices), each Linear's list one entry per
// format slot of the cost table (empty where the slot does not apply).
using PerturbationsOf =
    std::function<std::map<std::size_t, std::vector<std::optional<Perturbation>>>(
        std::span<const std::size_t> linears)>;

// Called once for each part of the pass (a decoder layer, -1 the head, the layer count the MTP
// head) with its candidate Linears (spec indices), after the part's forward and before any
// backward asks for their perturbations: where the cost stage renders the part's (Linear, format)
// pairs and measures their error columns. `statistics` holds the part's input Hessians over the
// calibration rows when the pass accumulates them (KlFisherJob::hessians), else null. What it
// returns is stored with the part's step (a resumed pass does not call it again for finished
// steps) and handed back in KlFisherResult::prepared.
using PreparePart =
    std::function<nlohmann::json(std::int64_t part, std::span<const std::size_t> linears,
                                 const probe::ProbeAccumulator* statistics)>;

// Two ways to form one probe's a_s = sum_{t in s} dy_t . e_t for every sequence s of a Linear
// (e_t its output error under a format): the same sums, by different arithmetic.
enum class FoldForm {
  // Per call, the cheaper for its shape (fold_by_weight_gradient).
  kAuto,
  // a_s = <G_s, dW> (+ <dY_s^T dX_s, W_q>) with G_s = dY_s^T X_s: one GEMM per sequence shared by
  // every format, but an [out, in] product per sequence; for long runs of rows per sequence.
  kWeightGradient,
  // E = X dW^T (+ dX W_q^T) over all rows at once per format, then a_s = sum of dy_t . e_t over
  // s's rows: no [out, in] product per sequence; for few rows per sequence (a MoE expert sees
  // about seqlen x top_k / experts of them).
  kOutputError,
};

// Whether the weight-gradient form is the cheaper for a Linear that sees `rows_per_sequence`
// rows of each sequence, with `weight_slots` weight-only and `activation_slots`
// activation-quantized formats to fold: per sequence it makes 1 + activation_slots GEMMs of
// 2 rows out in FLOPs and writes and reads as many [out, in] products (a byte of memory traffic
// costs about as much as 17 FLOPs here: 30 GB/s against about 500 GFLOP/s), where the
// output-error form makes weight_slots + 2 activation_slots GEMMs of the same size and no
// product.
bool fold_by_weight_gradient(double rows_per_sequence, std::size_t weight_slots,
                             std::size_t activation_slots);

// What the KL-Fisher pass runs over.
struct KlFisherJob {
  std::filesystem::path model;
  std::filesystem::path data;
  bool token_ids = false;
  std::size_t nsamples = 32;
  std::size_t seqlen = 1024;
  std::uint64_t seed = 42;  // the calibration sample (the probe's, by default)
  // K. One by default: on both Qwen3 tiny models (32 x 1024 calibration tokens) one probe shipped
  // the same or a lower held-out KL than four, in a quarter to a half of the time
  // (docs/probe-artifacts.md, "How many probes").
  std::size_t probes = 1;
  std::uint64_t probe_seed = 1;
  std::size_t batch_size = 4;
  runtime::ComputeType compute = runtime::ComputeType::kBF16;
  std::int64_t max_memory = 0;
  model::SpecOptions spec_options;
  // Layer-boundary activations and finished steps, removed when the pass completes; a rerun with
  // the same fingerprint resumes after the last finished step.
  std::filesystem::path pass_dir;
  // Identifies the perturbations (the renders' fingerprint and the format menu).
  std::string perturbations_tag;
  std::size_t slots = 0;  // formats in the menu
  // Accumulate each part's input Hessians in its forward for PreparePart: the probe stored none
  // (probe::ProbeJob::hessians), so memory holds one part's instead of the disk all of them.
  bool hessians = false;
  // Bytes the caller adds on the pass directory's filesystem during the pass (the renders it
  // makes into the work directory): the pass's disk check counts them beside its boundaries.
  std::int64_t other_disk = 0;
  // Run at most this many steps and keep the pass for a later run; unset: run to completion.
  std::optional<std::size_t> stop_after_steps;
  // How each Linear's sums are formed; not in the fingerprint: every form gives the same sums,
  // to rounding (tests pin a form to compare them).
  FoldForm fold = FoldForm::kAuto;
};

// The pass over `probe`'s calibration sample (data, sequences, seed, micro-batches, compute and
// memory limit): what a cost needs whose probe stored no Hessians, since its renders stand for
// the probe's.
KlFisherJob kl_fisher_job_on(const probe::ProbeJob& probe);

// Digest of everything the pass's result depends on (checkpoint, calibration, probes, options,
// perturbations_tag).
std::string kl_fisher_fingerprint(const KlFisherJob& job);

// Per candidate Linear and format slot, the K probes' sums (1/2) sum_s <g_{k,s}, dW>^2 divided
// by the number of predictions, each an unbiased estimate of the second-order change in the mean
// KL(teacher || student) per prediction when that Linear alone is perturbed.
struct KlFisherResult {
  bool complete = false;  // false: stopped after KlFisherJob::stop_after_steps, nothing below
  std::int64_t predictions = 0;
  // The MTP head's predictions (row t of a sequence predicts token t + 2: length - 2 per
  // sequence), by which its Linears' sums are divided; 0 without an MTP candidate.
  std::int64_t mtp_predictions = 0;
  std::size_t probes = 0;
  std::map<std::string, std::vector<std::vector<double>>> per_probe;  // name -> slot -> [K]
  std::map<std::int64_t, nlohmann::json> prepared;  // part -> what PreparePart returned

  // The mean over the probes (the estimate); nullopt where the slot did not apply.
  std::optional<double> estimate(const std::string& linear, std::size_t slot) const;
  // Its standard error, sd(probe values) / sqrt(K) (0 with one probe).
  double standard_error(const std::string& linear, std::size_t slot) const;
};

// The Fisher of the KL of the model's next-token distributions against themselves, probed (issue
// 15): with p the model's softmax at a prediction, F_z = diag(p) - p p^T = L L^T with
// L = diag(sqrt p) - p sqrt(p)^T; for each probe k and prediction t a Rademacher vector r_{k,t}
// gives the logit gradient L r_{k,t}, so the weight gradient g_k of a sequence satisfies
// E[g_k g_k^T] = J^T F_z J and E[<g_k, dW>^2] = dW^T F dW. Each probe's backward pass is folded,
// layer by layer while the layer is resident, against every perturbation of its Linears:
// <g_{k,s}, dW> = sum_{t in s} dy_{k,t} . (dW x_t), so nothing of size K x parameters is kept.
// Layer-major and resumable like the probe (forward, head, backward per layer, boundaries on disk
// in job.pass_dir). A multi-token-prediction head's Linears affect only the MTP head's own
// distribution (token t + 2), so they take the Fisher of its KL instead, probed the same way at
// the head step through Model::mtp_backward_logits; its gradient stops at the head's inputs, as
// the probe's MTP loss does (probe_stage.h), so the body's Linears keep the next-token KL's.
KlFisherResult run_kl_fisher(const KlFisherJob& job, const PreparePart& prepare,
                             const PerturbationsOf& perturbations);

}  // namespace pq::cost
