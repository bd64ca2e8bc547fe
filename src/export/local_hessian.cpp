// Local-Hessian rendering of NVFP4 and MX group scales: per group, the stored scale whose
// round-to-nearest codes minimise d^T H_g d with H_g the group's diagonal block of the
// calibration Hessian (the "local Hessian" scale search evaluated on Qwen3.5 W4A4 in the
// tracker's issue 15; the objective is the output error tr(dW H dW^T) restricted to one group).
#include "export/local_hessian.h"

#include <algorithm>
#include <bit>
#include <cstdint>
#include <vector>

#include "common/cpu_features.h"
#include "common/error.h"
#include "export/local_hessian_simd.h"

namespace pq::exporter {
namespace {

using formats::GroupCodec;
using formats::GroupLayout;
using formats::GroupScale;
using formats::ScaleKind;
using formats::Shape2D;

// The stored bytes tried for a group whose round-to-nearest scale is `nearest`, ascending.
std::vector<std::uint32_t> candidate_bytes(const GroupCodec& codec, const GroupScale& nearest,
                                           const LocalHessianOptions& options) {
  std::vector<std::uint32_t> bytes;
  const auto add_range = [&](std::int64_t lo, std::int64_t hi) {
    for (std::int64_t b = lo; b <= hi; ++b) bytes.push_back(static_cast<std::uint32_t>(b));
  };
  const auto stored = static_cast<std::int64_t>(nearest.stored);
  if (codec.scale_spec().kind == ScaleKind::kE4M3OverGlobal) {
    // A non-zero group never gets scale 0 (it would zero the group) nor one below the floor
    // (Marlin reads a subnormal E4M3 scale as about zero: ScaleSpec::min_e4m3_scale).
    const std::int64_t floor = std::max<std::int64_t>(1, codec.scale_spec().min_e4m3_scale);
    if (options.e4m3_bracket <= 0) {
      add_range(floor, 0x7E);
    } else {
      add_range(std::max(floor, stored - options.e4m3_bracket),
                std::min<std::int64_t>(0x7E, stored + options.e4m3_bracket));
    }
  } else {
    // E8M0 bytes 0..254 are the exponents -127..127; 255 is NaN.
    add_range(std::max<std::int64_t>(0, stored - options.e8m0_bracket),
              std::min<std::int64_t>(254, stored + options.e8m0_bracket));
  }
  return bytes;
}

}  // namespace

bool local_hessian_applies(const GroupLayout& layout) {
  const ScaleKind kind = layout.codec.scale_spec().kind;
  return layout.scales_from_group_amax && layout.scale_rows == 1 &&
         (kind == ScaleKind::kE4M3OverGlobal || kind == ScaleKind::kE8M0);
}

double local_hessian_objective(std::span<const float> x, std::span<const float> dequantized,
                               std::span<const double> block) {
  const std::size_t n = x.size();
  double d[64];
  PQ_CHECK(n <= 64 && dequantized.size() == n && block.size() == n * n,
           "local Hessian objective: {} values, {} dequantized, a block of {}", n,
           dequantized.size(), block.size());
  for (std::size_t i = 0; i < n; ++i) d[i] = double{dequantized[i]} - double{x[i]};
  // The blocks are copied from a symmetric Hessian, so the SIMD kernel may read column j as row j.
  if (n % 4 == 0 && cpu_features().has_avx2_fma()) {
    return simd::local_hessian_objective_avx2(d, block.data(), n);
  }
  double sum = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    double row = 0.0;
    for (std::size_t j = 0; j < n; ++j) row += block[i * n + j] * d[j];
    sum += d[i] * row;
  }
  return sum;
}

std::optional<GroupedWeight> local_hessian_round(std::span<const float> w, Shape2D shape,
                                                 const GroupLayout& layout,
                                                 const CalibrationStatistics& stats,
                                                 const LocalHessianOptions& options) {
  const std::int64_t out = shape.out;
  const std::int64_t in = shape.in;
  const std::int64_t group_size = layout.group_size;
  PQ_CHECK(out > 0 && in > 0 && w.size() == static_cast<std::size_t>(shape.numel()),
           "Local-Hessian: {} values for weight shape [{}, {}]", w.size(), out, in);
  PQ_CHECK(group_size > 0 && in % group_size == 0,
           "Local-Hessian: {} columns do not split into groups of {}", in, group_size);
  PQ_CHECK(formats::max_abs_bits(w) < 0x7F800000u, "Local-Hessian: the weight holds Inf or NaN");
  const auto n = static_cast<std::size_t>(in);
  PQ_CHECK(stats.hessian.size() == n * n && stats.tokens > 0,
           "Local-Hessian: a Hessian of {} values over {} tokens for an input of {} features",
           stats.hessian.size(), stats.tokens, in);
  PQ_CHECK(options.damp >= 0.0, "Local-Hessian: damping {}", options.damp);
  if (!local_hessian_applies(layout)) return std::nullopt;
  PQ_CHECK(group_size <= 64, "Local-Hessian: groups of {} columns (at most 64)", group_size);
  if (formats::max_abs_bits(stats.hessian) >= 0x7F800000u) return std::nullopt;

  // Every group's diagonal block of H + damp * mean(diag H) * I, in double.
  const std::int64_t groups = in / group_size;
  const auto g2 = static_cast<std::size_t>(group_size * group_size);
  double diag_sum = 0.0;
  for (std::size_t j = 0; j < n; ++j) diag_sum += stats.hessian[j * n + j];
  const double damp = options.damp * diag_sum / static_cast<double>(n);
  std::vector<double> blocks(static_cast<std::size_t>(groups) * g2);
  for (std::int64_t g = 0; g < groups; ++g) {
    double* block = blocks.data() + g * g2;
    for (std::int64_t a = 0; a < group_size; ++a) {
      for (std::int64_t b = 0; b < group_size; ++b) {
        block[a * group_size + b] =
            stats.hessian[(g * group_size + a) * in + g * group_size + b] + (a == b ? damp : 0.0);
      }
    }
  }

  const GroupCodec& codec = layout.codec;
  GroupedWeight result;
  result.codes.resize(n * static_cast<std::size_t>(out));
  result.scales.resize(static_cast<std::size_t>(out * groups));
  std::vector<std::int64_t> rescaled(static_cast<std::size_t>(out), 0);
  // Every stored scale byte's scale, decoded once rather than per group and candidate (the E4M3
  // decode was 40% of the search).
  const std::size_t stored_bytes =
      codec.scale_spec().kind == ScaleKind::kE4M3OverGlobal ? 0x7F : 255;
  std::vector<GroupScale> scale_of_byte(stored_bytes);
  for (std::size_t b = 0; b < stored_bytes; ++b) {
    scale_of_byte[b] = codec.scale_from_stored(static_cast<std::uint32_t>(b));
  }
#pragma omp parallel for schedule(dynamic, 16)
  for (std::int64_t r = 0; r < out; ++r) {
    std::vector<std::uint8_t> best_codes(group_size), codes;
    std::vector<float> dequantized(group_size), repeated, steps, candidates_dequantized;
    for (std::int64_t g = 0; g < groups; ++g) {
      const std::span<const float> x(w.data() + r * in + g * group_size, group_size);
      const std::span<const double> block(blocks.data() + g * g2, g2);
      const GroupScale nearest =
          codec.scale_for_amax(std::bit_cast<float>(formats::max_abs_bits(x)));
      codec.quantize_group(x, nearest, best_codes, dequantized);
      GroupScale best = nearest;
      if (nearest.step != 0.0f) {
        double best_objective = local_hessian_objective(x, dequantized, block);
        std::vector<std::uint32_t> bytes = candidate_bytes(codec, nearest, options);
        std::erase(bytes, nearest.stored);
        // Every candidate's round to nearest in one call (its SIMD path where the CPU has one):
        // the group repeated, each copy against its candidate's step.
        const std::size_t n = bytes.size() * static_cast<std::size_t>(group_size);
        repeated.resize(n);
        steps.resize(n);
        codes.resize(n);
        candidates_dequantized.resize(n);
        for (std::size_t c = 0; c < bytes.size(); ++c) {
          std::copy(x.begin(), x.end(), repeated.begin() + c * group_size);
          std::fill_n(steps.begin() + c * group_size, group_size, scale_of_byte[bytes[c]].step);
        }
        formats::quantize_with_steps(codec, repeated, steps, codes, candidates_dequantized);
        for (std::size_t c = 0; c < bytes.size(); ++c) {
          const std::span<const float> candidate(candidates_dequantized.data() + c * group_size,
                                                 group_size);
          const double objective = local_hessian_objective(x, candidate, block);
          if (objective < best_objective) {
            best_objective = objective;
            best = scale_of_byte[bytes[c]];
            std::copy_n(codes.begin() + c * group_size, group_size, best_codes.begin());
          }
          // Candidates ascend: once every code rounds to zero, every larger scale gives the same
          // all-zero group, which cannot be strictly lower.
          if (std::all_of(candidate.begin(), candidate.end(), [](float v) { return v == 0.0f; })) {
            break;
          }
        }
      }
      rescaled[r] += best == nearest ? 0 : 1;
      result.scales[r * groups + g] = best;
      std::copy(best_codes.begin(), best_codes.end(),
                result.codes.begin() + r * in + g * group_size);
    }
  }
  for (const std::int64_t count : rescaled) result.groups_rescaled += count;

  std::vector<float> stored(w.size());
  formats::dequantize_rows(codec, result.codes, result.scales, in, group_size, stored);
  result.output_error = output_mse(w, stored, shape, stats) * static_cast<double>(stats.tokens) *
                        static_cast<double>(out);
  return result;
}

}  // namespace pq::exporter
