// Compiled with -mavx2 -mfma; entered only after a CPUID check (CpuFeatures::has_avx2_fma).
#include <immintrin.h>

#include <algorithm>

#include "runtime/kernels/exp_avx2.h"
#include "runtime/kernels/simd.h"

namespace pq::runtime::avx2 {
namespace {

// Register block of the tile GEMM: kRows rows of C times up to kVectors 8-float vectors. 4 x 3
// accumulators plus 3 B vectors and one broadcast fit the 16 ymm registers.
constexpr int kRows = 4;
constexpr int kVectors = 3;

// C[rows, 8 * vectors] += alpha * A[rows, k] B[k, 8 * vectors]; the last vector of each row is
// limited to last_mask (B and C are never touched past n).
template <int rows, int vectors>
void micro_kernel(std::int64_t k, float alpha, const float* a, std::int64_t a_row_stride,
                  std::int64_t a_col_stride, const float* b, std::int64_t ldb, float* c,
                  std::int64_t ldc, __m256i last_mask) {
  __m256 acc[rows][vectors];
#pragma GCC unroll 4
  for (int r = 0; r < rows; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < vectors; ++v) acc[r][v] = _mm256_setzero_ps();
  for (std::int64_t p = 0; p < k; ++p) {
    const float* b_row = b + p * ldb;
    __m256 bv[vectors];
#pragma GCC unroll 3
    for (int v = 0; v < vectors; ++v) {
      bv[v] = v + 1 < vectors ? _mm256_loadu_ps(b_row + 8 * v)
                              : _mm256_maskload_ps(b_row + 8 * v, last_mask);
    }
    const float* a_col = a + p * a_col_stride;
#pragma GCC unroll 4
    for (int r = 0; r < rows; ++r) {
      const __m256 av = _mm256_set1_ps(a_col[r * a_row_stride]);
#pragma GCC unroll 3
      for (int v = 0; v < vectors; ++v) acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  const __m256 alpha_v = _mm256_set1_ps(alpha);
  const __m256i all = _mm256_set1_epi32(-1);
#pragma GCC unroll 4
  for (int r = 0; r < rows; ++r) {
    float* c_row = c + r * ldc;
#pragma GCC unroll 3
    for (int v = 0; v < vectors; ++v) {
      const __m256i mask = v + 1 < vectors ? all : last_mask;
      const __m256 cv = _mm256_maskload_ps(c_row + 8 * v, mask);
      _mm256_maskstore_ps(c_row + 8 * v, mask, _mm256_fmadd_ps(alpha_v, acc[r][v], cv));
    }
  }
}

using MicroKernel = void (*)(std::int64_t, float, const float*, std::int64_t, std::int64_t,
                             const float*, std::int64_t, float*, std::int64_t, __m256i);

template <int rows>
MicroKernel pick_vectors(int vectors) {
  switch (vectors) {
    case 1:
      return micro_kernel<rows, 1>;
    case 2:
      return micro_kernel<rows, 2>;
    default:
      return micro_kernel<rows, 3>;
  }
}

MicroKernel pick(int rows, int vectors) {
  switch (rows) {
    case 1:
      return pick_vectors<1>(vectors);
    case 2:
      return pick_vectors<2>(vectors);
    case 3:
      return pick_vectors<3>(vectors);
    default:
      return pick_vectors<4>(vectors);
  }
}

}  // namespace

void tile_gemm(std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a,
               std::int64_t a_row_stride, std::int64_t a_col_stride, const float* b,
               std::int64_t ldb, float* c, std::int64_t ldc) {
  for (std::int64_t j0 = 0; j0 < n; j0 += 8 * kVectors) {
    const std::int64_t width = std::min<std::int64_t>(8 * kVectors, n - j0);
    const int vectors = static_cast<int>((width + 7) / 8);
    const __m256i last_mask = tail_mask(width - 8 * (vectors - 1));
    for (std::int64_t i0 = 0; i0 < m; i0 += kRows) {
      const int rows = static_cast<int>(std::min<std::int64_t>(kRows, m - i0));
      pick(rows, vectors)(k, alpha, a + i0 * a_row_stride, a_row_stride, a_col_stride, b + j0, ldb,
                          c + i0 * ldc + j0, ldc, last_mask);
    }
  }
}

float exp_shifted(float* x, std::int64_t n, float shift) {
  const __m256 shift_v = _mm256_set1_ps(shift);
  __m256 sum = _mm256_setzero_ps();
  for (std::int64_t j = 0; j < n; j += 8) {
    const __m256i mask = tail_mask(n - j);
    // Masked-off lanes load 0 and would give e^-shift: zero them before they reach the sum.
    const __m256 e = _mm256_and_ps(exp_ps(_mm256_sub_ps(_mm256_maskload_ps(x + j, mask), shift_v)),
                                   _mm256_castsi256_ps(mask));
    _mm256_maskstore_ps(x + j, mask, e);
    sum = _mm256_add_ps(sum, e);
  }
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
  const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}

}  // namespace pq::runtime::avx2
