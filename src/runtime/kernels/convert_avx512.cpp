// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma; entered only after a CPUID check.
#include <immintrin.h>

#include "runtime/kernels/simd.h"

namespace pq::runtime::avx512 {

// Same rounding as the scalar path (convert.cpp): add 0x7fff + lsb of the kept half, keep the
// high 16 bits; NaNs are truncated and made quiet. vcvtneps2bf16 is not used because it flushes
// subnormal inputs to zero (Intel SDM, VCVTNEPS2BF16), which would differ from the scalar path.
static __m256i round_16(__m512i bits) {
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __m512i abs_bits = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(abs_bits, _mm512_set1_epi32(0x7f800000));
  const __m512i quiet_nan = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet_nan));
}

void convert_f32_to_bf16(const float* in, std::uint16_t* out, std::size_t n) {
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i bits = _mm512_loadu_si512(in + i);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), round_16(bits));
  }
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512i bits = _mm512_maskz_loadu_epi32(tail, in + i);
    _mm256_mask_storeu_epi16(out + i, tail, round_16(bits));
  }
}

void convert_bf16_to_f32(const std::uint16_t* in, float* out, std::size_t n) {
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i));
    _mm512_storeu_si512(out + i, _mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
  }
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m256i half = _mm256_maskz_loadu_epi16(tail, in + i);
    _mm512_mask_storeu_ps(out + i, tail,
                          _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16)));
  }
}

}  // namespace pq::runtime::avx512
