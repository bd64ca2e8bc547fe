#include "formats/element.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>

#include "common/cpu_features.h"
#include "common/error.h"
#include "formats/simd_kernels.h"

namespace pq::formats {
namespace {

// Bias, maxima and specials: OCP MX v1.0 Table 1 / OFP8 v1.0 (via microxcaling
// mx/formats.py `_get_format_params`); IEEE 754 binary16; bfloat16 = top half of binary32.
// nan_code: see element.h (matches CUDA 13 host converters, cross-checked in tests).
constexpr std::array<ElementInfo, 7> kElements = {{
    {"E2M1", 4, 2, 1, 1, false, 6.0f, 0x7, 0x7},
    {"E2M3", 6, 2, 3, 1, false, 7.5f, 0x1F, 0x1F},
    {"E3M2", 6, 3, 2, 3, false, 28.0f, 0x1F, 0x1F},
    {"E4M3", 8, 4, 3, 7, false, 448.0f, 0x7E, 0x7F},
    {"E5M2", 8, 5, 2, 15, true, 57344.0f, 0x7B, 0x7F},
    {"F16", 16, 5, 10, 15, true, 65504.0f, 0x7BFF, 0x7FFF},
    {"BF16", 16, 8, 7, 127, true, 3.38953139e38f, 0x7F7F, 0x7FFF},
}};

// Callers ask these in this order: AVX-512 when the CPU has it, else AVX2, else scalar.
bool use_avx512() {
  return cpu_features().has_avx512_core();
}
bool use_avx2() {
  return cpu_features().has_avx2_fma();
}

void check_sizes(std::size_t values, std::size_t codes, const char* what) {
  PQ_CHECK(values == codes, "{}: {} values but {} codes", what, values, codes);
}

}  // namespace

const ElementInfo& element_info(ElementType type) {
  return kElements[static_cast<std::size_t>(type)];
}

int floor_log2(float x) {
  return std::ilogb(x);
}

std::uint32_t encode_element(ElementType type, float value) {
  // Integer arithmetic on the f32 bits, the same steps as the SIMD encoders
  // (formats_avx512.cpp, formats_avx2.cpp); tests check it against an independent ldexp/nearbyint
  // reference and against CUDA's converters.
  const ElementInfo& f = element_info(type);
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  const std::uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return f.nan_code;
  const int shift = 23 - f.man_bits;
  const int emin = 1 - f.bias;
  std::uint32_t code;
  if (magnitude < static_cast<std::uint32_t>(127 + emin) << 23) {
    // Below the smallest normal: adding 2^(emin - m + 23) makes the FPU round at the subnormal
    // step (ties to even); the low bits of the sum are the code.
    const std::uint32_t magic_bits = static_cast<std::uint32_t>(127 + emin - f.man_bits + 23) << 23;
    const float sum = std::bit_cast<float>(magnitude) + std::bit_cast<float>(magic_bits);
    code = std::bit_cast<std::uint32_t>(sum) - magic_bits;
  } else {
    // Normal: add half a step minus one plus the bit that breaks ties towards even, drop the
    // extra mantissa bits, then move the exponent bias from 127 to the format's.
    const std::uint32_t tie_bit = (magnitude >> shift) & 1u;
    code = ((magnitude + (1u << (shift - 1)) - 1u + tie_bit) >> shift) -
           (static_cast<std::uint32_t>(127 - f.bias) << f.man_bits);
  }
  // Saturation: codes are monotonic in magnitude, so anything past the largest finite code
  // (overflow, Inf, E4M3's NaN slot) clamps to it.
  code = std::min(code, f.max_finite_code);
  return code | ((bits >> 31) << (f.bits - 1));
}

float decode_element(ElementType type, std::uint32_t code) {
  const ElementInfo& f = element_info(type);
  const std::uint32_t sign_bit = 1u << (f.bits - 1);
  const bool negative = code & sign_bit;
  const std::uint32_t magnitude_bits = code & (sign_bit - 1);
  const std::uint32_t exp_field = magnitude_bits >> f.man_bits;
  const std::uint32_t mantissa = magnitude_bits & ((1u << f.man_bits) - 1);
  const std::uint32_t sign32 = negative ? 0x80000000u : 0u;
  if (f.ieee_specials && exp_field == (1u << f.exp_bits) - 1) {
    // Inf (mantissa 0) or NaN with the mantissa carried into the top of the f32 payload.
    return std::bit_cast<float>(sign32 | 0x7F800000u | (mantissa << (23 - f.man_bits)));
  }
  if (type == ElementType::E4M3 && magnitude_bits == 0x7F) {
    return std::bit_cast<float>(sign32 | 0x7FC00000u);
  }
  const int emin = 1 - f.bias;
  const float magnitude = exp_field == 0
                              ? std::ldexp(static_cast<float>(mantissa), emin - f.man_bits)
                              : std::ldexp(static_cast<float>(mantissa + (1u << f.man_bits)),
                                           static_cast<int>(exp_field) - f.bias - f.man_bits);
  return negative ? -magnitude : magnitude;
}

void encode_elements(ElementType type, std::span<const float> values,
                     std::span<std::uint8_t> codes) {
  check_sizes(values.size(), codes.size(), "encode_elements");
  PQ_CHECK(element_info(type).bits <= 8, "encode_elements: {} needs 16-bit codes",
           element_info(type).name);
  if (use_avx512()) return simd::encode_elements_avx512(type, values, codes);
  if (use_avx2()) return simd::encode_elements_avx2(type, values, codes);
  for (std::size_t i = 0; i < values.size(); ++i) {
    codes[i] = static_cast<std::uint8_t>(encode_element(type, values[i]));
  }
}

void decode_elements(ElementType type, std::span<const std::uint8_t> codes,
                     std::span<float> values) {
  check_sizes(values.size(), codes.size(), "decode_elements");
  PQ_CHECK(element_info(type).bits <= 8, "decode_elements: {} needs 16-bit codes",
           element_info(type).name);
  if (use_avx512()) return simd::decode_elements_avx512(type, codes, values);
  if (use_avx2()) return simd::decode_elements_avx2(type, codes, values);
  for (std::size_t i = 0; i < values.size(); ++i) values[i] = decode_element(type, codes[i]);
}

void encode_elements16(ElementType type, std::span<const float> values,
                       std::span<std::uint16_t> codes) {
  check_sizes(values.size(), codes.size(), "encode_elements16");
  PQ_CHECK(element_info(type).bits == 16, "encode_elements16: {} has 8-bit-or-narrower codes",
           element_info(type).name);
  if (use_avx512()) return simd::encode_elements16_avx512(type, values, codes);
  if (use_avx2()) return simd::encode_elements16_avx2(type, values, codes);
  for (std::size_t i = 0; i < values.size(); ++i) {
    codes[i] = static_cast<std::uint16_t>(encode_element(type, values[i]));
  }
}

void decode_elements16(ElementType type, std::span<const std::uint16_t> codes,
                       std::span<float> values) {
  check_sizes(values.size(), codes.size(), "decode_elements16");
  PQ_CHECK(element_info(type).bits == 16, "decode_elements16: {} has 8-bit-or-narrower codes",
           element_info(type).name);
  if (use_avx512()) return simd::decode_elements16_avx512(type, codes, values);
  if (use_avx2()) return simd::decode_elements16_avx2(type, codes, values);
  for (std::size_t i = 0; i < values.size(); ++i) values[i] = decode_element(type, codes[i]);
}

float decode_e8m0(std::uint8_t code) {
  if (code == kE8M0Nan) return std::bit_cast<float>(0x7FC00000u);
  return std::ldexp(1.0f, static_cast<int>(code) - 127);
}

std::uint8_t e8m0_from_exponent(int exponent) {
  return static_cast<std::uint8_t>(std::clamp(exponent, -127, 127) + 127);
}

}  // namespace pq::formats
