#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "cost/cost_stage.h"
#include "export/render_cache.h"
#include "export/rounding.h"
#include "formats/serving.h"
#include "formats/weight_format.h"
#include "io/safetensors.h"
#include "model/model_spec.h"
#include "probe/probe_stage.h"
#include "runtime/weights.h"

namespace pq::exporter {

// Linears whose NVFP4 weight_global_scale must be one value, as indices into spec.linears, every
// Linear in exactly one unit, units ordered by their first member. Dense sibling groups (q/k/v,
// gate/up) are one vLLM module, which keeps only the max of its shards' global scales
// (format-facts.md A.3.2). A MoE sibling group spans every expert of a layer, but vLLM's fused MoE
// layer fuses only each expert's gate and up into w13; down_proj and other experts keep their own
// (method-facts.md §7, "Packed experts": each expert's global scale = max(gate, up)).
std::vector<std::vector<std::size_t>> global_scale_units(const model::ModelSpec& spec);

// Max |x| of each candidate Linear's input over the probe's calibration tokens, keyed by Linear
// name: what W4A4 NVFP4's input_global_scale is computed from.
std::map<std::string, float> input_amax_from_probe(const model::ModelSpec& spec,
                                                   const probe::ProbeResult& probe);

// Encodes Linears exactly as run_export writes them: the same rounding strategy, the NVFP4
// global scale shared by fused siblings, the input_global_scale of W4A4 from the calibration amax.
// Whatever evaluates an assignment before export (quantize, scout) goes through this class, so the
// weights it measures are the weights that get written.
class LinearEncoder {
 public:
  // `input_amax` (Linear name -> amax) is needed only for Linears given a W4A4 NVFP4 format.
  // `target` is the GPU the checkpoint is served on: NVFP4 follows the scale rule of the kernel
  // vLLM runs it with there (formats::nvfp4_scales), and the decodings below simulate its
  // activation path. With a `render_cache` root (WORK/render) and a rounding with a fingerprint,
  // encodings of formats that round (every format with a group layout; BF16 and FP8_SOURCE only
  // copy the source) are kept in a RenderCache there and read back instead of rendered again.
  LinearEncoder(const model::ModelSpec& spec, const io::Checkpoint& checkpoint,
                const RoundingStrategy& rounding, std::map<std::string, float> input_amax,
                formats::ServingTarget target, const std::filesystem::path& render_cache = {});

  const model::ModelSpec& spec() const { return spec_; }
  const RoundingStrategy& rounding() const { return rounding_; }
  formats::ServingTarget target() const { return target_; }
  // Null without a render cache.
  const RenderCache* render_cache() const { return cache_.get(); }
  // The render fingerprint (render_fingerprint) of this encoder's checkpoint, rounding, input
  // amax and target.
  std::string fingerprint() const;

  // What spec.linears[index] is encoded with under `format`, its fused siblings assumed to get the
  // same format (the exporter refuses anything else). Throws pq::Error naming the Linear when a
  // W4A4 format lacks its calibration amax.
  formats::QuantizeOptions options(std::size_t index, const formats::WeightFormat& format) const;

  // The stored tensors of spec.linears[index] under `format`. Deterministic: the same call gives
  // the same bytes, whether rendered or read from the render cache. Errors name the Linear.
  // `statistics`, when given, replace the rounding's own for a render (LinearToEncode).
  formats::EncodedWeight encode(std::size_t index, const formats::WeightFormat& format,
                                const CalibrationStatistics* statistics = nullptr) const;

 private:
  float unit_weight_amax(std::size_t unit) const;
  formats::EncodedWeight render(std::size_t index, const formats::WeightFormat& format,
                                const CalibrationStatistics* statistics) const;

  const model::ModelSpec& spec_;
  const io::Checkpoint& checkpoint_;
  const RoundingStrategy& rounding_;
  std::map<std::string, float> input_amax_;
  formats::ServingTarget target_;
  std::vector<std::vector<std::size_t>> units_;
  std::vector<std::size_t> unit_of_;      // per Linear
  mutable std::mutex weight_amax_mutex_;  // the amax of a unit is read once, by one thread
  mutable std::vector<std::optional<float>> weight_amax_;  // per unit, read on first use
  // Per Linear: its FP8 bytes and block scale in the mapped source, for FP8_SOURCE.
  std::vector<std::optional<formats::Fp8SourceWeight>> fp8_sources_;
  std::unique_ptr<RenderCache> cache_;
};

// The Linears of a model replaced by decoded quantized weights, with the serving-time activation
// quantization of their formats: handed to runtime::RuntimeOptions as both the weight transform and
// the activation quantizer, the model computes what the quantized checkpoint serves.
class QuantizedLinears final : public runtime::WeightTransform,
                               public runtime::ActivationQuantizer {
 public:
  // `dequantized` is the Linear's [out, in] weight; `activations` may be null (weight-only).
  void set(const std::string& linear, std::vector<float> dequantized,
           std::shared_ptr<const formats::ActivationQuantizer> activations);
  // Back to the source weight without activation quantization.
  void reset(std::string_view linear);
  bool contains(std::string_view linear) const;
  // The decoded weight of a Linear that was set.
  std::span<const float> weight(std::string_view linear) const;

  void apply(std::string_view linear, std::int64_t out_features, std::int64_t in_features,
             std::span<float> weight) const override;
  bool applies_to(std::string_view linear) const override;
  void quantize(std::string_view linear, std::int64_t rows, std::int64_t in_features,
                std::span<float> input) const override;

 private:
  struct Entry {
    std::vector<float> weight;
    std::shared_ptr<const formats::ActivationQuantizer> activations;
  };
  std::map<std::string, Entry, std::less<>> linears_;
};

// The encoder's weights as the cost stage's renders (cost::CostJob::renders): what it measures is
// what export writes, and with the encoder's render cache each (Linear, format) the cost stage
// renders is read back, not rendered again, by measure, scout and export.
class EncoderRenders final : public cost::RenderSource {
 public:
  explicit EncoderRenders(const LinearEncoder& encoder) : encoder_(encoder) {}
  std::string fingerprint() const override { return encoder_.fingerprint(); }
  cost::RenderedLinear render(std::size_t index, const formats::WeightFormat& format,
                              const cost::LinearStatistics* statistics) const override;
  std::optional<std::uint64_t> stored_bytes() const override;

 private:
  const LinearEncoder& encoder_;
};

// The Linears named in `format_of` (Linear name -> format name) replaced, as the runtime loads
// each one, by the decoding of its LinearEncoder encoding, with the activation quantization
// the encoder's target runs for it (serving_activations). Unlike QuantizedLinears nothing is
// decoded ahead: memory holds the Linear being loaded, and with the encoder's render cache each
// load after the first reads the stored tensors. Unknown names and formats are pq::Errors at
// construction.
class EncodedLinears final : public runtime::WeightTransform, public runtime::ActivationQuantizer {
 public:
  EncodedLinears(const LinearEncoder& encoder, const std::map<std::string, std::string>& format_of);

  void apply(std::string_view linear, std::int64_t out_features, std::int64_t in_features,
             std::span<float> weight) const override;
  bool applies_to(std::string_view linear) const override;
  void quantize(std::string_view linear, std::int64_t rows, std::int64_t in_features,
                std::span<float> input) const override;

 private:
  struct Entry {
    std::size_t index;  // into the spec's Linears
    const formats::WeightFormat* format;
    std::shared_ptr<const formats::ActivationQuantizer> activations;
  };
  const LinearEncoder& encoder_;
  std::map<std::string, Entry, std::less<>> linears_;
};

// The activation quantization vLLM on the encoder's target runs for spec.linears[index] stored in
// `format`
// (formats/serving.h): none where it serves the format weight-only (FP4 and MXFP8 through Marlin
// below sm100, FP8 on Ampere), the format's W-A quantization where it quantizes activations
// (MXFP4A16 and MXFP8A16 on Blackwell included); a research-only format's own.
std::shared_ptr<const formats::ActivationQuantizer> serving_activations(
    const LinearEncoder& encoder, std::size_t index, const formats::WeightFormat& format);

// The decoded weight of spec.linears[index] under `format` (format.dequantize of the encoding)
// and the activation quantization the encoder's target runs for it (serving_activations).
struct DecodedLinear {
  std::vector<float> weight;
  std::shared_ptr<const formats::ActivationQuantizer> activations;
};
DecodedLinear decode_linear(const LinearEncoder& encoder, std::size_t index,
                            const formats::WeightFormat& format,
                            const CalibrationStatistics* statistics = nullptr);

// Every Linear named in `format_of` (Linear name -> format name) replaced by its decoded exporter
// weights, with the activation quantization the encoder's target runs. Unknown names and formats
// are pq::Errors.
QuantizedLinears quantize_linears(const LinearEncoder& encoder,
                                  const std::map<std::string, std::string>& format_of);

}  // namespace pq::exporter
