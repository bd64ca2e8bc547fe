#include "pipeline/uniform_baseline.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "common/error.h"
#include "pipeline/measure.h"

namespace pq::pipeline {

std::optional<std::string> uniform_baseline_format(const std::vector<std::string>& menu) {
  for (const char* format : {"NVFP4", "NVFP4A16"}) {
    if (std::find(menu.begin(), menu.end(), format) != menu.end()) return std::string(format);
  }
  return std::nullopt;
}

exporter::UniformBaseline measure_uniform_baseline(
    const model::ModelConfig& config, const io::Checkpoint& source,
    const exporter::LinearEncoder& encoder, const alloc::CostTable& table,
    const std::map<std::string, std::string>& shipped, const runtime::ReferenceLogits& reference,
    std::string_view format, const std::filesystem::path& resume_dir) {
  exporter::UniformBaseline baseline;
  baseline.format = std::string(format);
  std::map<std::string, std::string> uniform;
  // The baseline format's column, looked up once (past the end: the table lacks it).
  const auto baseline_slot = static_cast<std::size_t>(
      std::find(table.formats.begin(), table.formats.end(), baseline.format) -
      table.formats.begin());
  for (const alloc::LinearCost& row : table.linears) {
    const auto it = shipped.find(row.name);
    PQ_CHECK(it != shipped.end(), "the assignment has no format for Linear '{}' of the cost table",
             row.name);
    const std::optional<alloc::FormatCost>& chosen = row.costs.at(table.format_index(it->second));
    PQ_CHECK(chosen.has_value(),
             "Linear '{}' is assigned {}, which the cost table does not offer it", row.name,
             it->second);
    baseline.shipped_bytes += chosen->bytes;
    const bool offered =
        baseline_slot < table.formats.size() && row.costs.at(baseline_slot).has_value();
    uniform[row.name] = offered ? baseline.format : it->second;
    baseline.bytes += offered ? row.costs.at(baseline_slot)->bytes : chosen->bytes;
    baseline.linears += offered ? 1 : 0;
  }
  if (baseline.bytes <= baseline.shipped_bytes) {
    baseline.quality =
        measure_assignment(config, source, encoder, uniform, reference, nullptr, resume_dir);
  }
  return baseline;
}

double perplexity_z_score(const exporter::MeasuredQuality& shipped,
                          const exporter::MeasuredQuality& baseline) {
  const std::vector<double>& a = shipped.prediction_nll;
  const std::vector<double>& b = baseline.prediction_nll;
  PQ_CHECK(a.size() == b.size() && a.size() >= 2,
           "paired perplexity comparison needs the same predictions (got {} and {})", a.size(),
           b.size());
  const double n = static_cast<double>(a.size());
  double mean = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) mean += a[i] - b[i];
  mean /= n;
  double squares = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) squares += (a[i] - b[i] - mean) * (a[i] - b[i] - mean);
  const double standard_error = std::sqrt(squares / (n - 1.0) / n);
  if (standard_error == 0.0) return mean > 0.0 ? HUGE_VAL : 0.0;
  return mean / standard_error;
}

void require_not_worse_than_uniform(const exporter::MeasuredQuality& shipped,
                                    const exporter::UniformBaseline& baseline) {
  if (!baseline.quality) return;
  const exporter::MeasuredQuality& uniform = *baseline.quality;
  // Perplexity counts as fidelity to the source, like KL: per prediction, how far each model's
  // NLL moved from the source's, |NLL - NLL_source|, paired between the two. The aggregate
  // perplexity rewards any flattening of the distribution on text far from the model's own
  // (qwen3-dense-tiny on WikiText, 16 x 512 held-out tokens, 4.75 bits: source 1733.8, the mix
  // 1766.2 with KL 0.0153, uniform NVFP4 1725.0 with KL 0.0447, 2.9x more).
  const auto deviation = [&](const exporter::MeasuredQuality& quality) {
    PQ_CHECK(quality.prediction_nll.size() == shipped.source_prediction_nll.size(),
             "paired perplexity comparison needs the source's predictions (got {} and {})",
             quality.prediction_nll.size(), shipped.source_prediction_nll.size());
    exporter::MeasuredQuality moved;
    for (std::size_t t = 0; t < quality.prediction_nll.size(); ++t) {
      moved.prediction_nll.push_back(
          std::abs(quality.prediction_nll[t] - shipped.source_prediction_nll[t]));
    }
    return moved;
  };
  const double z = perplexity_z_score(deviation(shipped), deviation(uniform));
  if (shipped.mean_kl <= uniform.mean_kl && z <= kPerplexityZLimit) return;
  fail(
      "not exported: the chosen assignment ({} bytes of Linears) has held-out KL {:.6f} and "
      "perplexity {:.4f}, worse than uniform {} ({} Linears, {} bytes) with KL {:.6f} and "
      "perplexity {:.4f} on the same {} windows of {} tokens (source perplexity {:.4f}; z = {:.2f} "
      "for the per-prediction NLL moving further from the source's); try another --target-bits, "
      "--formats or --select scout",
      baseline.shipped_bytes, shipped.mean_kl, shipped.perplexity, baseline.format,
      baseline.linears, baseline.bytes, uniform.mean_kl, uniform.perplexity, uniform.windows,
      uniform.seqlen, shipped.source_perplexity, z);
}

}  // namespace pq::pipeline
