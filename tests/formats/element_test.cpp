#include "formats/element.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>
#include <vector>

#include "io/dtype.h"
#include "support/test_support.h"

namespace pq::formats {
namespace {

constexpr ElementType kNarrowTypes[] = {ElementType::E2M1, ElementType::E2M3, ElementType::E3M2,
                                        ElementType::E4M3, ElementType::E5M2};
constexpr ElementType kAllTypes[] = {ElementType::E2M1, ElementType::E2M3, ElementType::E3M2,
                                     ElementType::E4M3, ElementType::E5M2, ElementType::F16,
                                     ElementType::BF16};

std::uint32_t bits_of(float x) {
  return std::bit_cast<std::uint32_t>(x);
}
std::uint32_t code_count(ElementType t) {
  return 1u << element_info(t).bits;
}
std::uint32_t sign_bit(ElementType t) {
  return 1u << (element_info(t).bits - 1);
}

// Positive finite codes in increasing value order (the codes are monotonic in magnitude).
std::vector<std::uint32_t> positive_finite_codes(ElementType t) {
  std::vector<std::uint32_t> out;
  for (std::uint32_t c = 0; c < sign_bit(t); ++c) {
    if (std::isfinite(decode_element(t, c))) out.push_back(c);
  }
  return out;
}

// An independent oracle for the encoder: scale |x| to units of its binade's code step with
// ldexp, round with nearbyint (ties to even), rebuild the code; saturate and map NaN as
// documented in element.h.
std::uint32_t reference_encode(ElementType t, float value) {
  const ElementInfo& f = element_info(t);
  if (std::isnan(value)) return f.nan_code;
  const std::uint32_t sign = std::signbit(value) ? sign_bit(t) : 0u;
  const float magnitude = std::fabs(value);
  if (magnitude >= f.max_finite) return sign | f.max_finite_code;
  if (magnitude == 0.0f) return sign;
  const int emin = 1 - f.bias;
  const int exponent = std::max(std::ilogb(magnitude), emin);
  const double scaled = std::ldexp(static_cast<double>(magnitude), f.man_bits - exponent);
  const auto rounded = static_cast<std::uint32_t>(std::nearbyint(scaled));
  return sign | ((static_cast<std::uint32_t>(exponent - emin) << f.man_bits) + rounded);
}

TEST(Element, E2M1DecodesToTheOcpTable) {
  // OCP MX v1.0 Table 5 / compressed-tensors fp4_utils.py: idx 0..7 -> 0, .5, 1, 1.5, 2, 3, 4, 6.
  const float expected[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  for (std::uint32_t c = 0; c < 8; ++c) {
    EXPECT_EQ(decode_element(ElementType::E2M1, c), expected[c]) << c;
    EXPECT_EQ(decode_element(ElementType::E2M1, c | 8), -expected[c]) << c;
  }
}

TEST(Element, E2M1RoundingMatchesCompressedTensorsCastToFp4) {
  // compressed-tensors quantization/utils/fp4_utils.py cast_to_fp4 (format-facts.md A.2):
  // |x| <= 0.25 -> 0; (0.25, 0.75) -> 0.5; [0.75, 1.25] -> 1; (1.25, 1.75) -> 1.5;
  // [1.75, 2.5] -> 2; (2.5, 3.5) -> 3; [3.5, 5] -> 4; > 5 -> 6.
  const struct {
    float lo, hi;
    bool lo_closed, hi_closed;
    float value;
  } kBands[] = {{0.0f, 0.25f, true, true, 0.0f},  {0.25f, 0.75f, false, false, 0.5f},
                {0.75f, 1.25f, true, true, 1.0f}, {1.25f, 1.75f, false, false, 1.5f},
                {1.75f, 2.5f, true, true, 2.0f},  {2.5f, 3.5f, false, false, 3.0f},
                {3.5f, 5.0f, true, true, 4.0f},   {5.0f, 1e30f, false, true, 6.0f}};
  for (const auto& band : kBands) {
    const float inside[] = {band.lo_closed ? band.lo : std::nextafter(band.lo, band.hi),
                            (band.lo + std::min(band.hi, 8.0f)) / 2,
                            band.hi_closed ? band.hi : std::nextafter(band.hi, band.lo)};
    for (float x : inside) {
      EXPECT_EQ(decode_element(ElementType::E2M1, encode_element(ElementType::E2M1, x)), band.value)
          << x;
      EXPECT_EQ(decode_element(ElementType::E2M1, encode_element(ElementType::E2M1, -x)),
                -band.value)
          << x;
    }
  }
}

TEST(Element, KnownValuesOfEachFormat) {
  // Extremes from the OCP MX v1.0 / OFP8 tables (format-facts.md Part B).
  EXPECT_EQ(decode_element(ElementType::E2M3, 0x1F), 7.5f);
  EXPECT_EQ(decode_element(ElementType::E2M3, 0x01), 0.125f);
  EXPECT_EQ(decode_element(ElementType::E2M3, 0x08), 1.0f);
  EXPECT_EQ(decode_element(ElementType::E3M2, 0x1F), 28.0f);
  EXPECT_EQ(decode_element(ElementType::E3M2, 0x01), 0.0625f);
  EXPECT_EQ(decode_element(ElementType::E3M2, 0x04), 0.25f);
  EXPECT_EQ(decode_element(ElementType::E4M3, 0x7E), 448.0f);
  EXPECT_EQ(decode_element(ElementType::E4M3, 0x01), std::ldexp(1.0f, -9));
  EXPECT_EQ(decode_element(ElementType::E4M3, 0x08), std::ldexp(1.0f, -6));
  EXPECT_EQ(decode_element(ElementType::E4M3, 0x38), 1.0f);
  EXPECT_TRUE(std::isnan(decode_element(ElementType::E4M3, 0x7F)));
  EXPECT_TRUE(std::isnan(decode_element(ElementType::E4M3, 0xFF)));
  EXPECT_EQ(decode_element(ElementType::E5M2, 0x7B), 57344.0f);
  EXPECT_EQ(decode_element(ElementType::E5M2, 0x01), std::ldexp(1.0f, -16));
  EXPECT_EQ(decode_element(ElementType::E5M2, 0x7C), std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(decode_element(ElementType::E5M2, 0x7D)));
  EXPECT_EQ(decode_element(ElementType::F16, 0x7BFF), 65504.0f);
  EXPECT_EQ(decode_element(ElementType::F16, 0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(decode_element(ElementType::BF16, 0x3F80), 1.0f);
  EXPECT_EQ(decode_element(ElementType::BF16, 0x7F7F), std::ldexp(255.0f, 120));  // 2^128-2^120
}

TEST(Element, EveryCodeReencodesToItself) {
  for (ElementType t : kAllTypes) {
    for (std::uint32_t c = 0; c < code_count(t); ++c) {
      const float v = decode_element(t, c);
      if (std::isnan(v)) {
        EXPECT_EQ(encode_element(t, v), element_info(t).nan_code) << element_info(t).name << c;
      } else if (std::isinf(v)) {
        // Infinities saturate to the largest finite value of their sign.
        EXPECT_EQ(encode_element(t, v), (c & sign_bit(t)) | element_info(t).max_finite_code);
      } else {
        ASSERT_EQ(encode_element(t, v), c) << element_info(t).name << " code " << c << " = " << v;
      }
    }
  }
}

TEST(Element, MaxFiniteMatchesTheTable) {
  for (ElementType t : kAllTypes) {
    const auto codes = positive_finite_codes(t);
    EXPECT_EQ(codes.back(), element_info(t).max_finite_code) << element_info(t).name;
    EXPECT_EQ(decode_element(t, codes.back()), element_info(t).max_finite) << element_info(t).name;
  }
}

TEST(Element, MidpointsRoundToEvenAndNeighboursToNearest) {
  for (ElementType t : kAllTypes) {
    const auto codes = positive_finite_codes(t);
    for (std::size_t i = 0; i + 1 < codes.size(); ++i) {
      const double lo = decode_element(t, codes[i]);
      const double hi = decode_element(t, codes[i + 1]);
      const auto mid = static_cast<float>((lo + hi) / 2);  // exact: few mantissa bits
      ASSERT_EQ(static_cast<double>(mid), (lo + hi) / 2);
      const std::uint32_t even = (codes[i] & 1) == 0 ? codes[i] : codes[i + 1];
      ASSERT_EQ(encode_element(t, mid), even) << element_info(t).name << " mid " << mid;
      ASSERT_EQ(encode_element(t, -mid), even | sign_bit(t)) << element_info(t).name;
      const float below = std::nextafter(mid, 0.0f);
      const float above = std::nextafter(mid, std::numeric_limits<float>::infinity());
      ASSERT_EQ(encode_element(t, below), codes[i]) << element_info(t).name << " " << below;
      ASSERT_EQ(encode_element(t, above), codes[i + 1]) << element_info(t).name << " " << above;
    }
  }
}

TEST(Element, SaturatesInfinityAndOverflow) {
  const float inf = std::numeric_limits<float>::infinity();
  for (ElementType t : kAllTypes) {
    const ElementInfo& f = element_info(t);
    EXPECT_EQ(encode_element(t, inf), f.max_finite_code) << f.name;
    EXPECT_EQ(encode_element(t, -inf), f.max_finite_code | sign_bit(t)) << f.name;
    EXPECT_EQ(encode_element(t, std::numeric_limits<float>::max()), f.max_finite_code) << f.name;
    EXPECT_EQ(encode_element(t, f.max_finite * 1.75f), f.max_finite_code) << f.name;
  }
  // E4M3: 464 is the midpoint between 448 and the (NaN) code 0x7F, and it must not become NaN.
  EXPECT_EQ(encode_element(ElementType::E4M3, 464.0f), 0x7Eu);
  EXPECT_EQ(encode_element(ElementType::E4M3, 470.0f), 0x7Eu);
}

TEST(Element, NanInputs) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(encode_element(ElementType::E4M3, nan), 0x7Fu);
  EXPECT_EQ(encode_element(ElementType::E4M3, -nan), 0x7Fu);
  EXPECT_EQ(encode_element(ElementType::E5M2, nan), 0x7Fu);
  EXPECT_EQ(encode_element(ElementType::F16, nan), 0x7FFFu);
  EXPECT_EQ(encode_element(ElementType::BF16, nan), 0x7FFFu);
  // No NaN in E2M1 / E2M3 / E3M2: the positive maximum, as CUDA's host converters give.
  EXPECT_EQ(encode_element(ElementType::E2M1, nan), 0x7u);
  EXPECT_EQ(encode_element(ElementType::E2M3, nan), 0x1Fu);
  EXPECT_EQ(encode_element(ElementType::E3M2, -nan), 0x1Fu);
}

TEST(Element, SubnormalsAndZeros) {
  for (ElementType t : kAllTypes) {
    const float min_sub = decode_element(t, 1);
    EXPECT_EQ(encode_element(t, min_sub / 2), 0u) << element_info(t).name;  // tie to even (0)
    EXPECT_EQ(encode_element(t, std::nextafter(min_sub / 2, 1.0f)), 1u) << element_info(t).name;
    EXPECT_EQ(encode_element(t, min_sub * 1.5f), 2u) << element_info(t).name;  // tie 1|2 -> 2
    EXPECT_EQ(encode_element(t, -0.0f), sign_bit(t)) << element_info(t).name;
    EXPECT_EQ(encode_element(t, 0.0f), 0u) << element_info(t).name;
    EXPECT_EQ(encode_element(t, std::numeric_limits<float>::denorm_min()), 0u);
  }
}

TEST(Element, E8M0) {
  EXPECT_EQ(decode_e8m0(127), 1.0f);
  EXPECT_EQ(decode_e8m0(0), std::ldexp(1.0f, -127));
  EXPECT_EQ(decode_e8m0(254), std::ldexp(1.0f, 127));
  EXPECT_TRUE(std::isnan(decode_e8m0(kE8M0Nan)));
  EXPECT_EQ(e8m0_from_exponent(0), 127);
  EXPECT_EQ(e8m0_from_exponent(-127), 0);
  EXPECT_EQ(e8m0_from_exponent(-500), 0);
  EXPECT_EQ(e8m0_from_exponent(127), 254);
  EXPECT_EQ(e8m0_from_exponent(128), 254);
  for (int e = -127; e <= 127; ++e)
    EXPECT_EQ(decode_e8m0(e8m0_from_exponent(e)), std::ldexp(1.0f, e));
}

// Inputs that stress every rounding path: random bit patterns (all exponents, NaN, Inf,
// subnormals), values near every code midpoint, and a stride over all 2^32 patterns.
std::vector<float> adversarial_floats(ElementType t) {
  std::vector<float> out;
  std::mt19937 rng(1234);
  for (int i = 0; i < 20000; ++i)
    out.push_back(std::bit_cast<float>(static_cast<std::uint32_t>(rng())));
  std::normal_distribution<float> normal(0.0f, element_info(t).max_finite / 4);
  for (int i = 0; i < 20000; ++i) out.push_back(normal(rng));
  for (std::uint64_t b = 0; b < (1ull << 32); b += 65521)
    out.push_back(std::bit_cast<float>(static_cast<std::uint32_t>(b)));
  const auto codes = positive_finite_codes(t);
  for (std::size_t i = 0; i + 1 < codes.size(); i += (codes.size() > 4096 ? 7 : 1)) {
    const auto mid = static_cast<float>(
        (static_cast<double>(decode_element(t, codes[i])) + decode_element(t, codes[i + 1])) / 2);
    for (float v : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e30f)}) {
      out.push_back(v);
      out.push_back(-v);
    }
  }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  for (float v : {0.0f, -0.0f, nan, -nan, inf, -inf, element_info(t).max_finite,
                  std::nextafter(element_info(t).max_finite, inf)}) {
    out.push_back(v);
  }
  // An odd count exercises the masked tail of the vector loops.
  if (out.size() % 16 == 0) out.push_back(1.0f);
  return out;
}

TEST(Element, BulkPathsMatchTheScalarReferenceBitForBit) {
  for (ElementType t : kAllTypes) {
    const auto values = adversarial_floats(t);
    std::vector<float> decoded(values.size());
    if (element_info(t).bits <= 8) {
      std::vector<std::uint8_t> codes(values.size());
      encode_elements(t, values, codes);
      for (std::size_t i = 0; i < values.size(); ++i) {
        ASSERT_EQ(codes[i], encode_element(t, values[i]))
            << element_info(t).name << " value bits " << std::hex << bits_of(values[i]);
      }
      std::vector<std::uint8_t> all(code_count(t));
      for (std::uint32_t c = 0; c < all.size(); ++c) all[c] = static_cast<std::uint8_t>(c);
      std::vector<float> out(all.size());
      decode_elements(t, all, out);
      for (std::uint32_t c = 0; c < all.size(); ++c) {
        ASSERT_EQ(bits_of(out[c]), bits_of(decode_element(t, c))) << element_info(t).name << c;
      }
    } else {
      std::vector<std::uint16_t> codes(values.size());
      encode_elements16(t, values, codes);
      for (std::size_t i = 0; i < values.size(); ++i) {
        ASSERT_EQ(codes[i], encode_element(t, values[i]))
            << element_info(t).name << " value bits " << std::hex << bits_of(values[i]);
      }
      std::vector<std::uint16_t> all(code_count(t));
      for (std::uint32_t c = 0; c < all.size(); ++c) all[c] = static_cast<std::uint16_t>(c);
      std::vector<float> out(all.size());
      decode_elements16(t, all, out);
      for (std::uint32_t c = 0; c < all.size(); ++c) {
        ASSERT_EQ(bits_of(out[c]), bits_of(decode_element(t, c))) << element_info(t).name << c;
      }
    }
  }
}

TEST(Element, EncoderMatchesTheIndependentReference) {
  for (ElementType t : kAllTypes) {
    for (float x : adversarial_floats(t)) {
      ASSERT_EQ(encode_element(t, x), reference_encode(t, x))
          << element_info(t).name << " value bits " << std::hex << bits_of(x);
    }
  }
}

TEST(Element, EncodingIsNearestForRandomValues) {
  // Independent of the encoder's arithmetic: the chosen code is at least as close as both
  // neighbours (checked by brute force over the code table).
  std::mt19937 rng(99);
  for (ElementType t : kNarrowTypes) {
    const auto codes = positive_finite_codes(t);
    std::uniform_real_distribution<float> uni(0.0f, element_info(t).max_finite);
    for (int i = 0; i < 5000; ++i) {
      const float x = uni(rng);
      const double got = decode_element(t, encode_element(t, x));
      for (std::uint32_t c : codes) {
        ASSERT_LE(std::abs(got - x), std::abs(static_cast<double>(decode_element(t, c)) - x))
            << element_info(t).name << " x=" << x;
      }
    }
  }
}

// The E4M3 vectors of the MiniMax-M2 fixture (an independent codec, tools/fp8_e4m3.py, checked
// against all 256 codes): the value of every code, for the encoder here and the safetensors
// decoder, and round-to-nearest-even saturating encoding of every finite value, every midpoint
// and the values either side of it, values above 448 and below half the smallest subnormal.
// Inputs that float32 cannot hold exactly (the doubles just beside a midpoint) are skipped: as
// float32 they round onto the midpoint and ask a different question.
TEST(Element, E4M3MatchesTheMiniMaxFixtureVectors) {
  PQ_REQUIRE_SHARED();
  std::ifstream in(test::shared_dir() / "fixtures" / "minimax_m2-tiny-random-logits.json");
  const nlohmann::json fixture = nlohmann::json::parse(in);
  const auto& table = fixture["e4m3_decode_table"];
  ASSERT_EQ(table.size(), 256u);
  for (std::uint32_t code = 0; code < 256; ++code) {
    const float decoded = decode_element(ElementType::E4M3, code);
    const float stored = io::f8e4m3_bits_to_f32(static_cast<std::uint8_t>(code));
    if (table[code].is_null()) {
      EXPECT_TRUE(std::isnan(decoded) && std::isnan(stored)) << code;
      continue;
    }
    EXPECT_EQ(bits_of(decoded), bits_of(table[code].get<float>())) << code;
    EXPECT_EQ(bits_of(stored), bits_of(decoded)) << code;
  }
  std::size_t checked = 0;
  const auto& vectors = fixture["e4m3_rne_vectors"];
  for (const auto& vector : vectors) {
    const double input = vector[0].get<double>();
    const auto value = static_cast<float>(input);
    if (static_cast<double>(value) != input) continue;
    EXPECT_EQ(encode_element(ElementType::E4M3, value), vector[1].get<std::uint32_t>())
        << "input " << input;
    ++checked;
  }
  EXPECT_GE(checked, vectors.size() / 2);
}

TEST(Element, BulkSizeMismatchIsAnError) {
  std::vector<float> v(3);
  std::vector<std::uint8_t> c(2);
  EXPECT_ANY_THROW(encode_elements(ElementType::E4M3, v, c));
  std::vector<std::uint8_t> c3(3);
  EXPECT_ANY_THROW(encode_elements(ElementType::BF16, v, c3));
}

}  // namespace
}  // namespace pq::formats
