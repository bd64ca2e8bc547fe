// The SIMD kernels of every ISA this CPU runs, called directly and compared bit for bit with the
// scalar reference (encode_element / decode_element, GroupCodec::scale_for_amax / quantize /
// dequantize). The public entry points reach only the widest ISA, so without these an AVX-512
// machine would never run the AVX2 kernels.

#include "formats/simd_kernels.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "common/cpu_features.h"
#include "formats/codecs.h"

namespace pq::formats {
namespace {

using test::all_codecs;
using test::describe;

struct FormatsKernels {
  std::string name;
  bool (*available)();
  decltype(&simd::encode_elements_avx512) encode_elements;
  decltype(&simd::decode_elements_avx512) decode_elements;
  decltype(&simd::encode_elements16_avx512) encode_elements16;
  decltype(&simd::decode_elements16_avx512) decode_elements16;
  decltype(&simd::max_abs_bits_avx512) max_abs_bits;
  decltype(&simd::quantize_row_avx512) quantize_row;
  decltype(&simd::dequantize_row_avx512) dequantize_row;
};

void PrintTo(const FormatsKernels& kernels, std::ostream* os) {
  *os << kernels.name;
}

std::string kernels_name(const ::testing::TestParamInfo<FormatsKernels>& info) {
  return info.param.name;
}

class FormatsSimdKernels : public ::testing::TestWithParam<FormatsKernels> {
 protected:
  void SetUp() override {
    if (!GetParam().available())
      GTEST_SKIP() << "this CPU does not run the " << GetParam().name << " kernels";
  }
};

constexpr ElementType kAllTypes[] = {ElementType::E2M1, ElementType::E2M3, ElementType::E3M2,
                                     ElementType::E4M3, ElementType::E5M2, ElementType::F16,
                                     ElementType::BF16};

std::uint32_t bits_of(float x) {
  return std::bit_cast<std::uint32_t>(x);
}
float from_bits(std::uint32_t b) {
  return std::bit_cast<float>(b);
}

// Every class of f32 bit pattern, with both signs: zeros, subnormals (smallest, largest, random),
// the smallest normal, tiny and huge normals, the largest finite, infinities, quiet and signalling
// NaNs with payloads, and random patterns. Then the rounding ties of `type` (midpoints between
// neighbouring codes, including the subnormal ones and the saturation boundary) and the floats
// either side of them.
std::vector<float> adversarial_values(ElementType type) {
  std::vector<std::uint32_t> magnitudes = {
      0x00000000, 0x00000001, 0x00000002, 0x003FFFFF, 0x00400000, 0x007FFFFF,
      0x00800000, 0x00800001, 0x0DA24260, 0x3F800000, 0x7E967699, 0x7F7FFFFF,
      0x7F800000, 0x7F800001, 0x7FBFFFFF, 0x7FC00000, 0x7FC00001, 0x7FFFFFFF};
  std::mt19937 rng(2024);
  for (int i = 0; i < 4000; ++i) magnitudes.push_back(rng() & 0x7FFFFFFFu);
  for (int i = 0; i < 500; ++i) magnitudes.push_back(rng() & 0x007FFFFFu);  // subnormals
  const ElementInfo& f = element_info(type);
  std::vector<float> values;  // the codes' magnitudes, ascending, and one step past the maximum
  for (std::uint32_t c = 0; c < (1u << (f.bits - 1)); ++c) {
    const float v = decode_element(type, c);
    if (std::isfinite(v)) values.push_back(v);
  }
  values.push_back(std::ldexp(1.0f, floor_log2(f.max_finite) + 1));
  for (std::size_t i = 0; i + 1 < values.size(); i += (values.size() > 4096 ? 5 : 1)) {
    const auto mid = static_cast<float>((static_cast<double>(values[i]) + values[i + 1]) / 2);
    for (float v : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e30f), values[i]}) {
      magnitudes.push_back(bits_of(v));
    }
  }
  std::vector<float> out;
  for (std::uint32_t m : magnitudes) {
    out.push_back(from_bits(m));
    out.push_back(from_bits(m | 0x80000000u));
  }
  std::shuffle(out.begin(), out.end(), rng);
  return out;
}

// Span lengths that end in every tail of an 8- or 16-lane loop, at unaligned starts.
constexpr std::size_t kLengths[] = {0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10,
                                    11, 12, 13, 14, 15, 16, 17, 23, 31, 33, 47};

// Code buffers carry this past the span: a kernel that writes past its end changes it.
constexpr std::uint16_t kGuard = 0xA5A5;
constexpr float kGuardValue = -1234.5f;

TEST_P(FormatsSimdKernels, EncodeMatchesEncodeElement) {
  for (ElementType t : kAllTypes) {
    const auto values = adversarial_values(t);
    const bool narrow = element_info(t).bits <= 8;
    auto check = [&](std::size_t first, std::size_t n) {
      const std::span<const float> in(values.data() + first, n);
      std::vector<std::uint32_t> got;
      if (narrow) {
        std::vector<std::uint8_t> codes(n + 16, static_cast<std::uint8_t>(kGuard));
        GetParam().encode_elements(t, in, std::span(codes).first(n));
        got.assign(codes.begin(), codes.end());
      } else {
        std::vector<std::uint16_t> codes(n + 16, kGuard);
        GetParam().encode_elements16(t, in, std::span(codes).first(n));
        got.assign(codes.begin(), codes.end());
      }
      for (std::size_t i = 0; i < n; ++i) {
        ASSERT_EQ(got[i], encode_element(t, in[i]))
            << element_info(t).name << " value bits " << std::hex << bits_of(in[i]);
      }
      const std::uint32_t guard = narrow ? static_cast<std::uint8_t>(kGuard) : kGuard;
      for (std::size_t i = n; i < got.size(); ++i) {
        ASSERT_EQ(got[i], guard) << element_info(t).name << ": wrote past " << n << " codes";
      }
    };
    check(0, values.size() - 1);  // odd: the last block is a tail
    for (std::size_t n : kLengths) {
      for (std::size_t first : {std::size_t{1}, std::size_t{100}}) check(first, n);
    }
  }
}

TEST_P(FormatsSimdKernels, DecodeMatchesDecodeElement) {
  for (ElementType t : kAllTypes) {
    const std::uint32_t count = 1u << element_info(t).bits;
    std::vector<std::uint16_t> codes;  // every code at least three times, shuffled
    for (std::uint32_t k = 0; k < std::max(3u, 256u / count); ++k) {
      for (std::uint32_t c = 0; c < count; ++c) codes.push_back(static_cast<std::uint16_t>(c));
    }
    std::mt19937 rng(7);
    std::shuffle(codes.begin(), codes.end(), rng);
    const std::vector<std::uint8_t> narrow_codes(codes.begin(), codes.end());
    auto check = [&](std::size_t first, std::size_t n) {
      std::vector<float> out(n + 16, kGuardValue);
      if (element_info(t).bits <= 8) {
        GetParam().decode_elements(t, std::span(narrow_codes).subspan(first, n),
                                   std::span(out).first(n));
      } else {
        GetParam().decode_elements16(t, std::span(codes).subspan(first, n),
                                     std::span(out).first(n));
      }
      for (std::size_t i = 0; i < n; ++i) {
        ASSERT_EQ(bits_of(out[i]), bits_of(decode_element(t, codes[first + i])))
            << element_info(t).name << " code " << codes[first + i];
      }
      for (std::size_t i = n; i < out.size(); ++i) {
        ASSERT_EQ(bits_of(out[i]), bits_of(kGuardValue))
            << element_info(t).name << ": wrote past " << n << " values";
      }
    };
    check(0, codes.size() - 1);
    for (std::size_t n : kLengths) {
      for (std::size_t first : {std::size_t{1}, std::size_t{100}}) check(first, n);
    }
  }
}

TEST_P(FormatsSimdKernels, MaxAbsBitsMatchesTheScalarLoopAndReadsNothingPastTheEnd) {
  const auto values = adversarial_values(ElementType::E4M3);
  auto scalar = [](std::span<const float> x) {
    std::uint32_t m = 0;
    for (float v : x) m = std::max(m, bits_of(v) & 0x7FFFFFFFu);
    return m;
  };
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (std::size_t n : kLengths) {
    // Finite values followed by NaNs that only a read past the end would see, the largest first,
    // in the middle or last.
    for (std::size_t peak : {std::size_t{0}, n / 2, n - 1}) {
      std::vector<float> x(n + 16, std::numeric_limits<float>::quiet_NaN());
      for (std::size_t i = 0; i < n; ++i) x[i] = normal(rng);
      if (n > 0) x[peak] = -1e30f;
      const std::span<const float> in(x.data(), n);
      ASSERT_EQ(GetParam().max_abs_bits(in), scalar(in)) << n << " values, peak at " << peak;
    }
  }
  for (std::size_t first = 0; first + 37 <= values.size(); first += 37) {
    const std::span<const float> in(values.data() + first, 37);
    ASSERT_EQ(GetParam().max_abs_bits(in), scalar(in)) << "values from " << first;
  }
  ASSERT_EQ(GetParam().max_abs_bits(values), scalar(values));
}

// Code values of a codec in ascending order (before the scale).
std::vector<float> code_values(const GroupCodec& c) {
  const int bits =
      c.codes().int_bits > 0 ? c.codes().int_bits : element_info(c.codes().element).bits;
  std::vector<float> out;
  for (std::uint32_t code = 0; code < (1u << bits); ++code) {
    const float v = c.dequantize(static_cast<std::uint8_t>(code), {0, 1.0f});
    if (std::isfinite(v)) out.push_back(v);
  }
  std::sort(out.begin(), out.end());
  return out;
}

// One group of finite weights of a kind that stresses the scale or the rounding: zeros (with
// -0), plain normals, f32 subnormals (amax below 2^-126: E8M0's exponent extraction), huge and
// tiny binades, amax mantissas either side of 1.75 (the round-to-power-of-2 rule), and values on
// and next to every rounding tie of the codec at the group's own scale.
std::vector<float> adversarial_group(const GroupCodec& c, std::int64_t g, int kind,
                                     std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::uniform_int_distribution<std::uint32_t> pattern;
  std::vector<float> x(static_cast<std::size_t>(g));
  const auto sign = [&](float v) { return pattern(rng) & 1 ? -v : v; };
  switch (kind) {
    case 0:
      for (float& v : x) v = sign(0.0f);
      break;
    case 1:
      for (float& v : x) v = normal(rng);
      break;
    case 2:
      for (float& v : x) v = sign(from_bits(pattern(rng) & 0x007FFFFFu));
      break;
    case 3:
      for (float& v : x) v = sign(from_bits(0x7E800000u | (pattern(rng) & 0x00FFFFFFu)));
      break;
    case 4:
      for (float& v : x) v = sign(from_bits(0x00800000u + pattern(rng) % 0x04000000u));
      break;
    case 5: {
      for (float& v : x) v = normal(rng);
      const float peak = pattern(rng) & 2 ? 1.75f : std::nextafter(1.75f, 0.0f);
      x[pattern(rng) % g] = sign(std::ldexp(peak, static_cast<int>(pattern(rng) % 40) - 20));
      break;
    }
    case 6:
      for (float& v : x) v = sign(from_bits(pattern(rng) % 0x7F800000u));
      break;
    default: {
      const auto values = code_values(c);
      const float amax = std::ldexp(1.0f + static_cast<float>(pattern(rng) % 8) / 8,
                                    static_cast<int>(pattern(rng) % 20) - 10);
      const float step = c.scale_for_amax(amax).step;
      x[0] = amax;
      for (std::size_t i = 1; i < x.size(); ++i) {
        const std::size_t k = pattern(rng) % (values.size() - 1);
        const float mid = (values[k] + values[k + 1]) / 2 * step;
        const float v = std::array{mid, std::nextafter(mid, 0.0f),
                                   std::nextafter(mid, 1e30f)}[pattern(rng) % 3];
        x[i] = std::min(std::abs(v), amax) * (v < 0 ? -1.0f : 1.0f);
      }
    }
  }
  return x;
}

// all_codecs() and E8M0 scales over 2-bit integers: their largest code 1 has exponent 0, so the
// exponent of a subnormal amax reaches the stored scale instead of being clamped to 2^-127.
std::vector<GroupCodec> codecs_under_test() {
  std::vector<GroupCodec> out = all_codecs();
  for (MxScaleRule rule : {MxScaleRule::kOcpFloor, MxScaleRule::kRoundToPower2}) {
    out.emplace_back(CodeSpec{ElementType::E2M1, 2},
                     ScaleSpec{.kind = ScaleKind::kE8M0, .mx_rule = rule});
  }
  return out;
}

TEST_P(FormatsSimdKernels, QuantizeRowMatchesTheScalarCodec) {
  std::mt19937 rng(11);
  for (const GroupCodec& c : codecs_under_test()) {
    for (std::int64_t g : {1, 3, 5, 7, 9, 15, 16, 17, 23, 32, 128}) {
      // 19 groups: full blocks of 8 and 16 groups and a tail of 3.
      const std::int64_t groups = 19, cols = g * groups;
      for (int row = 0; row < 8; ++row) {
        std::vector<float> x;
        for (std::int64_t gi = 0; gi < groups; ++gi) {
          const auto group = adversarial_group(c, g, (row + static_cast<int>(gi)) % 8, rng);
          x.insert(x.end(), group.begin(), group.end());
        }
        std::vector<GroupScale> scales(groups);
        std::vector<std::uint8_t> codes(cols + 16, static_cast<std::uint8_t>(kGuard));
        std::vector<float> deq(cols + 16, kGuardValue);
        GetParam().quantize_row(c, x.data(), cols, g, false, scales.data(), codes.data(),
                                deq.data());
        std::vector<GroupScale> grid_scales(groups);
        std::vector<float> grid_deq(cols + 16, kGuardValue);
        GetParam().quantize_row(c, x.data(), cols, g, false, grid_scales.data(), nullptr,
                                grid_deq.data());
        std::vector<float> again(cols + 16, kGuardValue);
        GetParam().dequantize_row(c, codes.data(), scales.data(), cols, g, again.data());
        const std::string where = describe(c) + ", groups of " + std::to_string(g);
        for (std::int64_t gi = 0; gi < groups; ++gi) {
          std::uint32_t amax = 0;
          for (std::int64_t i = 0; i < g; ++i)
            amax = std::max(amax, bits_of(x[gi * g + i]) & 0x7FFFFFFFu);
          const GroupScale scale = c.scale_for_amax(from_bits(amax));
          ASSERT_EQ(scales[gi], scale) << where << ", amax bits " << std::hex << amax;
          ASSERT_EQ(grid_scales[gi], scale) << where;
          for (std::int64_t i = gi * g; i < (gi + 1) * g; ++i) {
            const std::uint8_t code = c.quantize(x[i], scale);
            const std::uint32_t value = bits_of(c.dequantize(code, scale));
            ASSERT_EQ(codes[i], code) << where << ", value bits " << std::hex << bits_of(x[i]);
            ASSERT_EQ(bits_of(deq[i]), value) << where;
            ASSERT_EQ(bits_of(grid_deq[i]), value) << where;
            ASSERT_EQ(bits_of(again[i]), value) << where;
          }
        }
        for (std::int64_t i = cols; i < cols + 16; ++i) {
          ASSERT_EQ(codes[i], static_cast<std::uint8_t>(kGuard)) << where << ": wrote past the row";
          for (const auto* out : {&deq, &grid_deq, &again}) {
            ASSERT_EQ(bits_of((*out)[i]), bits_of(kGuardValue)) << where << ": wrote past the row";
          }
        }
      }
    }
  }
}

// With scales given nothing checks the weights first, so NaN and Inf reach the kernels; and a
// zero step (an all-zero NVFP4 group) must give zero codes.
TEST_P(FormatsSimdKernels, QuantizeRowWithGivenScalesMatchesTheScalarCodecOnEveryPattern) {
  for (const GroupCodec& c : codecs_under_test()) {
    const auto values =
        adversarial_values(c.codes().int_bits > 0 ? ElementType::E4M3 : c.codes().element);
    for (std::int64_t g : {7, 16, 32, 128}) {
      const std::int64_t groups = static_cast<std::int64_t>(values.size()) / g, cols = groups * g;
      std::vector<GroupScale> scales(groups);
      for (std::int64_t gi = 0; gi < groups; ++gi) {
        scales[gi] = gi % 5 == 0
                         ? c.scale_for_amax(0.0f)
                         : c.scale_for_amax(std::ldexp(1.0f, static_cast<int>(gi % 41) - 20));
      }
      std::vector<std::uint8_t> codes(cols);
      std::vector<float> deq(cols), grid_deq(cols);
      GetParam().quantize_row(c, values.data(), cols, g, true, scales.data(), codes.data(),
                              deq.data());
      GetParam().quantize_row(c, values.data(), cols, g, true, scales.data(), nullptr,
                              grid_deq.data());
      for (std::int64_t i = 0; i < cols; ++i) {
        const GroupScale& scale = scales[i / g];
        const std::uint8_t code = c.quantize(values[i], scale);
        const std::uint32_t value = bits_of(c.dequantize(code, scale));
        const std::string where = describe(c) + ", groups of " + std::to_string(g);
        ASSERT_EQ(codes[i], code) << where << ", value bits " << std::hex << bits_of(values[i]);
        ASSERT_EQ(bits_of(deq[i]), value) << where;
        ASSERT_EQ(bits_of(grid_deq[i]), value)
            << where << ", value bits " << std::hex << bits_of(values[i]);
      }
    }
  }
}

// GPTQ's column quantization: every value against its own step (zero steps included), every
// pattern, every tail length. One AVX2 kernel serves AVX-512 CPUs too.
TEST(QuantizeWithSteps, Avx2MatchesTheScalarCodecOnEveryPattern) {
  if (!cpu_features().has_avx2_fma()) GTEST_SKIP() << "this CPU does not run the avx2 kernels";
  for (const GroupCodec& c : codecs_under_test()) {
    const auto values =
        adversarial_values(c.codes().int_bits > 0 ? ElementType::E4M3 : c.codes().element);
    std::vector<float> steps(values.size());
    for (std::size_t i = 0; i < steps.size(); ++i) {
      steps[i] = i % 7 == 0
                     ? 0.0f
                     : c.scale_for_amax(std::ldexp(1.0f, static_cast<int>(i % 41) - 20)).step;
    }
    for (std::size_t tail = 0; tail < 8; ++tail) {
      const std::size_t n = values.size() - tail;
      std::vector<std::uint8_t> codes(n + 1, 0xAB);
      std::vector<float> deq(n + 1, -1.0f);
      simd::quantize_with_steps_avx2(c, values.data(), steps.data(), static_cast<std::int64_t>(n),
                                     codes.data(), deq.data());
      const std::string where = describe(c) + ", " + std::to_string(n) + " values";
      for (std::size_t i = 0; i < n; ++i) {
        const GroupScale scale{0, steps[i]};
        const std::uint8_t code = c.quantize(values[i], scale);
        ASSERT_EQ(codes[i], code) << where << ", value bits " << std::hex << bits_of(values[i]);
        ASSERT_EQ(bits_of(deq[i]), bits_of(c.dequantize(code, scale))) << where;
      }
      EXPECT_EQ(codes[n], 0xAB) << where << ": wrote past the end";
      EXPECT_EQ(deq[n], -1.0f) << where << ": wrote past the end";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Isas, FormatsSimdKernels,
    ::testing::Values(FormatsKernels{"avx512", [] { return cpu_features().has_avx512_core(); },
                                     simd::encode_elements_avx512, simd::decode_elements_avx512,
                                     simd::encode_elements16_avx512, simd::decode_elements16_avx512,
                                     simd::max_abs_bits_avx512, simd::quantize_row_avx512,
                                     simd::dequantize_row_avx512},
                      FormatsKernels{"avx2", [] { return cpu_features().has_avx2_fma(); },
                                     simd::encode_elements_avx2, simd::decode_elements_avx2,
                                     simd::encode_elements16_avx2, simd::decode_elements16_avx2,
                                     simd::max_abs_bits_avx2, simd::quantize_row_avx2,
                                     simd::dequantize_row_avx2}),
    kernels_name);

}  // namespace
}  // namespace pq::formats
