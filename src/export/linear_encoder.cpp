// One Linear encoded as the exporter writes it, and a model's Linears replaced by those encodings.
#include "export/linear_encoder.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "common/disk_space.h"
#include "common/error.h"
#include "export/gptq.h"
#include "io/dtype.h"
#include "io/fp8_block.h"
#include "probe/input_key.h"

namespace pq::exporter {
namespace {

bool is_w13_role(const std::string& role) {
  return role.ends_with("gate_proj") || role.ends_with("up_proj");
}

bool is_nvfp4(const formats::WeightFormat& format) {
  return format.name() == "NVFP4" || format.name() == "NVFP4A16";
}

// The input rows of a Linear through its format's activation quantizer (null: it has none).
void quantize_input(const formats::ActivationQuantizer* activations, std::string_view linear,
                    std::int64_t rows, std::int64_t in_features, std::span<float> input) {
  PQ_CHECK(activations != nullptr, "Linear '{}' has no activation quantizer", linear);
  PQ_CHECK(static_cast<std::int64_t>(input.size()) == rows * in_features,
           "Linear '{}': {} input values for [{}, {}]", linear, input.size(), rows, in_features);
  const std::vector<float> x(input.begin(), input.end());
  activations->fake_quantize(x, in_features, input);
}

float max_abs(std::span<const float> values) {
  float amax = 0.0f;
  for (const float v : values) amax = std::max(amax, std::fabs(v));
  return amax;
}

}  // namespace

std::vector<std::vector<std::size_t>> global_scale_units(const model::ModelSpec& spec) {
  std::vector<std::vector<std::size_t>> units;
  std::vector<bool> placed(spec.linears.size(), false);
  for (const model::SiblingGroup& group : spec.groups) {
    std::map<std::int64_t, std::size_t> unit_of_expert;  // expert index, -1 for a dense group
    for (const std::size_t index : group.members) {
      const model::Linear& linear = spec.linears[index];
      placed[index] = true;
      if (linear.expert && !is_w13_role(linear.role)) {
        units.push_back({index});
        continue;
      }
      const auto [it, added] = unit_of_expert.try_emplace(linear.expert.value_or(-1), units.size());
      if (added) units.emplace_back();
      units[it->second].push_back(index);
    }
  }
  for (std::size_t index = 0; index < spec.linears.size(); ++index) {
    if (!placed[index]) units.push_back({index});
  }
  std::sort(units.begin(), units.end(),
            [](const auto& a, const auto& b) { return a.front() < b.front(); });
  return units;
}

std::map<std::string, float> input_amax_from_probe(const model::ModelSpec& spec,
                                                   const probe::ProbeResult& probe) {
  std::map<std::string, float> amax;
  for (const model::Linear& linear : spec.linears) {
    if (linear.is_candidate) amax[linear.name] = probe.input_amax(probe::input_key(linear));
  }
  return amax;
}

LinearEncoder::LinearEncoder(const model::ModelSpec& spec, const io::Checkpoint& checkpoint,
                             const RoundingStrategy& rounding,
                             std::map<std::string, float> input_amax, formats::ServingTarget target,
                             const std::filesystem::path& render_cache)
    : spec_(spec),
      checkpoint_(checkpoint),
      rounding_(rounding),
      input_amax_(std::move(input_amax)),
      target_(target),
      units_(global_scale_units(spec)),
      unit_of_(spec.linears.size()),
      weight_amax_(units_.size()) {
  for (std::size_t unit = 0; unit < units_.size(); ++unit) {
    for (const std::size_t member : units_[unit]) unit_of_[member] = unit;
  }
  fp8_sources_.resize(spec.linears.size());
  for (std::size_t i = 0; i < spec.linears.size(); ++i) {
    const model::Linear& linear = spec.linears[i];
    if (!linear.scale_tensor) continue;
    const io::TensorView scale = checkpoint_.view(*linear.scale_tensor);
    fp8_sources_[i] = formats::Fp8SourceWeight{checkpoint_.view(linear.weight_tensor).bytes,
                                               scale.info->dtype, scale.bytes};
  }
  if (!render_cache.empty() && !rounding_.fingerprint().empty()) {
    cache_ = std::make_unique<RenderCache>(
        render_cache, render_fingerprint(checkpoint_.directory(), rounding_, input_amax_, target_));
  }
}

std::string LinearEncoder::fingerprint() const {
  return render_fingerprint(checkpoint_.directory(), rounding_, input_amax_, target_);
}

float LinearEncoder::unit_weight_amax(std::size_t unit) const {
  const std::lock_guard lock(weight_amax_mutex_);
  if (!weight_amax_[unit]) {
    float amax = 0.0f;
    for (const std::size_t member : units_[unit]) {
      const model::Linear& linear = spec_.linears[member];
      amax = std::max(amax, max_abs(model::read_source_weight(checkpoint_, linear)));
    }
    weight_amax_[unit] = amax;
  }
  return *weight_amax_[unit];
}

formats::QuantizeOptions LinearEncoder::options(std::size_t index,
                                                const formats::WeightFormat& format) const {
  PQ_CHECK(index < spec_.linears.size(), "Linear index {} out of range ({} Linears)", index,
           spec_.linears.size());
  formats::QuantizeOptions options;
  if (format.name() == "FP8_SOURCE") {
    const std::optional<formats::Fp8SourceWeight>& source = fp8_sources_[index];
    PQ_CHECK(source.has_value(),
             "Linear '{}' is not stored as block-scaled FP8: FP8_SOURCE has no "
             "source bytes to keep",
             spec_.linears[index].name);
    options.fp8_source = &*source;
    return options;
  }
  if (!is_nvfp4(format)) return options;
  const std::size_t unit = unit_of_[index];
  // Siblings sharing the global are one vLLM module, so one kernel and one rule.
  options.nvfp4_scales = formats::nvfp4_scales(format, spec_.linears[index].layer_kind(), target_);
  options.weight_global_scale =
      formats::nvfp4_weight_global_scale(unit_weight_amax(unit), options.nvfp4_scales);
  // W4A4 NVFP4: input_global_scale = 448*6/amax(calibration activations) (format-facts.md A.2).
  // Fused siblings read one input, so they share the max over members. The other formats that
  // quantize activations (MXFP4/MXFP8 W*A*, FP8) scale them dynamically and store nothing.
  if (format.quantizes_activations()) {
    float amax = 0.0f;
    for (const std::size_t member : units_[unit]) {
      const std::string& name = spec_.linears[member].name;
      const auto it = input_amax_.find(name);
      PQ_CHECK(it != input_amax_.end(),
               "Linear '{}' is assigned {} (W4A4), whose input_global_scale needs the calibration "
               "activation amax; none was given for it",
               name, format.name());
      amax = std::max(amax, it->second);
    }
    options.input_global_scale = formats::nvfp4_global_scale(amax);
  }
  return options;
}

formats::EncodedWeight LinearEncoder::encode(std::size_t index, const formats::WeightFormat& format,
                                             const CalibrationStatistics* statistics) const {
  const model::Linear& linear = spec_.linears.at(index);
  // Formats without a group layout copy or cast the source: nothing to save by caching them.
  const bool cached =
      cache_ != nullptr && format.group_layout({linear.out_features, linear.in_features});
  if (!cached) return render(index, format, statistics);
  if (std::optional<RenderCache::Entry> entry = cache_->load(linear.name, format.name())) {
    rounding_.restore_report(entry->report);
    return std::move(entry->encoded);
  }
  formats::EncodedWeight encoded = render(index, format, statistics);
  try {
    cache_->store(linear.name, format.name(), encoded,
                  rounding_.encoding_report(linear.name, format.name()));
  } catch (const Error& e) {
    fail("{}: cannot store its {} render: {}", linear.name, format.name(), e.what());
  }
  return encoded;
}

formats::EncodedWeight LinearEncoder::render(std::size_t index, const formats::WeightFormat& format,
                                             const CalibrationStatistics* statistics) const {
  const model::Linear& linear = spec_.linears.at(index);
  try {
    const std::vector<float> weight = model::read_source_weight(checkpoint_, linear);
    const LinearToEncode job{linear,
                             format,
                             {linear.out_features, linear.in_features},
                             weight,
                             options(index, format),
                             statistics};
    return rounding_.encode(job);
  } catch (const Error& e) {
    fail("{}: {}", linear.name, e.what());
  }
}

void QuantizedLinears::set(const std::string& linear, std::vector<float> dequantized,
                           std::shared_ptr<const formats::ActivationQuantizer> activations) {
  linears_[linear] = Entry{std::move(dequantized), std::move(activations)};
}

void QuantizedLinears::reset(std::string_view linear) {
  if (const auto it = linears_.find(linear); it != linears_.end()) linears_.erase(it);
}

bool QuantizedLinears::contains(std::string_view linear) const {
  return linears_.find(linear) != linears_.end();
}

std::span<const float> QuantizedLinears::weight(std::string_view linear) const {
  const auto it = linears_.find(linear);
  PQ_CHECK(it != linears_.end(), "no quantized weight for Linear '{}'", linear);
  return it->second.weight;
}

void QuantizedLinears::apply(std::string_view linear, std::int64_t out_features,
                             std::int64_t in_features, std::span<float> weight) const {
  const auto it = linears_.find(linear);
  if (it == linears_.end()) return;
  PQ_CHECK(static_cast<std::int64_t>(it->second.weight.size()) == out_features * in_features &&
               weight.size() == it->second.weight.size(),
           "Linear '{}': quantized weight has {} values, the model's is [{}, {}]", linear,
           it->second.weight.size(), out_features, in_features);
  std::copy(it->second.weight.begin(), it->second.weight.end(), weight.begin());
}

bool QuantizedLinears::applies_to(std::string_view linear) const {
  const auto it = linears_.find(linear);
  return it != linears_.end() && it->second.activations != nullptr;
}

void QuantizedLinears::quantize(std::string_view linear, std::int64_t rows,
                                std::int64_t in_features, std::span<float> input) const {
  const auto it = linears_.find(linear);
  quantize_input(it == linears_.end() ? nullptr : it->second.activations.get(), linear, rows,
                 in_features, input);
}

EncodedLinears::EncodedLinears(const LinearEncoder& encoder,
                               const std::map<std::string, std::string>& format_of)
    : encoder_(encoder) {
  const model::ModelSpec& spec = encoder.spec();
  std::map<std::string_view, std::size_t> index_of;
  for (std::size_t i = 0; i < spec.linears.size(); ++i) index_of[spec.linears[i].name] = i;
  for (const auto& [name, format_name] : format_of) {
    const auto it = index_of.find(name);
    PQ_CHECK(it != index_of.end(), "Linear '{}' is not in the model", name);
    const formats::WeightFormat& format = formats::format_by_name(format_name);
    linears_.emplace(name,
                     Entry{it->second, &format, serving_activations(encoder, it->second, format)});
  }
}

void EncodedLinears::apply(std::string_view linear, std::int64_t out_features,
                           std::int64_t in_features, std::span<float> weight) const {
  const auto it = linears_.find(linear);
  if (it == linears_.end()) return;
  const std::vector<float> decoded =
      it->second.format->dequantize(encoder_.encode(it->second.index, *it->second.format));
  PQ_CHECK(static_cast<std::int64_t>(decoded.size()) == out_features * in_features &&
               weight.size() == decoded.size(),
           "Linear '{}': quantized weight has {} values, the model's is [{}, {}]", linear,
           decoded.size(), out_features, in_features);
  std::copy(decoded.begin(), decoded.end(), weight.begin());
}

bool EncodedLinears::applies_to(std::string_view linear) const {
  const auto it = linears_.find(linear);
  return it != linears_.end() && it->second.activations != nullptr;
}

void EncodedLinears::quantize(std::string_view linear, std::int64_t rows, std::int64_t in_features,
                              std::span<float> input) const {
  const auto it = linears_.find(linear);
  quantize_input(it == linears_.end() ? nullptr : it->second.activations.get(), linear, rows,
                 in_features, input);
}

std::shared_ptr<const formats::ActivationQuantizer> serving_activations(
    const LinearEncoder& encoder, std::size_t index, const formats::WeightFormat& format) {
  if (!format.exportable()) return format.activation_quantizer(encoder.options(index, format));
  const formats::ServingBehaviour& served = formats::serving_behaviour(
      format, encoder.spec().linears[index].layer_kind(), encoder.target());
  if (served.activations != formats::ActivationPath::kQuantized) return nullptr;
  const formats::WeightFormat& quantizing = formats::served_activation_format(format);
  return quantizing.activation_quantizer(encoder.options(index, quantizing));
}

DecodedLinear decode_linear(const LinearEncoder& encoder, std::size_t index,
                            const formats::WeightFormat& format,
                            const CalibrationStatistics* statistics) {
  const formats::EncodedWeight encoded = encoder.encode(index, format, statistics);
  DecodedLinear decoded;
  decoded.weight = format.dequantize(encoded);
  decoded.activations = serving_activations(encoder, index, format);
  return decoded;
}

QuantizedLinears quantize_linears(const LinearEncoder& encoder,
                                  const std::map<std::string, std::string>& format_of) {
  const model::ModelSpec& spec = encoder.spec();
  std::map<std::string_view, std::size_t> index_of;
  for (std::size_t i = 0; i < spec.linears.size(); ++i) index_of[spec.linears[i].name] = i;
  QuantizedLinears quantized;
  for (const auto& [name, format_name] : format_of) {
    const auto it = index_of.find(name);
    PQ_CHECK(it != index_of.end(), "Linear '{}' is not in the model", name);
    DecodedLinear decoded =
        decode_linear(encoder, it->second, formats::format_by_name(format_name));
    quantized.set(name, std::move(decoded.weight), std::move(decoded.activations));
  }
  return quantized;
}

cost::RenderedLinear EncoderRenders::render(std::size_t index, const formats::WeightFormat& format,
                                            const cost::LinearStatistics* statistics) const {
  std::optional<CalibrationStatistics> given;
  if (statistics != nullptr) {
    given = CalibrationStatistics{statistics->hessian, statistics->tokens,
                                  statistics->act_second_moment,
                                  probe::input_key(encoder_.spec().linears.at(index))};
  }
  DecodedLinear decoded = decode_linear(encoder_, index, format, given ? &*given : nullptr);
  return {std::move(decoded.weight), std::move(decoded.activations)};
}

std::optional<std::uint64_t> EncoderRenders::stored_bytes() const {
  if (encoder_.render_cache() == nullptr) return std::nullopt;
  return bytes_under(encoder_.render_cache()->directory());
}

}  // namespace pq::exporter
