#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "export/rounding.h"
#include "formats/weight_format.h"
#include "model/model_spec.h"

namespace pq::probe {
class ProbeResult;
}

namespace pq::exporter {

// What calibration measured about one Linear's input x (docs/probe-artifacts.md).
struct CalibrationStatistics {
  std::span<const float> hessian;            // [in, in] row-major: sum over the tokens of x x^T
  std::int64_t tokens = 0;                   // how many rows the sum holds
  std::span<const float> act_second_moment;  // [in]: E[x_j^2]
  // Names the Hessian (probe::input_key): Linears whose statistics carry the same non-empty key
  // read the same input, so GptqRounding factors that Hessian once for all of them.
  std::string key{};
  // The Hessian [in, in] and row count of held-out calibration rows, which `hessian` and `tokens`
  // include (probe::ProbeJob::holdout_hessian); empty and 0 when the probe held none out.
  std::span<const float> holdout_hessian{};
  std::int64_t holdout_tokens = 0;
};

// The statistics of a Linear, or nullopt when calibration did not see its input.
using StatisticsProvider =
    std::function<std::optional<CalibrationStatistics>(const model::Linear& linear)>;

// Statistics from a finished probe (its Hessian, token count and second moments of the Linear's
// input, probe::input_key); nullopt for a Linear whose input the probe did not measure. The probe
// result must outlive the provider.
StatisticsProvider statistics_from_probe(const probe::ProbeResult& probe);

struct GptqOptions {
  // The renders GptqRounding tries besides round-to-nearest; it stores the one with the lowest
  // output error (improve-or-keep): on the held-out rows when the statistics have them, else on
  // the calibration rows. GPTQ (with the scale sweep below when asked): every format with a group
  // layout. Local-Hessian (local_hessian.h): NVFP4 and MX only.
  bool gptq = true;
  bool local_hessian = false;
  // Local-Hessian's NVFP4 bracket (LocalHessianOptions::e4m3_bracket; 0: every E4M3 byte) and
  // MX bracket (e8m0_bracket); its damping is `damp` above.
  int local_hessian_e4m3_bracket = 0;
  int local_hessian_e8m0_bracket = 2;
  // Added to diag(H) before inverting, as a fraction of mean(diag(H)) (GPTQ reference percdamp;
  // method-facts.md §7).
  double damp = 0.01;
  // Columns per lazy batch (GPTQ paper §3 "Lazy Batch-Updates", blocksize 128).
  std::int64_t block_size = 128;
  // Fewer calibration tokens than this: GptqRounding rounds to nearest. GPTQ fits H's few
  // directions and generalises badly: on qwen3-moe-tiny several experts routed 1-10 tokens had
  // held-out output errors 1.2-1.8x RTN's, while all with 11 or more beat RTN (docs/export.md).
  std::int64_t min_tokens = 16;
  // Quantize columns in descending order of diag(H) (GPTQ reference --act-order). With groups,
  // every group's scale is fixed from the original weights before the pass ("static groups"),
  // so stored groups stay contiguous in the original column order.
  bool act_order = false;
  // Where GPTQ fixes a scale (from the weights v as updated so far), try the codec's candidate
  // scales for amax * m, m in [sweep_lo, sweep_hi], and keep one only if its rounding of v has a
  // strictly lower sum_j E[x_j^2] (v_j - q_j)^2 than the nearest-rounding scale's (the upstream
  // sweep's objective, method-facts.md §7; docs/export.md says why it is not run after GPTQ).
  bool scale_sweep = true;
  // The sweep's objective is instead d^T B d with B the group's diagonal block of the damped
  // Hessian (Local-Hessian's objective, local_hessian.h) over the values v as updated so far.
  // Applies to groups of at most 64 columns (NVFP4, MX) without act_order; others keep the
  // diagonal objective.
  bool sweep_local_hessian = false;
  int sweep_candidates = 32;
  float sweep_lo = 0.5f;
  float sweep_hi = 1.5f;
};

// The damped Hessian H + damp * mean(diag H) * I in GPTQ's column order, factored: U upper
// triangular with U^T U = its inverse. Depends only on the statistics and options (damp,
// act_order), so Linears that share an input share it.
struct HessianFactor {
  std::vector<std::int64_t> order;     // the columns in processing order
  std::vector<double> u;               // [in, in] row-major, zero below the diagonal
  std::vector<double> added_diagonal;  // [in], processing order: damping, plus 1 for dead inputs
};

// The factor of stats' Hessian for an input of `in` features (LAPACK dpotrf and dtrtri in
// double). nullopt when H holds Inf/NaN or the damped H is not positive definite. Throws
// pq::Error for statistics that do not fit `in`.
std::optional<HessianFactor> factor_hessian(const CalibrationStatistics& stats, std::int64_t in,
                                            const GptqOptions& options);

// A weight as element codes and per-(row, group) scales of a GroupLayout, the input of
// WeightFormat::encode_groups.
struct GroupedWeight {
  std::vector<std::uint8_t> codes;          // [out, in], one per byte
  std::vector<formats::GroupScale> scales;  // [out, in / group_size]
  std::int64_t groups_rescaled = 0;         // scale units whose scale the sweep changed
  // tr(dW H dW^T) over the calibration Hessian (undamped), dW = dequantized codes - w: the
  // output error, from GPTQ's own error terms.
  double output_error = 0.0;
};

// GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
// Pre-trained Transformers", Algorithm 1) of row-major w [out, in] on the layout's groups, each
// scale fixed (and swept, when asked) as the pass reaches its first column. Deterministic for a
// given input and OpenBLAS thread count. Returns nullopt when H holds Inf/NaN or H + damp *
// mean(diag H) * I is not positive definite. Throws pq::Error for a non-finite weight or statistics
// that do not fit the shape. Blocks of rows run in parallel (OpenMP) over a fixed partition, so
// the pass itself does not depend on the thread count.
std::optional<GroupedWeight> gptq_round(std::span<const float> w, formats::Shape2D shape,
                                        const formats::GroupLayout& layout,
                                        const CalibrationStatistics& stats,
                                        const GptqOptions& options);

// The same with the Hessian already factored (factor_hessian of these statistics and options):
// the bytes equal gptq_round's.
GroupedWeight gptq_round(std::span<const float> w, formats::Shape2D shape,
                         const formats::GroupLayout& layout, const CalibrationStatistics& stats,
                         const HessianFactor& factor, const GptqOptions& options);

// Output error of a rounding over the calibration set: tr(dW H dW^T) / (tokens * out) with
// dW = quantized - w (cost::measure_errors' output_mse).
double output_mse(std::span<const float> w, std::span<const float> quantized,
                  formats::Shape2D shape, const CalibrationStatistics& stats);

// How one Linear was rounded, and what that did to its output error.
struct RoundingReport {
  std::string linear;
  std::string format;
  // "gptq", "gptq+sweep", "local-hessian", or "nearest" when no other render ran or lowered the
  // calibration output error (see fallback).
  std::string method;
  std::string fallback;  // why the weight is rounded to nearest; empty when it is not
  // Output errors (output_mse) of plain round-to-nearest and of the stored weight; absent
  // without statistics.
  std::optional<double> nearest_output_mse;
  std::optional<double> output_mse;
  std::int64_t groups_rescaled = 0;
  // The calibration output error (output_mse) of every render tried besides round-to-nearest, by
  // method, whether stored or not; with held-out rows, of the stored render only.
  std::map<std::string, double> candidates;
  // With held-out rows (CalibrationStatistics::holdout_tokens): how many, and the output error on
  // them of round-to-nearest ("nearest") and of every render fitted without them, by method; the
  // lowest chose `method`, which was then rendered again on every calibration row.
  std::int64_t holdout_tokens = 0;
  std::map<std::string, double> holdout_candidates;
  // output_mse / nearest_output_mse; absent without statistics or when RTN is exact.
  std::optional<double> ratio() const;
};

nlohmann::json to_json(const RoundingReport& report);
// The report to_json wrote (its derived ratio ignored). Throws pq::Error for anything else.
RoundingReport rounding_report_from_json(const nlohmann::json& j);

// GPTQ + scale sweep for every format with a group layout, and/or Local-Hessian scales for NVFP4
// and MX (GptqOptions::gptq, local_hessian): of the renders tried and round-to-nearest, the one
// with the lowest calibration output error is stored. When the statistics hold out rows (and the
// others number at least min_tokens), the choice is made on them instead: every render is fitted
// to the other rows (H minus the held-out Hessian), the one with the lowest output error on the
// held-out rows wins unless round-to-nearest's is as low, and the winner is rendered again on all
// rows, which is what is stored. Rounds to nearest (WeightFormat::quantize)
// instead: formats without a layout (BF16, FP8_SOURCE); Linears without statistics (or with
// statistics over zero tokens) and, for GPTQ, Hessians that are not finite or not positive
// definite after damping, each with one warning line on stderr naming the Linear; and, silently,
// Linears calibrated on fewer than options.min_tokens tokens (rarely routed experts) and Linears
// where no render's calibration output error is lower than nearest rounding's.
// NVFP4 keeps the weight_global_scale the exporter gives (fused siblings share it). Records a
// RoundingReport per encoded (Linear, format). Each thread keeps the factor of the last Hessian it
// factored (by CalibrationStatistics::key) for its next Linear: siblings, encoded one after
// another by one thread, share it, and memory holds one factor per encoding thread (two, and the
// fitting rows' Hessian, with held-out rows). encode, encoding_report and restore_report may run on
// several threads at once (the KL-Fisher pass renders a MoE layer's experts in parallel).
class GptqRounding final : public RoundingStrategy {
 public:
  // `statistics_fingerprint` identifies what the provider returns (the probe's fingerprint); it
  // is part of fingerprint(), so caches of encodings follow the statistics.
  explicit GptqRounding(StatisticsProvider statistics, GptqOptions options = {},
                        std::string statistics_fingerprint = {});

  // "gptq", "local-hessian" or "gptq+local-hessian": the renders it tries.
  std::string_view name() const override;
  std::string fingerprint() const override;
  formats::EncodedWeight encode(const LinearToEncode& job) const override;
  nlohmann::json encoding_report(std::string_view linear, std::string_view format) const override;
  void restore_report(const nlohmann::json& entry) const override;
  // How many Linears GPTQ rounded, how many fell back to nearest rounding and why, and the
  // geometric mean of output_mse / nearest_output_mse over those with statistics.
  std::string describe(const std::map<std::string, std::string>& format_of) const override;
  // The RoundingReport (to_json) of every listed (Linear, format) encoded so far.
  nlohmann::json report(const std::map<std::string, std::string>& format_of) const override;

  // One report per (Linear, format) encoded, in the order first encoded; encoding a pair again
  // (LinearEncoder measures before it exports) replaces its report. Not while encodings run.
  const std::vector<RoundingReport>& reports() const { return reports_; }
  // Hessians factored so far (a Hessian shared by consecutive Linears of a thread counts once).
  std::int64_t factorizations() const { return factorizations_; }

 private:
  struct KeptFactor {
    std::string key;
    std::int64_t in = 0;
    std::optional<HessianFactor> factor;
  };
  // What one encoding thread keeps for its next Linear.
  struct ThreadState {
    std::vector<KeptFactor> factors;  // oldest first
    std::string fitting_key;          // fitting_statistics' kept Hessian: its key
    std::vector<float> fitting_hessian, fitting_moment;
  };
  // The renders of GptqOptions, of which a Linear's rounding tries every one that applies.
  enum class Render { kGptq, kLocalHessian };

  void record(RoundingReport report) const;
  // The calling thread's state (created on its first use).
  ThreadState& thread_state() const;
  // The factor of stats' Hessian: a kept one when its key matches, else a new one, kept in place
  // of the oldest (at most `keep` are kept; an empty key is never reused).
  const std::optional<HessianFactor>& factor(const CalibrationStatistics& stats, std::int64_t in,
                                             std::size_t keep) const;
  // Statistics of the rows stats does not hold out: H - H_holdout, tokens - holdout_tokens, and
  // E[x_j^2] as diag(H - H_holdout) / tokens; kept for the next Linear of the same key.
  CalibrationStatistics fitting_statistics(const CalibrationStatistics& stats) const;
  // The method name of `render` as RoundingReport::method gives it.
  std::string method_name(Render render) const;
  // `render` of the job's weight fitted to `stats`, or nullopt (with the reason added to
  // `skipped`) when it does not apply or its Hessian is unusable.
  std::optional<GroupedWeight> render(Render render, const LinearToEncode& job,
                                      const formats::GroupLayout& layout,
                                      const CalibrationStatistics& stats, std::size_t keep,
                                      std::vector<std::string>& skipped) const;

  StatisticsProvider statistics_;
  GptqOptions options_;
  std::string statistics_fingerprint_;
  mutable std::mutex mutex_;  // guards states_ (not the states themselves), reports_, report_index_
  mutable std::map<std::thread::id, ThreadState> states_;
  mutable std::atomic<std::int64_t> factorizations_ = 0;
  mutable std::vector<RoundingReport> reports_;
  mutable std::map<std::pair<std::string, std::string>, std::size_t> report_index_;
};

// The rounding strategy named `name`: "gptq", "local-hessian" or "gptq+local-hessian"
// (GptqRounding over the probe's statistics trying those renders; needs `probe`, which must
// outlive it; a null probe is a one-line pq::Error saying so) or "nearest". pq::Error otherwise.
std::unique_ptr<RoundingStrategy> make_rounding(std::string_view name,
                                                const probe::ProbeResult* probe);

}  // namespace pq::exporter
