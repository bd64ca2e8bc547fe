// GPTQ with group-aware scales, and the per-group scale sweep, for every format with a group
// layout. Algorithm: Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
// Generative Pre-trained Transformers" (Algorithm 1; reference github.com/IST-DASLab/gptq
// gptq.py fasterquant). Sweep objective: upstream prismaquant export_native_compressed
// (method-facts.md §7), applied where each scale is fixed rather than after GPTQ.
#include "export/gptq.h"

#include <cblas.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <exception>
#include <numeric>

#include "common/error.h"
#include "cost/cost_stage.h"
#include "export/local_hessian.h"
#include "probe/input_key.h"
#include "probe/probe_stage.h"

// LAPACK Cholesky factorisation and triangular inverse (OpenBLAS ships LAPACK; Debian's
// libopenblas-dev has no lapacke.h). Fortran ABI: every argument by reference, and the hidden
// lengths of the character arguments last (gfortran convention; OpenBLAS's C versions ignore
// them).
extern "C" {
void dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info,
             std::size_t uplo_length);
void dtrtri_(const char* uplo, const char* diag, const int* n, double* a, const int* lda, int* info,
             std::size_t uplo_length, std::size_t diag_length);
}

namespace pq::exporter {
namespace {

using formats::GroupCodec;
using formats::GroupLayout;
using formats::GroupScale;
using formats::Shape2D;

// U upper triangular with U^T U = H^-1, row-major, zero below the diagonal: GPTQ's "Cholesky
// inverse" (the reference computes cholesky(H), cholesky_inverse, cholesky(upper=True): 4/3 n^3).
// With J the reversal permutation, J H J = R R^T (R lower) gives H^-1 = (J R^-1 J)^T (J R^-1 J),
// and J R^-1 J is upper triangular with a positive diagonal, so by the uniqueness of the Cholesky
// factor it is U: one Cholesky and one triangular inverse, 2/3 n^3. For a row-major buffer,
// reversing the flat array is J H J. nullopt when H is not numerically positive definite.
std::optional<std::vector<double>> inverse_cholesky_upper(std::vector<double> h, int n) {
  std::reverse(h.begin(), h.end());
  // LAPACK is column-major: its upper factor Uc (A = Uc^T Uc) is, read row-major, R = Uc^T lower
  // with A = R R^T; dtrtri of Uc leaves Uc^-1, read row-major (Uc^T)^-1 = R^-1.
  int info = 0;
  dpotrf_("U", &n, h.data(), &n, &info, 1);
  if (info != 0) return std::nullopt;
  dtrtri_("U", "N", &n, h.data(), &n, &info, 1, 1);
  if (info != 0) return std::nullopt;
  std::reverse(h.begin(), h.end());
  for (int r = 1; r < n; ++r) std::fill_n(h.data() + static_cast<std::size_t>(r) * n, r, 0.0);
  for (int r = 0; r < n; ++r) {
    const double d = h[static_cast<std::size_t>(r) * n + r];
    if (!(d > 0.0) || !std::isfinite(d)) return std::nullopt;
  }
  return h;
}

// The scale units of a layout: row blocks of scale_rows rows times column groups.
struct Units {
  std::int64_t groups = 0;      // column groups per row
  std::int64_t row_blocks = 0;  // blocks of scale_rows rows
  std::int64_t scale_rows = 1;

  Units(Shape2D shape, const GroupLayout& layout)
      : groups(shape.in / layout.group_size),
        row_blocks((shape.out + layout.scale_rows - 1) / layout.scale_rows),
        scale_rows(layout.scale_rows) {}
};

// Chooses the scales of column group g from its values as they are now, column c of the group
// at cols[c * out .. c * out + out). Per scale unit: the nearest-rounding scale of the unit's
// amax, or with the sweep the candidate scale around that amax whose rounding of these values
// has the lowest sum_j E[x_j^2] (v_j - q_j)^2 (with `block`, the group's [group_size,
// group_size] block B of the damped Hessian: the lowest d^T B d summed over the unit's rows),
// kept only when strictly lower than the nearest scale's. Sets every (row, g) entry; returns how
// many units the sweep changed.
std::int64_t choose_group_scales(const GroupCodec& codec, const Units& units, std::int64_t out,
                                 std::int64_t group_size, std::int64_t g, const double* cols,
                                 std::span<const float> moment, std::span<const double> block,
                                 const GptqOptions& options, std::span<GroupScale> scales) {
  // The group as rows of group_size values, the layout quantize_rows takes.
  std::vector<float> values(static_cast<std::size_t>(out * group_size));
  for (std::int64_t c = 0; c < group_size; ++c) {
    for (std::int64_t r = 0; r < out; ++r) {
      values[r * group_size + c] = static_cast<float>(cols[c * out + r]);
    }
  }
  std::vector<float> amax(units.row_blocks, 0.0f);
  for (std::int64_t r = 0; r < out; ++r) {
    const std::span<const float> row(values.data() + r * group_size, group_size);
    float& unit_amax = amax[r / units.scale_rows];
    unit_amax = std::max(unit_amax, std::bit_cast<float>(formats::max_abs_bits(row)));
  }
  std::vector<GroupScale> row_scales(out);
  for (std::int64_t r = 0; r < out; ++r) {
    row_scales[r] = codec.scale_for_amax(amax[r / units.scale_rows]);
  }

  std::int64_t changed = 0;
  if (options.scale_sweep) {
    // Every unit's candidates, tried one index at a time over the whole group (the SIMD row
    // quantizer); units with fewer distinct candidates repeat their last one.
    std::vector<std::vector<GroupScale>> candidates(units.row_blocks);
    std::size_t passes = 0;
    for (std::int64_t rb = 0; rb < units.row_blocks; ++rb) {
      candidates[rb] = codec.candidate_scales(amax[rb], options.sweep_candidates, options.sweep_lo,
                                              options.sweep_hi);
      passes = std::max(passes, candidates[rb].size());
    }
    std::vector<float> dequantized(values.size());
    std::vector<double> objective(units.row_blocks);
    const auto evaluate = [&](std::span<GroupScale> trial) {
      formats::quantize_rows(codec, {.weights = values,
                                     .cols = group_size,
                                     .group_size = group_size,
                                     .scales_given = true,
                                     .scales = trial,
                                     .dequantized = dequantized});
      std::fill(objective.begin(), objective.end(), 0.0);
      for (std::int64_t r = 0; r < out; ++r) {
        const std::span<const float> v(values.data() + r * group_size, group_size);
        const std::span<const float> q(dequantized.data() + r * group_size, group_size);
        double sum = 0.0;
        if (!block.empty()) {
          sum = local_hessian_objective(v, q, block);
        } else {
          for (std::int64_t c = 0; c < group_size; ++c) {
            const double d = double{v[c]} - q[c];
            sum += moment[c] * d * d;
          }
        }
        objective[r / units.scale_rows] += sum;
      }
    };
    evaluate(row_scales);
    std::vector<double> best = objective;
    std::vector<GroupScale> chosen(units.row_blocks);
    for (std::int64_t rb = 0; rb < units.row_blocks; ++rb) {
      chosen[rb] = row_scales[rb * units.scale_rows];
    }
    const std::vector<GroupScale> nearest = chosen;
    std::vector<GroupScale> trial(out);
    for (std::size_t k = 0; k < passes; ++k) {
      for (std::int64_t r = 0; r < out; ++r) {
        const auto& list = candidates[r / units.scale_rows];
        trial[r] = list[std::min(k, list.size() - 1)];
      }
      evaluate(trial);
      for (std::int64_t rb = 0; rb < units.row_blocks; ++rb) {
        if (objective[rb] < best[rb]) {
          best[rb] = objective[rb];
          chosen[rb] = trial[rb * units.scale_rows];
        }
      }
    }
    for (std::int64_t rb = 0; rb < units.row_blocks; ++rb) {
      changed += chosen[rb] == nearest[rb] ? 0 : 1;
    }
    for (std::int64_t r = 0; r < out; ++r) row_scales[r] = chosen[r / units.scale_rows];
  }
  for (std::int64_t r = 0; r < out; ++r) scales[r * units.groups + g] = row_scales[r];
  return changed;
}

// Columns per lazy batch such that every group starts a batch: a group's scale is then fixed
// from weights that hold every update of the columns before it.
std::int64_t batch_columns(std::int64_t requested, std::int64_t group_size, std::int64_t in) {
  if (group_size <= requested) return requested / group_size * group_size;
  if (group_size >= in || group_size % requested == 0) return requested;
  return group_size;
}

// Rows per block of the GPTQ pass (gptq_round runs blocks in parallel).
constexpr std::int64_t kRowsPerBlock = 128;

struct BlockResult {
  std::int64_t groups_rescaled = 0;
  double damped_error = 0.0;
  double added_error = 0.0;
};

// GPTQ of rows [r0, r0 + rows) of w: writes their codes and scales into `result` and returns
// their share of the rescaled units and of the output error. With U upper triangular, U^T U the
// inverse of the damped Hessian H', the pass's error terms err_p = (v_p - q_p) / U_pp sum to
// tr(dW H' dW^T) exactly (each is the OBS loss of fixing one column, Frantar et al. 2022 eq. 3,
// with the later columns updated optimally), so the output error needs no GEMM with H.
BlockResult gptq_round_rows(std::span<const float> w, Shape2D shape, const GroupLayout& layout,
                            const CalibrationStatistics& stats, const HessianFactor& factor,
                            const GptqOptions& options, std::int64_t batch, std::int64_t r0,
                            std::int64_t rows, GroupedWeight& result) {
  const std::int64_t in = shape.in;
  const std::int64_t group_size = layout.group_size;
  const GroupCodec& codec = layout.codec;
  const Units units({rows, in}, layout);
  const auto n = static_cast<std::size_t>(in);
  const auto m = static_cast<std::size_t>(rows);
  const std::vector<std::int64_t>& order = factor.order;
  const std::vector<double>& u = factor.u;
  const float* w0 = w.data() + r0 * in;
  const std::span<GroupScale> scales(result.scales.data() + r0 * units.groups, m * units.groups);
  std::uint8_t* codes = result.codes.data() + r0 * in;
  BlockResult block;

  // Working weights transposed, one contiguous row per column, in processing order.
  std::vector<double> wt(n * m);
  for (std::size_t p = 0; p < n; ++p) {
    for (std::size_t r = 0; r < m; ++r) wt[p * m + r] = w0[r * n + order[p]];
  }
  // The sweep's block of the damped Hessian for group g (empty: the diagonal objective). The
  // damping is the factor's (added_diagonal, in processing order: the original order without
  // act_order).
  std::vector<double> sweep_blocks;
  if (options.scale_sweep && options.sweep_local_hessian && !options.act_order &&
      group_size <= 64) {
    const std::int64_t g2 = group_size * group_size;
    sweep_blocks.resize(static_cast<std::size_t>(units.groups * g2));
    for (std::int64_t g = 0; g < units.groups; ++g) {
      for (std::int64_t a = 0; a < group_size; ++a) {
        const std::int64_t ja = g * group_size + a;
        for (std::int64_t b = 0; b < group_size; ++b) {
          const std::int64_t jb = g * group_size + b;
          sweep_blocks[g * g2 + a * group_size + b] =
              stats.hessian[ja * in + jb] + (a == b ? factor.added_diagonal[ja] : 0.0);
        }
      }
    }
  }
  const auto sweep_block = [&](std::int64_t g) -> std::span<const double> {
    if (sweep_blocks.empty()) return {};
    const auto g2 = static_cast<std::size_t>(group_size * group_size);
    return {sweep_blocks.data() + g * g2, g2};
  };
  // With act_order every group's scale comes from the original weights before the pass (static
  // groups, reference --static-groups); otherwise when the pass reaches the group's first column.
  if (options.act_order) {
    std::vector<double> original(n * m);
    for (std::size_t r = 0; r < m; ++r) {
      for (std::size_t c = 0; c < n; ++c) original[c * m + r] = w0[r * n + c];
    }
    for (std::int64_t g = 0; g < units.groups; ++g) {
      block.groups_rescaled += choose_group_scales(
          codec, units, rows, group_size, g, original.data() + g * group_size * m,
          stats.act_second_moment.subspan(g * group_size, group_size), sweep_block(g), options,
          scales);
    }
  }

  std::vector<double> errors(static_cast<std::size_t>(batch) * m);
  // One column at a time: its values in f32, each row's step in the column's group, its codes
  // and their values.
  std::vector<float> x(m), steps(m), dequantized(m);
  std::vector<std::uint8_t> column_codes(m);
  std::int64_t steps_group = -1;
  for (std::int64_t i1 = 0; i1 < in; i1 += batch) {
    const std::int64_t i2 = std::min(in, i1 + batch);
    for (std::int64_t p = i1; p < i2; ++p) {
      const std::int64_t j = order[p];
      const std::int64_t g = j / group_size;
      double* column = wt.data() + p * m;
      if (!options.act_order && j % group_size == 0) {
        block.groups_rescaled +=
            choose_group_scales(codec, units, rows, group_size, g, column,
                                stats.act_second_moment.subspan(g * group_size, group_size),
                                sweep_block(g), options, scales);
        steps_group = -1;
      }
      if (g != steps_group) {
        for (std::size_t r = 0; r < m; ++r) steps[r] = scales[r * units.groups + g].step;
        steps_group = g;
      }
      for (std::size_t r = 0; r < m; ++r) x[r] = static_cast<float>(column[r]);
      formats::quantize_with_steps(codec, x, steps, column_codes, dequantized);
      const double d = u[p * n + p];
      const double added = factor.added_diagonal[p];
      double* error = errors.data() + (p - i1) * m;
      for (std::size_t r = 0; r < m; ++r) {
        const double q = dequantized[r];
        codes[r * n + j] = column_codes[r];
        error[r] = (column[r] - q) / d;
        block.damped_error += error[r] * error[r];
        const double dw = q - double{w0[r * n + j]};
        block.added_error += added * dw * dw;
      }
      // OBS update of the batch's later columns (a rank-1 update, Wt[k] -= U[p, k] err for
      // p < k < i2); the rest of the matrix lazily below.
      if (p + 1 < i2) {
        cblas_dger(CblasRowMajor, static_cast<int>(i2 - p - 1), static_cast<int>(m), -1.0,
                   u.data() + p * n + p + 1, 1, error, 1, wt.data() + (p + 1) * m,
                   static_cast<int>(m));
      }
    }
    if (i2 < in) {
      // W[:, i2:] -= Err[:, i1:i2] U[i1:i2, i2:], transposed: Wt[i2:] -= U[i1:i2, i2:]^T Err.
      cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, static_cast<int>(in - i2),
                  static_cast<int>(m), static_cast<int>(i2 - i1), -1.0, u.data() + i1 * n + i2,
                  static_cast<int>(n), errors.data(), static_cast<int>(m), 1.0, wt.data() + i2 * m,
                  static_cast<int>(m));
    }
  }
  return block;
}

void check_statistics(const CalibrationStatistics& stats, Shape2D shape) {
  const auto in = static_cast<std::size_t>(shape.in);
  PQ_CHECK(stats.hessian.size() == in * in && stats.act_second_moment.size() == in,
           "calibration statistics of {} and {} values do not fit an input of {} features",
           stats.hessian.size(), stats.act_second_moment.size(), shape.in);
  PQ_CHECK(stats.tokens > 0, "calibration statistics over {} tokens", stats.tokens);
}

void warn(std::string_view linear, std::string_view why) {
  fmt::print(stderr, "warning: {}: {}; rounded to nearest instead of GPTQ\n", linear, why);
}

}  // namespace

StatisticsProvider statistics_from_probe(const probe::ProbeResult& probe) {
  return [&probe](const model::Linear& linear) -> std::optional<CalibrationStatistics> {
    const std::string key = probe::input_key(linear);
    const bool measured =
        std::any_of(probe.linears().begin(), probe.linears().end(),
                    [&](const probe::ProbedLinear& p) { return p.input_key == key; });
    if (!measured) return std::nullopt;
    return CalibrationStatistics{probe.hessian(key),           probe.input_tokens(key),
                                 probe.act_second_moment(key), key,
                                 probe.holdout_hessian(key),   probe.holdout_tokens(key)};
  };
}

std::optional<HessianFactor> factor_hessian(const CalibrationStatistics& stats, std::int64_t in,
                                            const GptqOptions& options) {
  PQ_CHECK(in > 0 && options.damp >= 0.0, "GPTQ: {} input features, damping {}", in, options.damp);
  const auto n = static_cast<std::size_t>(in);
  PQ_CHECK(stats.hessian.size() == n * n && stats.act_second_moment.size() == n,
           "calibration statistics of {} and {} values do not fit an input of {} features",
           stats.hessian.size(), stats.act_second_moment.size(), in);
  if (formats::max_abs_bits(stats.hessian) >= 0x7F800000u) return std::nullopt;
  // H in double. A dead input (H_jj == 0: zero in every calibration token) gets H_jj = 1, as in
  // the reference, so H stays invertible and the column's error propagates nowhere. Unlike the
  // reference we keep the column's weights (rounded to nearest) instead of zeroing them: the
  // calibration set says nothing about that input, and zeroing would delete it for every input
  // that does use it.
  std::vector<double> h(stats.hessian.begin(), stats.hessian.end());
  std::vector<double> added(n, 0.0);
  double diag_sum = 0.0;
  for (std::size_t j = 0; j < n; ++j) {
    double& hjj = h[j * n + j];
    if (hjj == 0.0) hjj = added[j] = 1.0;
    diag_sum += hjj;
  }
  const double damp = options.damp * diag_sum / static_cast<double>(n);
  for (std::size_t j = 0; j < n; ++j) {
    h[j * n + j] += damp;
    added[j] += damp;
  }

  // Column order: original, or descending diag(H) (ties by index) with act_order.
  HessianFactor factor;
  factor.order.resize(n);
  std::iota(factor.order.begin(), factor.order.end(), 0);
  if (options.act_order) {
    std::stable_sort(factor.order.begin(), factor.order.end(),
                     [&](std::int64_t a, std::int64_t b) { return h[a * n + a] > h[b * n + b]; });
    std::vector<double> permuted(n * n);
    for (std::size_t a = 0; a < n; ++a) {
      for (std::size_t b = 0; b < n; ++b) {
        permuted[a * n + b] = h[factor.order[a] * n + factor.order[b]];
      }
    }
    h = std::move(permuted);
  }
  std::optional<std::vector<double>> u = inverse_cholesky_upper(std::move(h), static_cast<int>(n));
  if (!u) return std::nullopt;
  factor.u = std::move(*u);
  factor.added_diagonal.resize(n);
  for (std::size_t p = 0; p < n; ++p) factor.added_diagonal[p] = added[factor.order[p]];
  return factor;
}

std::optional<GroupedWeight> gptq_round(std::span<const float> w, Shape2D shape,
                                        const GroupLayout& layout,
                                        const CalibrationStatistics& stats,
                                        const GptqOptions& options) {
  PQ_CHECK(shape.in > 0 && w.size() == static_cast<std::size_t>(shape.numel()),
           "GPTQ: {} values for weight shape [{}, {}]", w.size(), shape.out, shape.in);
  PQ_CHECK(formats::max_abs_bits(w) < 0x7F800000u, "GPTQ: the weight holds Inf or NaN");
  check_statistics(stats, shape);
  const std::optional<HessianFactor> factor = factor_hessian(stats, shape.in, options);
  if (!factor) return std::nullopt;
  return gptq_round(w, shape, layout, stats, *factor, options);
}

GroupedWeight gptq_round(std::span<const float> w, Shape2D shape, const GroupLayout& layout,
                         const CalibrationStatistics& stats, const HessianFactor& factor,
                         const GptqOptions& options) {
  const std::int64_t out = shape.out;
  const std::int64_t in = shape.in;
  const std::int64_t group_size = layout.group_size;
  PQ_CHECK(out > 0 && in > 0 && w.size() == static_cast<std::size_t>(shape.numel()),
           "GPTQ: {} values for weight shape [{}, {}]", w.size(), out, in);
  PQ_CHECK(group_size > 0 && in % group_size == 0 && layout.scale_rows > 0,
           "GPTQ: {} columns do not split into groups of {}", in, group_size);
  PQ_CHECK(options.block_size > 0 && options.damp >= 0.0, "GPTQ: block size {}, damping {}",
           options.block_size, options.damp);
  PQ_CHECK(formats::max_abs_bits(w) < 0x7F800000u, "GPTQ: the weight holds Inf or NaN");
  check_statistics(stats, shape);
  const Units units(shape, layout);
  const auto n = static_cast<std::size_t>(in);
  const auto m = static_cast<std::size_t>(out);
  PQ_CHECK(
      factor.order.size() == n && factor.u.size() == n * n && factor.added_diagonal.size() == n,
      "GPTQ: a Hessian factor of {} columns for an input of {} features", factor.order.size(), in);

  GroupedWeight result;
  result.codes.resize(n * m);
  result.scales.resize(m * units.groups);
  const std::int64_t batch =
      options.act_order ? options.block_size : batch_columns(options.block_size, group_size, in);
  // Rows are independent in GPTQ (a row's rounding error only updates that row's later columns),
  // so blocks of rows run in parallel. The block size is fixed, not one block per thread, so the
  // arithmetic and the bytes do not depend on the thread count; it is a multiple of the layout's
  // scale rows so that no scale unit spans two blocks.
  const std::int64_t block_rows =
      (kRowsPerBlock + layout.scale_rows - 1) / layout.scale_rows * layout.scale_rows;
  const std::int64_t blocks = (out + block_rows - 1) / block_rows;
  // Per-block sums, added in block order afterwards so that the totals do not depend on which
  // thread ran which block.
  std::vector<BlockResult> block_results(static_cast<std::size_t>(blocks));
  std::exception_ptr failure;
#pragma omp parallel for schedule(dynamic, 1)
  for (std::int64_t b = 0; b < blocks; ++b) {
    try {
      const std::int64_t r0 = b * block_rows;
      block_results[b] = gptq_round_rows(w, shape, layout, stats, factor, options, batch, r0,
                                         std::min(out, r0 + block_rows) - r0, result);
    } catch (...) {
#pragma omp critical(pq_gptq_failure)
      if (!failure) failure = std::current_exception();
    }
  }
  if (failure) std::rethrow_exception(failure);
  double damped_error = 0.0;  // the OBS error terms: tr(dW H' dW^T), H' damped
  double added_error = 0.0;   // sum_j added_j |dW_j|^2: what damping and dead inputs add to it
  for (const BlockResult& block : block_results) {
    result.groups_rescaled += block.groups_rescaled;
    damped_error += block.damped_error;
    added_error += block.added_error;
  }
  result.output_error = std::max(0.0, damped_error - added_error);
  return result;
}

double output_mse(std::span<const float> w, std::span<const float> quantized, Shape2D shape,
                  const CalibrationStatistics& stats) {
  check_statistics(stats, shape);
  const cost::LinearStatistics linear{0.0, stats.act_second_moment, stats.hessian, stats.tokens};
  return cost::measure_errors(w, quantized, shape, linear).output_mse;
}

std::optional<double> RoundingReport::ratio() const {
  if (!output_mse || !nearest_output_mse || *nearest_output_mse <= 0.0) return std::nullopt;
  return *output_mse / *nearest_output_mse;
}

nlohmann::json to_json(const RoundingReport& report) {
  const auto optional_number = [](const std::optional<double>& v) {
    return v ? nlohmann::json(*v) : nlohmann::json(nullptr);
  };
  nlohmann::json j = {{"linear", report.linear},
                      {"format", report.format},
                      {"method", report.method},
                      {"nearest_output_mse", optional_number(report.nearest_output_mse)},
                      {"output_mse", optional_number(report.output_mse)},
                      {"ratio", optional_number(report.ratio())},
                      {"groups_rescaled", report.groups_rescaled}};
  if (!report.fallback.empty()) j["fallback"] = report.fallback;
  if (!report.candidates.empty()) j["candidates"] = report.candidates;
  if (report.holdout_tokens > 0) {
    j["holdout_tokens"] = report.holdout_tokens;
    j["holdout_candidates"] = report.holdout_candidates;
  }
  return j;
}

RoundingReport rounding_report_from_json(const nlohmann::json& j) {
  const auto optional_number = [&](const char* key) -> std::optional<double> {
    const nlohmann::json& v = j.at(key);
    if (v.is_null()) return std::nullopt;
    return v.get<double>();
  };
  try {
    RoundingReport report;
    report.linear = j.at("linear").get<std::string>();
    report.format = j.at("format").get<std::string>();
    report.method = j.at("method").get<std::string>();
    report.fallback = j.value("fallback", std::string());
    report.nearest_output_mse = optional_number("nearest_output_mse");
    report.output_mse = optional_number("output_mse");
    report.groups_rescaled = j.at("groups_rescaled").get<std::int64_t>();
    if (j.contains("candidates")) {
      report.candidates = j.at("candidates").get<std::map<std::string, double>>();
    }
    report.holdout_tokens = j.value("holdout_tokens", std::int64_t{0});
    if (j.contains("holdout_candidates")) {
      report.holdout_candidates = j.at("holdout_candidates").get<std::map<std::string, double>>();
    }
    return report;
  } catch (const nlohmann::json::exception& e) {
    fail("not a GPTQ rounding report: {}", e.what());
  }
}

GptqRounding::GptqRounding(StatisticsProvider statistics, GptqOptions options,
                           std::string statistics_fingerprint)
    : statistics_(std::move(statistics)),
      options_(options),
      statistics_fingerprint_(std::move(statistics_fingerprint)) {
  PQ_CHECK(static_cast<bool>(statistics_), "GPTQ needs a calibration statistics provider");
  PQ_CHECK(options_.damp >= 0.0 && std::isfinite(options_.damp),
           "GPTQ damping {} is not a non-negative number", options_.damp);
  PQ_CHECK(options_.block_size > 0, "GPTQ block size {} is not positive", options_.block_size);
  PQ_CHECK(options_.min_tokens >= 1, "GPTQ minimum token count {} is not positive",
           options_.min_tokens);
  PQ_CHECK(options_.gptq || options_.local_hessian,
           "GPTQ rounding with neither GPTQ nor Local-Hessian renders to try");
  PQ_CHECK(options_.local_hessian_e4m3_bracket >= 0 && options_.local_hessian_e8m0_bracket >= 0,
           "Local-Hessian brackets {} and {} are not non-negative",
           options_.local_hessian_e4m3_bracket, options_.local_hessian_e8m0_bracket);
  PQ_CHECK(options_.sweep_candidates >= 1 && options_.sweep_lo > 0.0f &&
               options_.sweep_lo <= options_.sweep_hi,
           "scale sweep needs at least one candidate over 0 < lo <= hi (got {} over [{}, {}])",
           options_.sweep_candidates, options_.sweep_lo, options_.sweep_hi);
}

std::string_view GptqRounding::name() const {
  if (!options_.local_hessian) return "gptq";
  return options_.gptq ? "gptq+local-hessian" : "local-hessian";
}

std::string GptqRounding::fingerprint() const {
  // Floats by their bit patterns: "0.01" and "0.010000000000000002" must differ. GPTQ alone keeps
  // the fingerprint it had before Local-Hessian existed, so existing render caches stay valid.
  std::string renders;
  if (options_.sweep_local_hessian) renders = " sweep_objective=local_hessian";
  if (options_.local_hessian) {
    renders +=
        fmt::format(" gptq={} local_hessian=e4m3:{},e8m0:{}", options_.gptq,
                    options_.local_hessian_e4m3_bracket, options_.local_hessian_e8m0_bracket);
  }
  return fmt::format(
      "gptq/1 damp={:016x} block={} min_tokens={} act_order={} sweep={} candidates={} "
      "lo={:08x} hi={:08x}{} statistics={}",
      std::bit_cast<std::uint64_t>(options_.damp), options_.block_size, options_.min_tokens,
      options_.act_order, options_.scale_sweep, options_.sweep_candidates,
      std::bit_cast<std::uint32_t>(options_.sweep_lo),
      std::bit_cast<std::uint32_t>(options_.sweep_hi), renders, statistics_fingerprint_);
}

GptqRounding::ThreadState& GptqRounding::thread_state() const {
  const std::lock_guard lock(mutex_);
  return states_[std::this_thread::get_id()];
}

const std::optional<HessianFactor>& GptqRounding::factor(const CalibrationStatistics& stats,
                                                         std::int64_t in, std::size_t keep) const {
  std::vector<KeptFactor>& factors = thread_state().factors;
  if (!stats.key.empty()) {
    for (const KeptFactor& kept : factors) {
      if (kept.key == stats.key && kept.in == in) return kept.factor;
    }
  }
  // Free the oldest before factoring the next: memory holds at most `keep` factors per thread.
  while (!factors.empty() && factors.size() >= keep) factors.erase(factors.begin());
  factors.push_back({stats.key, in, factor_hessian(stats, in, options_)});
  ++factorizations_;
  return factors.back().factor;
}

CalibrationStatistics GptqRounding::fitting_statistics(const CalibrationStatistics& stats) const {
  ThreadState& state = thread_state();
  const std::string key = stats.key.empty() ? std::string() : stats.key + "/fitting";
  const std::size_t n = stats.act_second_moment.size();
  if (key.empty() || key != state.fitting_key || state.fitting_moment.size() != n) {
    state.fitting_key.clear();
    state.fitting_hessian.resize(stats.hessian.size());
    for (std::size_t k = 0; k < stats.hessian.size(); ++k) {
      state.fitting_hessian[k] = stats.hessian[k] - stats.holdout_hessian[k];
    }
    const auto tokens = static_cast<float>(stats.tokens - stats.holdout_tokens);
    state.fitting_moment.resize(n);
    for (std::size_t j = 0; j < n; ++j) {
      state.fitting_moment[j] = state.fitting_hessian[j * n + j] / tokens;
    }
    state.fitting_key = key;
  }
  return CalibrationStatistics{.hessian = state.fitting_hessian,
                               .tokens = stats.tokens - stats.holdout_tokens,
                               .act_second_moment = state.fitting_moment,
                               .key = key};
}

std::string GptqRounding::method_name(Render render) const {
  if (render == Render::kLocalHessian) return "local-hessian";
  if (!options_.scale_sweep) return "gptq";
  return options_.sweep_local_hessian ? "gptq+local-hessian-sweep" : "gptq+sweep";
}

std::optional<GroupedWeight> GptqRounding::render(Render render, const LinearToEncode& job,
                                                  const formats::GroupLayout& layout,
                                                  const CalibrationStatistics& stats,
                                                  std::size_t keep,
                                                  std::vector<std::string>& skipped) const {
  if (render == Render::kGptq) {
    const std::optional<HessianFactor>& factor = this->factor(stats, job.shape.in, keep);
    if (factor) return gptq_round(job.weight, job.shape, layout, stats, *factor, options_);
    skipped.emplace_back("the damped Hessian is not positive definite or not finite");
    warn(job.linear.name, skipped.back());
    return std::nullopt;
  }
  if (!local_hessian_applies(layout)) {
    skipped.emplace_back("Local-Hessian renders NVFP4 and MX group scales only");
    return std::nullopt;
  }
  const LocalHessianOptions local{.damp = options_.damp,
                                  .e4m3_bracket = options_.local_hessian_e4m3_bracket,
                                  .e8m0_bracket = options_.local_hessian_e8m0_bracket};
  std::optional<GroupedWeight> grouped =
      local_hessian_round(job.weight, job.shape, layout, stats, local);
  if (!grouped) skipped.emplace_back("the Hessian is not finite");
  return grouped;
}

nlohmann::json GptqRounding::encoding_report(std::string_view linear,
                                             std::string_view format) const {
  const std::lock_guard lock(mutex_);
  const auto it = report_index_.find({std::string(linear), std::string(format)});
  if (it == report_index_.end()) return nullptr;
  return to_json(reports_[it->second]);
}

void GptqRounding::restore_report(const nlohmann::json& entry) const {
  if (!entry.is_null()) record(rounding_report_from_json(entry));
}

void GptqRounding::record(RoundingReport report) const {
  const std::lock_guard lock(mutex_);
  const auto [it, added] =
      report_index_.try_emplace({report.linear, report.format}, reports_.size());
  if (added) {
    reports_.push_back(std::move(report));
  } else {
    reports_[it->second] = std::move(report);
  }
}

formats::EncodedWeight GptqRounding::encode(const LinearToEncode& job) const {
  RoundingReport report;
  report.linear = job.linear.name;
  report.format = std::string(job.format.name());
  report.method = "nearest";

  // NVFP4's global scale stays as given (fused siblings share it); otherwise the tensor's own,
  // which is what quantize() would use.
  formats::QuantizeOptions options = job.options;
  const float global = options.weight_global_scale.value_or(formats::nvfp4_weight_global_scale(
      std::bit_cast<float>(formats::max_abs_bits(job.weight)), options.nvfp4_scales));
  formats::QuantizeOptions layout_options = options;
  layout_options.weight_global_scale = global;
  const std::optional<GroupLayout> layout = job.format.group_layout(job.shape, layout_options);
  if (!layout) {
    report.fallback = "the format has no group layout";
    record(report);
    return job.format.quantize(job.weight, job.shape, job.options);
  }
  if (layout->codec.scale_spec().kind == formats::ScaleKind::kE4M3OverGlobal) {
    options.weight_global_scale = global;
  }

  const std::optional<CalibrationStatistics> stats =
      job.statistics != nullptr ? std::optional(*job.statistics) : statistics_(job.linear);
  // A probe without Hessians (probe --no-hessians) leaves the renders to the kl-fisher cost,
  // which makes every one its menu offers; anything else has nothing to fit.
  PQ_CHECK(!stats || stats->tokens == 0 || !stats->hessian.empty(),
           "{} in {}: GPTQ needs the Hessian of its input, which the probe did not store "
           "(probe --no-hessians) and the render cache does not hold this render: run cost "
           "--objective kl-fisher with {} in its menu first, or probe with Hessians",
           job.linear.name, job.format.name(), job.format.name());
  if (!stats || stats->tokens == 0) {
    // A MoE expert no calibration token was routed to has statistics over zero tokens.
    report.fallback = "no calibration statistics";
    warn(job.linear.name, report.fallback);
    record(report);
    return job.format.quantize(job.weight, job.shape, job.options);
  }

  formats::EncodedWeight nearest = job.format.quantize(job.weight, job.shape, options);
  report.nearest_output_mse =
      output_mse(job.weight, job.format.dequantize(nearest), job.shape, *stats);
  if (stats->tokens < options_.min_tokens) {
    report.fallback = fmt::format("{} calibration tokens, fewer than GPTQ's minimum {}",
                                  stats->tokens, options_.min_tokens);
    report.output_mse = report.nearest_output_mse;
    record(report);
    return nearest;
  }
  PQ_CHECK(formats::max_abs_bits(job.weight) < 0x7F800000u, "GPTQ: the weight holds Inf or NaN");

  std::vector<Render> renders;
  if (options_.gptq) renders.push_back(Render::kGptq);
  if (options_.local_hessian) renders.push_back(Render::kLocalHessian);
  std::vector<std::string> skipped;
  const auto calibration_mse = [&](const GroupedWeight& grouped, const CalibrationStatistics& s) {
    return grouped.output_error /
           (static_cast<double>(s.tokens) * static_cast<double>(job.shape.out));
  };

  PQ_CHECK(stats->holdout_tokens == 0 || (stats->holdout_hessian.size() == stats->hessian.size() &&
                                          stats->holdout_tokens <= stats->tokens),
           "{}: held-out statistics of {} values over {} rows do not fit {} values over {}",
           job.linear.name, stats->holdout_hessian.size(), stats->holdout_tokens,
           stats->hessian.size(), stats->tokens);
  if (stats->holdout_tokens > 0 && stats->tokens - stats->holdout_tokens >= options_.min_tokens) {
    // Choose on the held-out rows what was fitted without them, then render the winner on all.
    report.holdout_tokens = stats->holdout_tokens;
    const CalibrationStatistics holdout{.hessian = stats->holdout_hessian,
                                        .tokens = stats->holdout_tokens,
                                        .act_second_moment = stats->act_second_moment};
    const CalibrationStatistics fitting = fitting_statistics(*stats);
    double best_holdout =
        output_mse(job.weight, job.format.dequantize(nearest), job.shape, holdout);
    report.holdout_candidates["nearest"] = best_holdout;
    std::optional<Render> winner;
    for (const Render r : renders) {
      const std::optional<GroupedWeight> grouped = render(r, job, *layout, fitting, 2, skipped);
      if (!grouped) continue;
      const formats::EncodedWeight encoded =
          job.format.encode_groups(grouped->codes, grouped->scales, job.shape, options);
      const double mse = output_mse(job.weight, job.format.dequantize(encoded), job.shape, holdout);
      report.holdout_candidates[method_name(r)] = mse;
      if (mse < best_holdout) {
        best_holdout = mse;
        winner = r;
      }
    }
    if (winner) {
      if (std::optional<GroupedWeight> grouped =
              render(*winner, job, *layout, *stats, 2, skipped)) {
        report.method = method_name(*winner);
        report.output_mse = report.candidates[report.method] = calibration_mse(*grouped, *stats);
        report.groups_rescaled = grouped->groups_rescaled;
        record(report);
        return job.format.encode_groups(grouped->codes, grouped->scales, job.shape, options);
      }
    } else {
      skipped.emplace_back("no render fitted without the held-out rows lowered their output error");
    }
    report.output_mse = report.nearest_output_mse;
    report.fallback = fmt::format("{}", fmt::join(skipped, "; "));
    record(report);
    return nearest;
  }

  // Every render tried; the stored weight is the one with the lowest calibration output error,
  // round-to-nearest unless one is strictly lower.
  std::optional<formats::EncodedWeight> best;
  double best_mse = *report.nearest_output_mse;
  std::vector<std::string> tried;
  for (const Render r : renders) {
    const std::optional<GroupedWeight> grouped = render(r, job, *layout, *stats, 1, skipped);
    if (!grouped) continue;
    const std::string method = method_name(r);
    const double mse = calibration_mse(*grouped, *stats);
    report.candidates[method] = mse;
    tried.push_back(method);
    if (mse >= best_mse) continue;
    best_mse = mse;
    best = job.format.encode_groups(grouped->codes, grouped->scales, job.shape, options);
    report.method = method;
    report.groups_rescaled = grouped->groups_rescaled;
  }
  report.output_mse = best_mse;
  if (best) {
    record(report);
    return std::move(*best);
  }
  // GPTQ minimises this very error, so losing to nearest rounding is rare (an H dominated by
  // damping); Local-Hessian keeps every group's nearest scale unless it lowers the group's error.
  for (const std::string& method : tried) {
    skipped.push_back(fmt::format("{} did not lower the calibration output error",
                                  method.starts_with("gptq") ? "GPTQ" : method));
  }
  report.fallback = fmt::format("{}", fmt::join(skipped, "; "));
  record(report);
  return nearest;
}

std::string GptqRounding::describe(const std::map<std::string, std::string>& format_of) const {
  const std::lock_guard lock(mutex_);
  std::map<std::string, std::int64_t> methods;
  std::int64_t ratios = 0;
  double log_ratio_sum = 0.0;
  std::map<std::string, std::int64_t> fallbacks;
  std::int64_t held_out = 0;
  for (const auto& [linear, format] : format_of) {
    const auto it = report_index_.find({linear, format});
    if (it == report_index_.end()) continue;
    const RoundingReport& report = reports_[it->second];
    if (report.holdout_tokens > 0) ++held_out;
    if (report.fallback.empty()) {
      ++methods[report.method];
    } else {
      ++fallbacks[report.fallback];
    }
    if (const std::optional<double> ratio = report.ratio(); ratio && *ratio > 0.0) {
      log_ratio_sum += std::log(*ratio);
      ++ratios;
    }
  }
  std::vector<std::string> renders;
  if (options_.gptq) {
    renders.push_back(fmt::format(
        "GPTQ (damping {}, blocks of {} columns{}){}", options_.damp, options_.block_size,
        options_.act_order ? ", activation order" : "",
        options_.scale_sweep
            ? fmt::format(
                  " with a per-group scale sweep ({} candidates in [{}, {}] x{})",
                  options_.sweep_candidates, options_.sweep_lo, options_.sweep_hi,
                  options_.sweep_local_hessian ? ", judged on the group's Hessian block" : "")
            : ""));
  }
  if (options_.local_hessian) {
    renders.emplace_back(
        "Local-Hessian group scales (NVFP4 and MX: per group the scale minimising the error "
        "under the group's block of the calibration Hessian)");
  }
  std::string text;
  if (renders.size() == 1) {
    std::int64_t rounded = 0;
    for (const auto& [method, count] : methods) rounded += count;
    text = fmt::format("{} rounded {} Linears with the calibration Hessians.", renders.front(),
                       rounded);
    if (held_out > 0) {
      text += fmt::format(
          " {} Linears kept it over round-to-nearest only if, fitted without the held-out "
          "calibration rows, it had the lower output error on them.",
          held_out);
    }
  } else {
    std::vector<std::string> counts;
    for (const auto& [method, count] : methods)
      counts.push_back(fmt::format("{} {}", count, method));
    text = fmt::format(
        "Each Linear stores whichever of {} and round-to-nearest has the lowest output error on "
        "{}: {}.",
        fmt::join(renders, " and "),
        held_out == 0 ? "the calibration Hessian"
                      : fmt::format("held-out calibration rows ({} Linears; the renders fitted "
                                    "without them, the winner rendered again on every row)",
                                    held_out),
        counts.empty() ? "none" : fmt::format("{}", fmt::join(counts, ", ")));
  }
  for (const auto& [why, count] : fallbacks) {
    text += fmt::format(" {} rounded to nearest: {}.", count, why);
  }
  if (ratios > 0) {
    text += fmt::format(
        " Calibration output error against round-to-nearest, geometric mean over {} Linears: "
        "{:.4f}x.",
        ratios, std::exp(log_ratio_sum / static_cast<double>(ratios)));
  }
  return text;
}

nlohmann::json GptqRounding::report(const std::map<std::string, std::string>& format_of) const {
  const std::lock_guard lock(mutex_);
  nlohmann::json linears = nlohmann::json::array();
  for (const auto& [linear, format] : format_of) {
    const auto it = report_index_.find({linear, format});
    if (it != report_index_.end()) linears.push_back(to_json(reports_[it->second]));
  }
  return {{"strategy", name()}, {"linears", std::move(linears)}};
}

std::unique_ptr<RoundingStrategy> make_rounding(std::string_view name,
                                                const probe::ProbeResult* probe) {
  if (name == "nearest") return std::make_unique<NearestRounding>();
  GptqOptions options;
  options.gptq = name == "gptq" || name == "gptq+local-hessian";
  options.local_hessian = name == "local-hessian" || name == "gptq+local-hessian";
  PQ_CHECK(options.gptq || options.local_hessian,
           "unknown rounding '{}' (known: gptq, local-hessian, gptq+local-hessian, nearest)", name);
  PQ_CHECK(probe != nullptr,
           "{} rounding needs the calibration Hessians of a probe (give the probe directory, or "
           "use nearest rounding)",
           name);
  return std::make_unique<GptqRounding>(statistics_from_probe(*probe), options,
                                        probe->fingerprint());
}

}  // namespace pq::exporter
