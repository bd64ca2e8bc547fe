#include "io/dtype.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/error.h"

namespace pq::io {
namespace {

TEST(DType, NamesRoundTripAndSizesMatchTheFormat) {
  for (const DType dtype : kAllDTypes) {
    const auto parsed = parse_dtype(dtype_name(dtype));
    ASSERT_TRUE(parsed.has_value()) << dtype_name(dtype);
    EXPECT_EQ(*parsed, dtype);
  }
  EXPECT_EQ(dtype_size(DType::F64), 8u);
  EXPECT_EQ(dtype_size(DType::U64), 8u);
  EXPECT_EQ(dtype_size(DType::U32), 4u);
  EXPECT_EQ(dtype_size(DType::BF16), 2u);
  EXPECT_EQ(dtype_size(DType::U16), 2u);
  EXPECT_EQ(dtype_size(DType::F8_E4M3), 1u);
  EXPECT_EQ(dtype_size(DType::BOOL), 1u);
  EXPECT_FALSE(parse_dtype("F7").has_value());
  EXPECT_FALSE(parse_dtype("f32").has_value());
}

// OCP 8-bit floating point spec (OFP8, v1.0), table 1: E4M3 has bias 7, max normal 448, min
// subnormal 2^-9, no infinities and S.1111.111 as NaN; E5M2 has bias 15, max normal 57344,
// min subnormal 2^-16, IEEE infinities and NaNs.
TEST(DType, F8E4M3SpecialValues) {
  EXPECT_EQ(f8e4m3_bits_to_f32(0x00), 0.0f);
  EXPECT_TRUE(std::signbit(f8e4m3_bits_to_f32(0x80)));
  EXPECT_EQ(f8e4m3_bits_to_f32(0x80), 0.0f);
  EXPECT_EQ(f8e4m3_bits_to_f32(0x01), std::ldexp(1.0f, -9));
  EXPECT_EQ(f8e4m3_bits_to_f32(0x07), 7 * std::ldexp(1.0f, -9));  // largest subnormal
  EXPECT_EQ(f8e4m3_bits_to_f32(0x08), std::ldexp(1.0f, -6));      // smallest normal
  EXPECT_EQ(f8e4m3_bits_to_f32(0x38), 1.0f);
  EXPECT_EQ(f8e4m3_bits_to_f32(0x7e), 448.0f);
  EXPECT_EQ(f8e4m3_bits_to_f32(0xfe), -448.0f);
  EXPECT_EQ(f8e4m3_bits_to_f32(0x78), 256.0f);  // exponent 15 holds finite values
  EXPECT_TRUE(std::isnan(f8e4m3_bits_to_f32(0x7f)));
  EXPECT_TRUE(std::isnan(f8e4m3_bits_to_f32(0xff)));
}

// decode_to_f32 gives every byte of both 8-bit formats exactly the scalar conversion's value
// (NaN for NaN, the sign of zero kept).
TEST(DType, DecodeToF32OfEveryFp8ByteIsTheScalarConversion) {
  std::vector<std::uint8_t> bytes(256);
  for (int b = 0; b < 256; ++b) bytes[b] = static_cast<std::uint8_t>(b);
  std::vector<float> out(256);
  for (const DType dtype : {DType::F8_E4M3, DType::F8_E5M2}) {
    decode_to_f32(dtype, bytes, out);
    for (int b = 0; b < 256; ++b) {
      const float expected =
          dtype == DType::F8_E4M3 ? f8e4m3_bits_to_f32(bytes[b]) : f8e5m2_bits_to_f32(bytes[b]);
      EXPECT_EQ(std::bit_cast<std::uint32_t>(out[b]), std::bit_cast<std::uint32_t>(expected))
          << dtype_name(dtype) << " byte " << b;
    }
  }
}

TEST(DType, F8E5M2SpecialValues) {
  EXPECT_EQ(f8e5m2_bits_to_f32(0x01), std::ldexp(1.0f, -16));
  EXPECT_EQ(f8e5m2_bits_to_f32(0x04), std::ldexp(1.0f, -14));  // smallest normal
  EXPECT_EQ(f8e5m2_bits_to_f32(0x3c), 1.0f);
  EXPECT_EQ(f8e5m2_bits_to_f32(0x7b), 57344.0f);
  EXPECT_EQ(f8e5m2_bits_to_f32(0x7c), std::numeric_limits<float>::infinity());
  EXPECT_EQ(f8e5m2_bits_to_f32(0xfc), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(f8e5m2_bits_to_f32(0x7d)));
  EXPECT_TRUE(std::isnan(f8e5m2_bits_to_f32(0xff)));
  EXPECT_TRUE(std::signbit(f8e5m2_bits_to_f32(0x80)));
}

// IEEE 754 binary16: bias 15, subnormals m x 2^-24, max finite 65504.
TEST(DType, F16SubnormalsAndLimits) {
  EXPECT_EQ(f16_bits_to_f32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(f16_bits_to_f32(0x03ff), 1023 * std::ldexp(1.0f, -24));
  EXPECT_EQ(f16_bits_to_f32(0x8001), -std::ldexp(1.0f, -24));
  EXPECT_EQ(f16_bits_to_f32(0x0400), std::ldexp(1.0f, -14));
  EXPECT_EQ(f16_bits_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_bits_to_f32(0x7bff), 65504.0f);
  EXPECT_EQ(f16_bits_to_f32(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(f16_bits_to_f32(0x7e00)));
}

// Every one of the 65,536 F16 encodings widens to the value the compiler's own _Float16 gives.
TEST(DType, F16MatchesCompilerConversionForAllEncodings) {
  for (std::uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const auto h = static_cast<std::uint16_t>(bits);
    _Float16 reference;
    std::memcpy(&reference, &h, 2);
    const float expected = static_cast<float>(reference);
    const float got = f16_bits_to_f32(h);
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(got)) << bits;
    } else {
      EXPECT_EQ(std::bit_cast<std::uint32_t>(got), std::bit_cast<std::uint32_t>(expected)) << bits;
    }
  }
}

TEST(DType, BF16AndF64) {
  EXPECT_EQ(bf16_bits_to_f32(0x3f80), 1.0f);
  EXPECT_EQ(bf16_bits_to_f32(0xc040), -3.0f);
  EXPECT_EQ(bf16_bits_to_f32(0x0001), std::ldexp(1.0f, -133));  // bf16 subnormal
  EXPECT_EQ(bf16_bits_to_f32(0x7f80), std::numeric_limits<float>::infinity());
  const double values[] = {1.0 + std::ldexp(1.0, -30), 1e300, -2.5};
  float out[3];
  decode_to_f32(DType::F64, {reinterpret_cast<const std::uint8_t*>(values), sizeof values}, out);
  EXPECT_EQ(out[0], 1.0f);  // rounded to nearest
  EXPECT_EQ(out[1], std::numeric_limits<float>::infinity());
  EXPECT_EQ(out[2], -2.5f);
}

TEST(DType, DecodeRejectsIntegersAndSizeMismatch) {
  const std::uint8_t bytes[4] = {};
  float out[1];
  EXPECT_THROW(decode_to_f32(DType::I32, bytes, out), Error);
  EXPECT_THROW(decode_to_f32(DType::F16, bytes, out), Error);
}

TEST(DType, FirstNonFiniteFindsEveryKindAtAnyPlace) {
  std::vector<float> values(3000);
  for (std::size_t i = 0; i < values.size(); ++i) {
    values[i] = static_cast<float>(i % 7) - 3.0f;
  }
  // Extremes that are still finite.
  values[5] = std::numeric_limits<float>::max();
  values[6] = -std::numeric_limits<float>::max();
  values[7] = std::numeric_limits<float>::denorm_min();
  EXPECT_EQ(first_non_finite(values), values.size());
  EXPECT_EQ(first_non_finite({}), 0u);
  const float specials[] = {
      std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::quiet_NaN(),
      std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()};
  // First, last, and on both sides of the 1024-element blocks of the fast scan.
  for (const std::size_t at : {std::size_t{0}, std::size_t{1023}, std::size_t{1024},
                               std::size_t{2047}, std::size_t{2999}}) {
    for (const float special : specials) {
      std::vector<float> damaged = values;
      damaged[at] = special;
      EXPECT_EQ(first_non_finite(damaged), at) << special << " at " << at;
      if (at + 5 < damaged.size()) damaged[at + 5] = special;
      EXPECT_EQ(first_non_finite(damaged), at);
    }
  }
  std::vector<float> damaged = values;
  damaged[1500] = std::numeric_limits<float>::infinity();
  try {
    require_finite(damaged, "tensor w");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "tensor w holds a non-finite value (inf at element 1500 of 3000)");
  }
}

}  // namespace
}  // namespace pq::io
