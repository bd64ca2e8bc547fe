#pragma once

#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "alloc/cost_table.h"
#include "export/exporter.h"
#include "export/linear_encoder.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "runtime/evaluate.h"

namespace pq::pipeline {

// The format a menu's uniform baseline uses: NVFP4 when the menu has it, else NVFP4A16, else
// none (a menu without FP4 has no uniform FP4 checkpoint to compare with).
std::optional<std::string> uniform_baseline_format(const std::vector<std::string>& menu);

// The uniform baseline of `shipped` (Linear name -> format name): each Linear whose cost-table
// row offers `format` (its shape takes it and vLLM on the target loads it) in `format`, every
// other Linear in its shipped format; bytes from the table. Measured with measure_assignment
// (the same encoder, so the same render, and the same held-out windows; resumable with
// `resume_dir`) when it fits in the shipped bytes.
exporter::UniformBaseline measure_uniform_baseline(
    const model::ModelConfig& config, const io::Checkpoint& source,
    const exporter::LinearEncoder& encoder, const alloc::CostTable& table,
    const std::map<std::string, std::string>& shipped, const runtime::ReferenceLogits& reference,
    std::string_view format, const std::filesystem::path& resume_dir = {});

// How much higher `shipped`'s held-out perplexity is than `baseline`'s, in standard errors: the
// mean of the per-prediction NLL differences (prediction_nll, paired: the same windows) over its
// standard error. On few held-out tokens quantization noise moves perplexity both ways by more
// than the mixes differ: on qwen3-moe-tiny (2 x 128 tokens) the 4.75-bit mix has 2.3x less KL
// than uniform NVFP4 (0.005879 against 0.013325) and 1.1% more perplexity (2289.66 against
// 2264.08, the source's 2290.73), within noise.
double perplexity_z_score(const exporter::MeasuredQuality& shipped,
                          const exporter::MeasuredQuality& baseline);

// The z score above which a higher perplexity counts as worse: about a 2.3% chance of calling
// an equal one worse.
inline constexpr double kPerplexityZLimit = 2.0;

// Throws pq::Error (one line, both measurements) when `shipped` is worse than the measured
// baseline: higher held-out KL, or per-prediction NLLs further from the source's than the
// baseline's, mean |NLL - NLL_source| higher by more than kPerplexityZLimit standard errors
// (perplexity_z_score of those deviations, paired per prediction). quantize
// refuses to export such an assignment. A baseline that was not measured (it needs more bytes) is
// no objection.
void require_not_worse_than_uniform(const exporter::MeasuredQuality& shipped,
                                    const exporter::UniformBaseline& baseline);

}  // namespace pq::pipeline
