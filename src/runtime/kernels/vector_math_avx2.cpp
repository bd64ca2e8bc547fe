// Compiled with -mavx2 -mfma; entered only after a CPUID check (CpuFeatures::has_avx2_fma).
#include <immintrin.h>

#include "runtime/kernels/exp_avx2.h"
#include "runtime/kernels/simd.h"

namespace pq::runtime::avx2 {

double exp_shifted_sum(float* x, std::int64_t n, float shift) {
  const __m256 shift_v = _mm256_set1_ps(shift);
  // Two double accumulators (low and high 4 lanes) keep the sum as exact as a scalar double sum.
  __m256d sum_lo = _mm256_setzero_pd(), sum_hi = _mm256_setzero_pd();
  for (std::int64_t j = 0; j < n; j += 8) {
    const __m256i mask = tail_mask(n - j);
    const __m256 e = _mm256_and_ps(exp_ps(_mm256_sub_ps(_mm256_maskload_ps(x + j, mask), shift_v)),
                                   _mm256_castsi256_ps(mask));
    _mm256_maskstore_ps(x + j, mask, e);
    sum_lo = _mm256_add_pd(sum_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    sum_hi = _mm256_add_pd(sum_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  const __m256d sum = _mm256_add_pd(sum_lo, sum_hi);
  const __m128d half = _mm_add_pd(_mm256_castpd256_pd128(sum), _mm256_extractf128_pd(sum, 1));
  return _mm_cvtsd_f64(_mm_add_sd(half, _mm_unpackhi_pd(half, half)));
}

void sigmoid(const float* x, float* y, std::int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  for (std::int64_t j = 0; j < n; j += 8) {
    const __m256i mask = tail_mask(n - j);
    const __m256 v = _mm256_maskload_ps(x + j, mask);
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), v));
    _mm256_maskstore_ps(y + j, mask, _mm256_div_ps(one, _mm256_add_ps(one, e)));
  }
}

}  // namespace pq::runtime::avx2
