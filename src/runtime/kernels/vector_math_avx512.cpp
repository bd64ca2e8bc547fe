// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma; entered only after a CPUID check.
#include <immintrin.h>

#include "runtime/kernels/exp_avx512.h"
#include "runtime/kernels/simd.h"

namespace pq::runtime::avx512 {

namespace {

__mmask16 tail_mask(std::int64_t remaining) {
  return static_cast<__mmask16>(remaining >= 16 ? 0xffffu : (1u << remaining) - 1u);
}

}  // namespace

double exp_shifted_sum(float* x, std::int64_t n, float shift) {
  const __m512 shift_v = _mm512_set1_ps(shift);
  // Two double accumulators (low and high 8 lanes) keep the sum as exact as a scalar double sum.
  __m512d sum_lo = _mm512_setzero_pd(), sum_hi = _mm512_setzero_pd();
  for (std::int64_t j = 0; j < n; j += 16) {
    const __mmask16 mask = tail_mask(n - j);
    const __m512 e = _mm512_maskz_mov_ps(
        mask, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, x + j), shift_v)));
    _mm512_mask_storeu_ps(x + j, mask, e);
    sum_lo = _mm512_add_pd(sum_lo, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
    sum_hi = _mm512_add_pd(
        sum_hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1))));
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(sum_lo, sum_hi));
}

void sigmoid(const float* x, float* y, std::int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (std::int64_t j = 0; j < n; j += 16) {
    const __mmask16 mask = tail_mask(n - j);
    const __m512 v = _mm512_maskz_loadu_ps(mask, x + j);
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), v));
    _mm512_mask_storeu_ps(y + j, mask, _mm512_div_ps(one, _mm512_add_ps(one, e)));
  }
}

}  // namespace pq::runtime::avx512
