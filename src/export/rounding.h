#pragma once

#include <map>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <string_view>

#include "formats/weight_format.h"
#include "model/model_spec.h"

namespace pq::exporter {

struct CalibrationStatistics;

// One Linear ready to be encoded: its source weight decoded to f32 and the options the exporter
// fixed for it (shared NVFP4 global scale of fused siblings, calibrated input scale).
struct LinearToEncode {
  const model::Linear& linear;
  const formats::WeightFormat& format;
  formats::Shape2D shape;
  std::span<const float> weight;  // row-major [out, in]
  formats::QuantizeOptions options;
  // The statistics of the Linear's input when the caller holds them (the KL-Fisher pass, which
  // accumulates a layer's Hessians the probe did not store); null: the strategy's own.
  const CalibrationStatistics* statistics = nullptr;
};

// How a Linear's weight becomes the stored tensors of its format. The exporter asks one strategy
// per Linear, so error-minimising strategies (GPTQ, scale sweeps) can replace plain rounding for
// the Linears that have the statistics they need. encode, encoding_report and restore_report may
// be called from several threads at once for different Linears.
class RoundingStrategy {
 public:
  virtual ~RoundingStrategy() = default;
  virtual std::string_view name() const = 0;
  // Identifies the strategy with its options and statistics: strategies with one fingerprint
  // encode a job to the same bytes, so a cache of encodings (RenderCache) keys on it. Empty: the
  // encodings are not to be cached.
  virtual std::string fingerprint() const { return {}; }
  virtual formats::EncodedWeight encode(const LinearToEncode& job) const = 0;
  // The report() entry of the latest encoding of (linear, format); null when there is none.
  virtual nlohmann::json encoding_report(std::string_view linear, std::string_view format) const {
    return nullptr;
  }
  // Takes an entry encoding_report gave back, for an encoding read from a cache instead of made,
  // so that describe() and report() cover it.
  virtual void restore_report(const nlohmann::json& entry) const {}
  // What the strategy did to these encodings (Linear name -> format name), a short Markdown
  // paragraph for the model card.
  virtual std::string describe(const std::map<std::string, std::string>& format_of) const = 0;
  // Per-Linear detail of those encodings: {"strategy": name, "linears": [...]}.
  virtual nlohmann::json report(const std::map<std::string, std::string>& format_of) const = 0;
};

// Round to nearest (RTN) with the format's own scale rule: exactly WeightFormat::quantize, so
// dequantizing the result equals WeightFormat::fake_quantize of the source weight bit for bit.
class NearestRounding final : public RoundingStrategy {
 public:
  std::string_view name() const override { return "nearest"; }
  std::string fingerprint() const override { return "nearest/1"; }
  formats::EncodedWeight encode(const LinearToEncode& job) const override;
  std::string describe(const std::map<std::string, std::string>& format_of) const override;
  nlohmann::json report(const std::map<std::string, std::string>& format_of) const override;
};

}  // namespace pq::exporter
