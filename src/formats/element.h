#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

namespace pq::formats {

// Element (code) formats of the quantized weights and their scales.
//
// Every encoder rounds to nearest, ties to even, and saturates: finite values beyond the largest
// finite code and infinities become the largest finite code of their sign (CUDA's
// __NV_SATFINITE behaviour, cuda_fp8.h / cuda_fp6.h / cuda_fp4.h). NaN inputs encode to the
// positive code with every magnitude bit set: a NaN in E4M3 (0x7F), E5M2 (0x7F), FP16 (0x7FFF) and
// BF16 (0x7FFF); in E2M1, E2M3 and E3M2, which have no NaN, it is the positive maximum (6, 7.5,
// 28), as the CUDA host converters do. Negative zero keeps its sign bit. Subnormals of each format
// are produced and decoded.
//
// Code layout: sign in the top bit of the format's width, then exponent, then mantissa. Facts
// (bias, maxima, specials): OCP Microscaling Formats v1.0 / OFP8 spec, microsoft/microxcaling
// mx/formats.py `_get_format_params`, ../shared/docs/format-facts.md Part B.
enum class ElementType : std::uint8_t {
  E2M1,  // FP4: bias 1, max 6, no Inf/NaN
  E2M3,  // FP6: bias 1, max 7.5, no Inf/NaN
  E3M2,  // FP6: bias 3, max 28, no Inf/NaN
  E4M3,  // FP8 OCP "fn": bias 7, max 448, no Inf, S.1111.111 = NaN
  E5M2,  // FP8: bias 15, max 57344, IEEE Inf/NaN
  F16,   // IEEE binary16
  BF16,  // bfloat16
};

struct ElementInfo {
  std::string_view name;
  int bits;  // storage width of one code
  int exp_bits;
  int man_bits;
  int bias;
  bool ieee_specials;  // exponent all-ones is Inf/NaN (E5M2, F16, BF16)
  float max_finite;
  std::uint32_t max_finite_code;  // magnitude bits of the largest finite value
  std::uint32_t nan_code;         // what NaN inputs encode to (see above)
};

const ElementInfo& element_info(ElementType type);

// Scalar reference conversions. Codes occupy the low `bits` bits.
std::uint32_t encode_element(ElementType type, float value);
float decode_element(ElementType type, std::uint32_t code);

// Bulk conversions of 8-bit-or-narrower elements (one code per byte) and of 16-bit ones. These
// take the AVX-512 path when the CPU has it (pq::cpu_features()), else the AVX2 one, and give the
// scalar reference's bits exactly.
void encode_elements(ElementType type, std::span<const float> values,
                     std::span<std::uint8_t> codes);
void decode_elements(ElementType type, std::span<const std::uint8_t> codes,
                     std::span<float> values);
void encode_elements16(ElementType type, std::span<const float> values,
                       std::span<std::uint16_t> codes);
void decode_elements16(ElementType type, std::span<const std::uint16_t> codes,
                       std::span<float> values);

// E8M0 shared scales (OCP MX v1.0 §5.4): unsigned, 8 exponent bits, bias 127, value 2^(code-127);
// 0xFF is NaN and there is no zero. Codes are built from an integer exponent, never rounded from
// an arbitrary float, so the scale rule (see group_codec.h) decides the rounding.
inline constexpr std::uint8_t kE8M0Nan = 0xFF;
float decode_e8m0(std::uint8_t code);
// 2^exponent as E8M0, exponent clamped to the finite range [-127, 127].
std::uint8_t e8m0_from_exponent(int exponent);

// floor(log2(x)) for a positive finite float, subnormals included.
int floor_log2(float x);

}  // namespace pq::formats
