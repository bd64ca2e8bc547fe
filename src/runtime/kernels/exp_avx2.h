#pragma once

// Vectorized e^x for the AVX2 + FMA kernels. Include only from files compiled with
// -mavx2 -mfma (see CMakeLists.txt).

#include <immintrin.h>

namespace pq::runtime::avx2 {

// e^x, the same range reduction and degree-7 polynomial as avx512::exp_ps (x = n ln2 + r,
// |r| <= ln2/2, truncation error < 1e-8 relative). AVX2 has no vscalefps: 2^n is applied as two
// factors 2^(n/2) and 2^(n - n/2), each a normal float for n in [-174, 128] after the clamp, so
// very negative x (and -inf) underflow gracefully to 0 as with vscalefps.
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-120.0f)), _mm256_set1_ps(88.7f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(ni, 1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 scale_a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
  const __m256 scale_b = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, scale_a), scale_b);
}

// Lanes [0, remaining) set: the mask of _mm256_maskload_ps / _mm256_maskstore_ps for a tail.
inline __m256i tail_mask(long remaining) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(remaining >= 8 ? 8 : static_cast<int>(remaining)),
                            lanes);
}

}  // namespace pq::runtime::avx2
