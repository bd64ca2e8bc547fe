// Cross-checks the element codecs against NVIDIA's host-side conversions in the CUDA headers
// (cuda_fp8.h, cuda_fp6.h, cuda_fp4.h, cuda_fp16.h, cuda_bf16.h), an implementation written
// independently of ours. Built only when CMake finds the headers.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp4.h>
#include <cuda_fp6.h>
#include <cuda_fp8.h>
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "formats/element.h"

namespace pq::formats {
namespace {

std::vector<float> probe_values() {
  std::vector<float> out;
  std::mt19937 rng(7);
  for (int i = 0; i < 200000; ++i)
    out.push_back(std::bit_cast<float>(static_cast<std::uint32_t>(rng())));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int scale = -20; scale <= 20; ++scale) {
    for (int i = 0; i < 2000; ++i) out.push_back(std::ldexp(normal(rng), scale));
  }
  for (std::uint64_t b = 0; b < (1ull << 32); b += 4093)
    out.push_back(std::bit_cast<float>(static_cast<std::uint32_t>(b)));
  return out;
}

float half_raw_to_float(__half_raw h) {
  return __half2float(__half(h));
}

TEST(CudaCrossCheck, Fp8EncodeMatchesSatfinite) {
  for (float x : probe_values()) {
    ASSERT_EQ(encode_element(ElementType::E4M3, x),
              __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3))
        << std::hex << std::bit_cast<std::uint32_t>(x);
    ASSERT_EQ(encode_element(ElementType::E5M2, x),
              __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E5M2))
        << std::hex << std::bit_cast<std::uint32_t>(x);
  }
}

TEST(CudaCrossCheck, Fp6AndFp4EncodeMatch) {
  for (float x : probe_values()) {
    ASSERT_EQ(encode_element(ElementType::E2M3, x),
              __nv_cvt_float_to_fp6(x, __NV_E2M3, cudaRoundNearest))
        << std::hex << std::bit_cast<std::uint32_t>(x);
    ASSERT_EQ(encode_element(ElementType::E3M2, x),
              __nv_cvt_float_to_fp6(x, __NV_E3M2, cudaRoundNearest))
        << std::hex << std::bit_cast<std::uint32_t>(x);
    ASSERT_EQ(encode_element(ElementType::E2M1, x),
              __nv_cvt_float_to_fp4(x, __NV_E2M1, cudaRoundNearest))
        << std::hex << std::bit_cast<std::uint32_t>(x);
  }
}

TEST(CudaCrossCheck, HalfAndBfloat16EncodeMatchOnFiniteRange) {
  // CUDA's __float2half_rn / __float2bfloat16_rn overflow to Inf where we saturate, so compare
  // only values that stay finite; NaN maps to 0x7FFF in both.
  for (float x : probe_values()) {
    if (std::isnan(x)) {
      EXPECT_EQ(encode_element(ElementType::F16, x), __half_raw(__float2half_rn(x)).x);
      EXPECT_EQ(encode_element(ElementType::BF16, x), __nv_bfloat16_raw(__float2bfloat16_rn(x)).x);
      continue;
    }
    const std::uint16_t h = __half_raw(__float2half_rn(x)).x;
    if ((h & 0x7C00) != 0x7C00) {
      ASSERT_EQ(encode_element(ElementType::F16, x), h)
          << std::hex << std::bit_cast<std::uint32_t>(x);
    }
    const std::uint16_t b = __nv_bfloat16_raw(__float2bfloat16_rn(x)).x;
    if ((b & 0x7F80) != 0x7F80) {
      ASSERT_EQ(encode_element(ElementType::BF16, x), b)
          << std::hex << std::bit_cast<std::uint32_t>(x);
    }
  }
}

TEST(CudaCrossCheck, EveryCodeDecodesLikeCuda) {
  auto same = [](float a, float b) { return (std::isnan(a) && std::isnan(b)) || a == b; };
  for (std::uint32_t c = 0; c < 256; ++c) {
    const auto code = static_cast<__nv_fp8_storage_t>(c);
    EXPECT_TRUE(same(decode_element(ElementType::E4M3, c),
                     half_raw_to_float(__nv_cvt_fp8_to_halfraw(code, __NV_E4M3))))
        << c;
    EXPECT_TRUE(same(decode_element(ElementType::E5M2, c),
                     half_raw_to_float(__nv_cvt_fp8_to_halfraw(code, __NV_E5M2))))
        << c;
    EXPECT_TRUE(same(decode_e8m0(static_cast<std::uint8_t>(c)),
                     __bfloat162float(__nv_bfloat16(__nv_cvt_e8m0_to_bf16raw(code)))))
        << c;
  }
  for (std::uint32_t c = 0; c < 64; ++c) {
    const auto code = static_cast<__nv_fp6_storage_t>(c);
    EXPECT_EQ(decode_element(ElementType::E2M3, c),
              half_raw_to_float(__nv_cvt_fp6_to_halfraw(code, __NV_E2M3)))
        << c;
    EXPECT_EQ(decode_element(ElementType::E3M2, c),
              half_raw_to_float(__nv_cvt_fp6_to_halfraw(code, __NV_E3M2)))
        << c;
  }
  for (std::uint32_t c = 0; c < 16; ++c) {
    EXPECT_EQ(
        decode_element(ElementType::E2M1, c),
        half_raw_to_float(__nv_cvt_fp4_to_halfraw(static_cast<__nv_fp4_storage_t>(c), __NV_E2M1)))
        << c;
  }
  for (std::uint32_t c = 0; c < 65536; ++c) {
    __half_raw hr;
    hr.x = static_cast<unsigned short>(c);
    EXPECT_TRUE(same(decode_element(ElementType::F16, c), half_raw_to_float(hr))) << c;
    __nv_bfloat16_raw br;
    br.x = static_cast<unsigned short>(c);
    EXPECT_TRUE(same(decode_element(ElementType::BF16, c), __bfloat162float(__nv_bfloat16(br))))
        << c;
  }
}

TEST(CudaCrossCheck, E8M0FromExponentMatchesExactPowersOfTwo) {
  for (int e = -127; e <= 127; ++e) {
    EXPECT_EQ(e8m0_from_exponent(e),
              __nv_cvt_float_to_e8m0(std::ldexp(1.0f, e), __NV_SATFINITE, cudaRoundZero))
        << e;
  }
}

}  // namespace
}  // namespace pq::formats
