#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

#include "model/model_spec.h"
#include "probe/probe_result.h"
#include "runtime/model.h"
#include "runtime/weights.h"

namespace pq::probe {

// A probe of the quantized model rather than the source: the Linears run with these weights and
// activation quantization, so the statistics describe the activations an assignment produces
// (scout's perturbed fixed point, docs/scout.md). Neither pointer is owned.
struct QuantizedRun {
  const runtime::WeightTransform* weights = nullptr;
  const runtime::ActivationQuantizer* activations = nullptr;
  // Identifies the weights and activations (assignment and rounding) in the probe's fingerprint.
  std::string tag;
};

// What `prismaquant probe` was asked to do.
struct ProbeJob {
  std::filesystem::path
      model;                   // HF checkpoint directory (config.json, safetensors, tokenizer.json)
  std::filesystem::path data;  // calibration text (plain text or JSONL, src/data) or token ids
  bool token_ids = false;      // `data` holds whitespace-separated token ids, not text
  std::filesystem::path out;   // WORK/probe; created when missing
  std::size_t nsamples = 32;
  std::size_t seqlen = 1024;
  std::uint64_t seed = 42;
  bool importance_weighting = true;
  // Sequences per micro-batch: the probe is one layer-major pass over all nsamples sequences,
  // which go through each layer batch_size at a time.
  std::size_t batch_size = 4;
  model::SpecOptions spec_options;
  // What the forward and backward GEMMs and the per-sequence weight gradients multiply
  // (runtime::ComputeType); norms, softmax, attention, the Hessians and every sum stay fp32.
  // bf16 by default: on the 1.7B shape it took 449 CPU-s where f32 took 783 (docs/scaling.md),
  // and on qwen3-dense-tiny it moved no Fisher trace by more than 0.75% and chose the same
  // assignment at 4.75 bits (docs/probe-artifacts.md).
  runtime::ComputeType compute = runtime::ComputeType::kBF16;
  // Peak memory the run may use, in bytes (0: 80% of the memory available when it starts); the
  // probe refuses to start, with its estimate, when it cannot fit.
  std::int64_t max_memory = 0;
  // Run at most this many steps (a layer's forward, the head, a layer's backward) and keep the
  // pass for a later run (time-sliced runs on shared machines); unset: run to completion.
  std::optional<std::size_t> stop_after_steps;
  // Unset: probe the source model.
  std::optional<QuantizedRun> quantized;
  // Also record every attention layer's key/value amax (after the k norm and RoPE, what the KV
  // cache holds), from which export sets the FP8 KV cache scales (`--kv-cache fp8`). Off: the
  // artifacts and the fingerprint are those of a probe without it.
  bool kv_cache = false;
  // Also sum, per distinct input, the Hessian of the last holdout_sequences(nsamples) calibration
  // sequences alone (probe.<part>.safetensors "holdout_hessian.<key>"). GPTQ rounding then fits
  // its renders without those rows and chooses among them by the output error on them
  // (exporter::GptqRounding). Off: the artifacts and the fingerprint are those of a probe without
  // it.
  bool holdout_hessian = false;
  // Off: no backward pass and no Fisher traces (probe.json says "fisher": false and lists none);
  // the Hessians, activation statistics, routing and KV cache come from the forward pass alone,
  // the same sums the backward's recomputation gives. That is all the kl-fisher cost and export
  // read, at about a quarter of the probe's arithmetic, with one layer boundary on disk at a
  // time instead of all of them. On: the artifacts and the fingerprint are those of a probe
  // before the option existed.
  bool fisher = true;
  // Off: no Hessian X^T X is stored, only each input's second moments (probe.json says
  // "hessians": false). A model's Hessians take in^2 x 4 bytes per input on disk, which for a
  // MoE is more than the model (121 GB for Qwen3-30B-A3B's experts); the kl-fisher cost, which
  // renders every (Linear, format) a layer at a time, accumulates a layer's Hessians in its own
  // forward over this calibration sample and drops them when the layer is rendered. The fisher
  // and activation-fisher costs and a GPTQ export without those renders need them. On: the
  // artifacts and the fingerprint are those of a probe before the option existed.
  bool hessians = true;
};

struct ProbeOutcome {
  bool complete = false;         // probe.json and its parts' files are written
  bool reused = false;           // they already existed for the same fingerprint
  std::size_t resumed_from = 0;  // steps found finished in the pass directory
  std::size_t steps_done = 0;
  std::size_t steps_total = 0;  // 2 x layers + 1; layers + 1 without the Fisher traces
  std::string fingerprint;
};

// Digest of everything the probe's result depends on: the checkpoint (config.json and the
// safetensors headers), tokenizer.json (for text data), the calibration file's content and every
// option.
std::string probe_fingerprint(const ProbeJob& job);

// How many of `nsamples` calibration sequences a probe with ProbeJob::holdout_hessian holds out:
// one in eight, at least one, none of fewer than two. The calibration windows are drawn at random
// (data::TokenDataset::calibration), so the last ones are as good a sample as any.
std::int64_t holdout_sequences(std::size_t nsamples);

// Runs the probe (docs/probe-artifacts.md): one layer-major pass over every calibration sequence,
// each layer read once forward and once backward, with the layer-boundary activations in
// out/pass/ on disk, so memory holds about one layer whatever the model size. Resumable: every
// finished step is recorded in out/pass/state.json with the fingerprint; a later run with the
// same fingerprint continues from there, and the final artifacts equal those of an uninterrupted
// run. With complete artifacts of the same fingerprint already in `out`, nothing is recomputed.
ProbeOutcome run_probe(const ProbeJob& job);

// A layer-major pass writes every layer's boundary activations before it frees any: pq::Error,
// before the pass starts, with the figures (require_disk_space), when the disk cannot hold
// `needed` bytes, counting what a resumed pass already wrote in pass_dir as its own. `what` says
// what the bytes are for.
void require_pass_disk(const std::filesystem::path& pass_dir, std::string_view what,
                       std::int64_t needed);

// The model identifier stages copy into their artifacts: the checkpoint directory's name.
std::string model_label(const std::filesystem::path& model_dir);

}  // namespace pq::probe
