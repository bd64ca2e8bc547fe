#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "alloc/cost_table.h"
#include "cost/kl_fisher.h"
#include "formats/serving.h"
#include "formats/weight_format.h"
#include "model/model_spec.h"

namespace pq::cost {

// Which surrogate becomes cost.json's predicted_dloss (both are computed; docs/probe-artifacts.md).
enum class Objective {
  // dL = 1/2 * FisherTrace * mean(dW^2): the additive surrogate (method-facts.md §3, the
  // allocator's default cost upstream), with our per-sequence Fisher trace.
  kFisher,
  // dL = 1/2 * FisherTrace * sum_ij dW_ij^2 E[x_j^2] / (out * sum_j E[x_j^2]): the trace spread
  // over input channels in proportion to their activation energy, evenly over output rows.
  kActivationFisher,
  // dL = the KL-Fisher estimate of the mean KL(source || quantized) per prediction when the Linear
  // alone takes the format, from K random probes of the logit Fisher folded against the weights
  // as export writes them (kl_fisher.h; needs CostJob::renders and CostJob::kl_fisher).
  kKlFisher,
};

Objective objective_by_name(std::string_view name);
std::string_view objective_name(Objective objective);

// Error columns of one (Linear, format) pair, dW = fake_quantize(W) - W.
struct QuantizationErrors {
  double weight_mse = 0.0;        // mean(dW^2)
  double act_weighted_mse = 0.0;  // sum_ij dW_ij^2 E[x_j^2] / out: diagonal-H output error
  double output_mse = 0.0;        // tr(dW H dW^T) / (tokens * out), H = sum over tokens x x^T
  double dloss_fisher = 0.0;
  double dloss_activation = 0.0;
};

// What the probe measured about one Linear's sensitivity and input.
struct LinearStatistics {
  double fisher_trace = 0.0;
  std::span<const float> act_second_moment;  // [in]
  std::span<const float> hessian;            // [in, in], summed over `tokens`
  std::int64_t tokens = 0;
};

// The bytes of the renders a cost with renders keeps (WORK/render): every candidate Linear in every
// format of `formats` it is offered that has a group layout (the others copy or cast the source
// and are not kept). About 1.6 bytes a parameter for the default menu (NVFP4 and FP8 both
// render).
std::uint64_t render_bytes(const model::ModelSpec& spec, const std::vector<std::string>& formats,
                           formats::ServingTarget serve_on);

// The error columns for weight `w` and its fake-quantized `quantized` ([out, in] row-major).
QuantizationErrors measure_errors(std::span<const float> w, std::span<const float> quantized,
                                  formats::Shape2D shape, const LinearStatistics& stats);

// The weights export writes, for the cost stage to measure instead of round-to-nearest: the
// decoded weight of one (Linear, format) and the activation quantizer vLLM runs for it there
// (null: weight-only). Implemented over the exporter's encoder (exporter::EncoderRenders).
struct RenderedLinear {
  std::vector<float> weight;  // [out, in]
  std::shared_ptr<const formats::ActivationQuantizer> activations;
};
class RenderSource {
 public:
  virtual ~RenderSource() = default;
  // Identifies the renders (rounding, its statistics, the serving target): part of cost.json's
  // fingerprint.
  virtual std::string fingerprint() const = 0;
  // spec.linears[index] stored in `format`, fitted to `statistics` when given (the KL-Fisher
  // pass's, for a probe that stored no Hessians) instead of the probe's. Not called concurrently.
  virtual RenderedLinear render(std::size_t index, const formats::WeightFormat& format,
                                const LinearStatistics* statistics) const = 0;
  // The bytes of the renders kept on disk so far (WORK/render), or nullopt when renders are not
  // kept: with render_bytes, what the renders still to make will add.
  virtual std::optional<std::uint64_t> stored_bytes() const = 0;
};

// What `prismaquant cost` was asked to do.
struct CostJob {
  std::filesystem::path model;  // HF checkpoint directory
  std::filesystem::path probe;  // WORK/probe
  std::filesystem::path out;    // WORK/cost; created when missing
  std::vector<std::string> formats;
  Objective objective = Objective::kFisher;
  model::SpecOptions spec_options;
  // The GPU vLLM serves the checkpoint on: a Linear is offered only the formats vLLM loads there
  // for its layer kind (formats::serves; research-only formats are measured as asked).
  formats::ServingTarget serve_on = formats::ServingTarget::kBlackwell;
  // The exporter's renders: every error column then measures the weights export writes (GPTQ and
  // the scale choice included). Null: round to nearest with the format's codec, which is what
  // export writes with --rounding nearest.
  const RenderSource* renders = nullptr;
  // With Objective::kKlFisher: the calibration and probes of the KL-Fisher pass (its model, spec
  // options, format slots and pass directory, out/kl-pass, are the cost job's).
  std::optional<KlFisherJob> kl_fisher;
};

struct CostOutcome {
  alloc::CostTable table;
  bool reused = false;  // cost.json already held this fingerprint
  std::string fingerprint;
};

// Digest of the checkpoint, the probe's fingerprint and the options; stored in cost.json's "meta".
std::string cost_fingerprint(const CostJob& job, const std::string& probe_fingerprint);

// Measures every (candidate Linear, format the shape admits) pair with the formats library's
// codec (WeightFormat::fake_quantize; NVFP4 Linears that share an input share the max-amax global
// scale, as the exporter writes it) and writes out/cost.json atomically in the allocator's schema
// (docs/artifacts.md). Reuses an existing cost.json of the same fingerprint.
CostOutcome run_cost(const CostJob& job);

}  // namespace pq::cost
