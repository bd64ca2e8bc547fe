#include "formats/group_codec.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <random>
#include <string_view>
#include <vector>

#include "common/cpu_features.h"
#include "common/error.h"
#include "formats/codecs.h"

namespace pq::formats {
namespace {

using test::all_codecs;
using test::describe;
using test::fp8_f32;
using test::int_codec;
using test::mx;
using test::nvfp4;

// The ".scalar" variants of these tests run with PQ_FORCE_SCALAR=1; make sure that reaches the
// dispatcher, or they would silently test the SIMD paths twice.
TEST(GroupCodec, ForceScalarDisablesEverySimdPath) {
  const char* force = std::getenv("PQ_FORCE_SCALAR");
  if (force == nullptr || std::string_view(force) == "0") GTEST_SKIP() << "SIMD variant";
  const pq::CpuFeatures& features = pq::cpu_features();
  EXPECT_FALSE(features.avx2);
  EXPECT_FALSE(features.avx512f);
  EXPECT_FALSE(features.avx512bf16);
}

TEST(GroupCodec, Nvfp4ScaleIsGlobalTimesAmaxOverSixRoundedToE4M3) {
  // amax 3, global 448*6/3 = 896: unrounded scale = 896 * 3/6 = 448 -> E4M3 0x7E.
  const GroupCodec c = nvfp4(896.0f);
  const GroupScale s = c.scale_for_amax(3.0f);
  EXPECT_EQ(s.stored, 0x7Eu);
  EXPECT_EQ(s.step, 448.0f / 896.0f);
  // amax 1: 896/6 = 149.33 -> E4M3 neighbours 144 and 160; 144 is nearer.
  EXPECT_EQ(decode_element(ElementType::E4M3, c.scale_for_amax(1.0f).stored), 144.0f);
  EXPECT_EQ(c.scale_for_amax(1.0f).step, 144.0f / 896.0f);
  // All-zero group: scale byte 0, every code 0.
  EXPECT_EQ(c.scale_for_amax(0.0f), GroupScale{});
  EXPECT_EQ(c.quantize(0.0f, GroupScale{}), 0);
  // A tiny non-zero group keeps the smallest subnormal scale 2^-9 instead of collapsing to 0.
  EXPECT_EQ(c.scale_for_amax(1e-30f).stored, 1u);
  // Global scale overridden downwards (fused siblings): the scale saturates at 448.
  EXPECT_EQ(nvfp4(10.0f).scale_for_amax(1e6f).stored, 0x7Eu);
}

TEST(GroupCodec, Nvfp4MinimumScaleKeepsNonZeroGroupsAtTheGivenByte) {
  // Marlin's rule: a non-zero group's scale is at least E4M3's smallest normal 2^-6 (byte 0x08);
  // larger scales are unchanged, and an all-zero group still gets scale 0.
  const GroupCodec ct = nvfp4(896.0f);
  const GroupCodec marlin(
      {ElementType::E2M1, 0},
      {.kind = ScaleKind::kE4M3OverGlobal, .global_scale = 896.0f, .min_e4m3_scale = 0x08});
  for (const float amax : {1e-30f, 1e-5f, 3e-5f, 0.9f * 6.0f / 896.0f * std::ldexp(1.0f, -6)}) {
    EXPECT_LT(ct.scale_for_amax(amax).stored, 0x08u) << amax;
    EXPECT_EQ(marlin.scale_for_amax(amax).stored, 0x08u) << amax;
    EXPECT_EQ(marlin.scale_for_amax(amax).step, std::ldexp(1.0f, -6) / 896.0f) << amax;
  }
  for (const float amax : {0.02f, 1.0f, 3.0f}) {
    EXPECT_EQ(marlin.scale_for_amax(amax), ct.scale_for_amax(amax)) << amax;
  }
  EXPECT_EQ(marlin.scale_for_amax(0.0f), GroupScale{});
  // The row kernels (AVX-512, AVX2, scalar under PQ_FORCE_SCALAR) apply the same floor.
  std::vector<float> w(64, 0.0f);
  for (int i = 0; i < 16; ++i) {
    w[i] = 3.0f * static_cast<float>(i - 8) / 8.0f;  // amax 3
    w[16 + i] = 1e-5f * static_cast<float>(i % 3);   // tiny, non-zero
    w[48 + i] = 0.5f * static_cast<float>(i % 5);    // amax 2
  }
  std::vector<GroupScale> scales(4);
  quantize_rows(marlin, {.weights = w, .cols = 64, .group_size = 16, .scales = scales});
  EXPECT_EQ(scales[0], marlin.scale_for_amax(3.0f));
  EXPECT_EQ(scales[1].stored, 0x08u);
  EXPECT_EQ(scales[2], GroupScale{});
  EXPECT_EQ(scales[3], marlin.scale_for_amax(2.0f));
  EXPECT_THROW(GroupCodec({ElementType::E2M1, 0}, {.kind = ScaleKind::kE4M3OverGlobal,
                                                   .global_scale = 1.0f,
                                                   .min_e4m3_scale = 0x7F}),
               Error);
}

TEST(GroupCodec, E8M0ScaleRules) {
  // OCP floor: X = 2^(floor(log2 amax) - 2) for FP4 (emax 2), - 8 for E4M3.
  EXPECT_EQ(mx(ElementType::E2M1).scale_for_amax(6.0f).stored, 127u);  // 2^(2-2)
  EXPECT_EQ(mx(ElementType::E2M1).scale_for_amax(7.9f).stored, 127u);  // clips 7.9 to 6
  EXPECT_EQ(mx(ElementType::E2M1).scale_for_amax(8.0f).stored, 128u);
  EXPECT_EQ(mx(ElementType::E4M3).scale_for_amax(448.0f).stored, 127u);
  EXPECT_EQ(mx(ElementType::E3M2).scale_for_amax(28.0f).stored, 127u);  // emax 4
  EXPECT_EQ(mx(ElementType::E2M3).scale_for_amax(7.5f).stored, 127u);   // emax 2
  // compressed-tensors round_to_power_2: mantissa >= 1.75 moves up one binade.
  const GroupCodec ct = mx(ElementType::E2M1, MxScaleRule::kRoundToPower2);
  EXPECT_EQ(ct.scale_for_amax(6.0f).stored, 127u);   // 1.5 * 4
  EXPECT_EQ(ct.scale_for_amax(6.99f).stored, 127u);  // 1.7475 * 4
  EXPECT_EQ(ct.scale_for_amax(7.0f).stored, 128u);   // 1.75 * 4
  // Extremes: clamped to the finite E8M0 range, all-zero groups take code 0.
  EXPECT_EQ(mx(ElementType::E2M1).scale_for_amax(std::numeric_limits<float>::max()).stored, 252u);
  EXPECT_EQ(mx(ElementType::E2M1).scale_for_amax(std::numeric_limits<float>::denorm_min()).stored,
            0u);
  EXPECT_EQ(mx(ElementType::E2M1).scale_for_amax(0.0f).stored, 0u);
  EXPECT_EQ(mx(ElementType::E2M1).scale_for_amax(0.0f).step, std::ldexp(1.0f, -127));
  EXPECT_THROW(mx(ElementType::E2M1).scale_from_stored(0xFF), Error);
}

TEST(GroupCodec, FloatScalesAreRoundedBeforeCoding) {
  // INT4: scale = amax / 7.5 (compressed-tensors symmetric rule), stored as BF16.
  const GroupCodec c = int_codec(4);
  const GroupScale s = c.scale_for_amax(1.0f);
  EXPECT_EQ(s.stored, encode_element(ElementType::BF16, 1.0f / 7.5f));
  EXPECT_EQ(s.step, decode_element(ElementType::BF16, s.stored));
  EXPECT_NE(s.step, 1.0f / 7.5f);
  // amax 15: scale 2 exactly; +amax -> 7.5 clamps to 7, -amax -> -7.5 rounds to -8 (ties to
  // even). Codes are offset-binary (+8).
  const GroupScale two = c.scale_for_amax(15.0f);
  EXPECT_EQ(two.step, 2.0f);
  EXPECT_EQ(c.quantize(15.0f, two), 7 + 8);
  EXPECT_EQ(c.quantize(-15.0f, two), -8 + 8);
  EXPECT_EQ(c.quantize(5.0f, two), 2 + 8);  // 2.5 -> 2
  // All-zero group: scale 1, code = the zero point.
  EXPECT_EQ(c.scale_for_amax(0.0f).step, 1.0f);
  EXPECT_EQ(c.quantize(0.0f, c.scale_for_amax(0.0f)), 8);
  // FP8 F32: scale = amax / 448 exactly.
  EXPECT_EQ(fp8_f32().scale_for_amax(3.0f).step, 3.0f / 448.0f);
}

TEST(GroupCodec, CandidateScalesAreDistinctAndAscending) {
  for (const GroupCodec& c : all_codecs()) {
    const auto cands = c.candidate_scales(1.3f, 32, 0.5f, 1.5f);
    ASSERT_FALSE(cands.empty()) << describe(c);
    for (std::size_t i = 1; i < cands.size(); ++i) EXPECT_LT(cands[i - 1].step, cands[i].step);
    // The RTN scale is among the candidates (multiplier 1 lies on the grid of 32 points only
    // approximately, so check the candidates bracket it).
    const float rtn = c.scale_for_amax(1.3f).step;
    EXPECT_LE(cands.front().step, rtn) << describe(c);
    EXPECT_GE(cands.back().step, rtn) << describe(c);
  }
  // E8M0 over [0.5, 1.5]: at most three exponents.
  EXPECT_LE(mx(ElementType::E2M1).candidate_scales(1.3f, 32, 0.5f, 1.5f).size(), 3u);
}

// Random groups with the hard cases mixed in: zeros, single outliers, subnormals, huge values,
// exact midpoints.
std::vector<float> test_rows(std::int64_t rows, std::int64_t cols, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::vector<float> w(rows * cols);
  for (float& v : w) v = normal(rng);
  for (std::int64_t r = 0; r < rows; ++r) {
    float* row = w.data() + r * cols;
    switch (r % 8) {
      case 0:
        std::fill(row, row + cols, 0.0f);
        break;
      case 1:
        row[r % cols] = 40.0f;  // single outlier
        break;
      case 2:
        for (std::int64_t i = 0; i < cols; ++i) row[i] = std::ldexp(row[i], -130);  // subnormals
        break;
      case 3:
        for (std::int64_t i = 0; i < cols; ++i) row[i] = std::ldexp(row[i], 120);
        break;
      case 4:
        for (std::int64_t i = 0; i < cols; ++i) row[i] = static_cast<float>(i % 13) * 0.25f - 1.5f;
        break;
      case 5:
        row[0] = -0.0f;
        row[cols - 1] = -3.0f;
        break;
      default:
        break;
    }
  }
  return w;
}

TEST(GroupCodec, RowKernelsMatchTheScalarDefinition) {
  for (const GroupCodec& c : all_codecs()) {
    for (std::int64_t g : {16, 32, 128, 40}) {
      // 35 groups per row: two full blocks of 16 groups and a tail of 3.
      const std::int64_t cols = g * 35;
      const auto w = test_rows(24, cols, 5 + static_cast<std::uint32_t>(g));
      std::vector<GroupScale> scales(w.size() / g);
      std::vector<std::uint8_t> codes(w.size());
      std::vector<float> deq(w.size());
      quantize_rows(c, {.weights = w,
                        .cols = cols,
                        .group_size = g,
                        .scales = scales,
                        .codes = codes,
                        .dequantized = deq});
      // Without codes the SIMD paths round on the value grid directly; same bits.
      std::vector<GroupScale> scales_only(scales.size());
      std::vector<float> deq_only(w.size());
      quantize_rows(c, {.weights = w,
                        .cols = cols,
                        .group_size = g,
                        .scales = scales_only,
                        .dequantized = deq_only});
      ASSERT_EQ(scales_only, scales) << describe(c);
      for (std::size_t k = 0; k < w.size(); ++k) {
        ASSERT_EQ(std::bit_cast<std::uint32_t>(deq_only[k]), std::bit_cast<std::uint32_t>(deq[k]))
            << describe(c) << " element " << k;
      }
      for (std::size_t gi = 0; gi < scales.size(); ++gi) {
        float amax = 0.0f;
        for (std::int64_t i = 0; i < g; ++i) amax = std::max(amax, std::abs(w[gi * g + i]));
        const GroupScale expected = c.scale_for_amax(amax);
        ASSERT_EQ(scales[gi], expected) << describe(c) << " group " << gi;
        for (std::int64_t i = 0; i < g; ++i) {
          const std::size_t k = gi * g + i;
          ASSERT_EQ(codes[k], c.quantize(w[k], expected)) << describe(c) << " element " << k;
          ASSERT_EQ(std::bit_cast<std::uint32_t>(deq[k]),
                    std::bit_cast<std::uint32_t>(c.dequantize(codes[k], expected)))
              << describe(c) << " element " << k;
        }
      }
      std::vector<float> again(w.size());
      dequantize_rows(c, codes, scales, cols, g, again);
      for (std::size_t k = 0; k < w.size(); ++k) {
        ASSERT_EQ(std::bit_cast<std::uint32_t>(again[k]), std::bit_cast<std::uint32_t>(deq[k]));
      }
    }
  }
}

// Half the distance between the two codes around |x / step|, times the step: the most rounding
// may cost when the value is inside the code range.
double half_code_gap(const GroupCodec& c, float scaled) {
  const double a = std::abs(static_cast<double>(scaled));
  if (c.codes().int_bits > 0) return 0.5;
  const ElementInfo& f = element_info(c.codes().element);
  const int emin = 1 - f.bias;
  const int e = a < std::ldexp(1.0, emin) ? emin : std::max(emin, std::ilogb(a));
  return 0.5 * std::ldexp(1.0, e - f.man_bits);
}

TEST(GroupCodec, ErrorNeverExceedsHalfACodeStepTimesTheScale) {
  for (const GroupCodec& c : all_codecs()) {
    const std::int64_t g = 32, cols = 256;
    const auto w = test_rows(32, cols, 77);
    std::vector<GroupScale> scales(w.size() / g);
    std::vector<float> deq(w.size());
    quantize_rows(
        c, {.weights = w, .cols = cols, .group_size = g, .scales = scales, .dequantized = deq});
    for (std::size_t k = 0; k < w.size(); ++k) {
      const GroupScale& s = scales[k / g];
      if (s.step == 0.0f) {
        ASSERT_EQ(deq[k], 0.0f);
        continue;
      }
      const float scaled = w[k] / s.step;
      const double err = std::abs(static_cast<double>(deq[k]) - w[k]);
      // Integer codes reach -2^(bits-1) on the negative side.
      const double largest_code =
          c.codes().int_bits > 0 ? std::ldexp(1.0, c.codes().int_bits - 1) : c.code_max();
      if (std::abs(scaled) > c.code_max()) {
        // Clipped: never beyond the largest code.
        ASSERT_LE(std::abs(deq[k]), largest_code * s.step * (1 + 1e-6)) << describe(c);
        continue;
      }
      // Allow the two f32 roundings (division, product) on top of the code rounding, and values
      // below f32's normal range, where the product itself is quantized.
      const double bound =
          half_code_gap(c, scaled) * s.step * (1 + 1e-6) + 1e-44 + std::abs(w[k]) * 1e-6;
      ASSERT_LE(err, bound) << describe(c) << " element " << k << " value " << w[k];
    }
  }
}

TEST(GroupCodec, QuantizingDequantizedValuesIsIdempotent) {
  for (const GroupCodec& c : all_codecs()) {
    const std::int64_t g = 16, cols = 64;
    const auto w = test_rows(16, cols, 3);
    std::vector<GroupScale> scales(w.size() / g);
    std::vector<float> once(w.size()), twice(w.size());
    quantize_rows(
        c, {.weights = w, .cols = cols, .group_size = g, .scales = scales, .dequantized = once});
    quantize_rows(c, {.weights = once,
                      .cols = cols,
                      .group_size = g,
                      .scales_given = true,
                      .scales = scales,
                      .dequantized = twice});
    for (std::size_t k = 0; k < w.size(); ++k) {
      // Values that underflowed f32's normal range may not reproduce exactly.
      if (std::abs(once[k]) < std::numeric_limits<float>::min()) continue;
      ASSERT_EQ(once[k], twice[k]) << describe(c) << " element " << k;
    }
  }
}

TEST(GroupCodec, NonFiniteWeightsAreRejected) {
  std::vector<float> w(32, 1.0f);
  w[5] = std::numeric_limits<float>::quiet_NaN();
  std::vector<GroupScale> scales(2);
  EXPECT_THROW(quantize_rows(mx(ElementType::E2M1),
                             {.weights = w, .cols = 32, .group_size = 16, .scales = scales}),
               Error);
  w[5] = std::numeric_limits<float>::infinity();
  EXPECT_THROW(
      quantize_rows(nvfp4(1.0f), {.weights = w, .cols = 32, .group_size = 16, .scales = scales}),
      Error);
}

TEST(GroupCodec, SizeMismatchesAreErrors) {
  std::vector<float> w(48);
  std::vector<GroupScale> scales(3);
  EXPECT_THROW(
      quantize_rows(fp8_f32(), {.weights = w, .cols = 48, .group_size = 32, .scales = scales}),
      Error);
  EXPECT_THROW(GroupCodec({ElementType::E2M1, 0},
                          {.kind = ScaleKind::kE4M3OverGlobal, .global_scale = 0.0f}),
               Error);
}

}  // namespace
}  // namespace pq::formats
