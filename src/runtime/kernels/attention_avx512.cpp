// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma; entered only after a CPUID check.
#include <immintrin.h>

#include <algorithm>

#include "runtime/kernels/exp_avx512.h"
#include "runtime/kernels/simd.h"

namespace pq::runtime::avx512 {
namespace {

// Register block of the tile GEMM: kRows rows of C times up to kVectors 16-float vectors. 6 x 4
// accumulators plus 4 B vectors and one broadcast fit the 32 zmm registers.
constexpr int kRows = 6;
constexpr int kVectors = 4;

// C[rows, 16 * vectors] += alpha * A[rows, k] B[k, 16 * vectors]; the last vector of each row is
// limited to last_mask (B and C are never touched past n).
template <int rows, int vectors>
void micro_kernel(std::int64_t k, float alpha, const float* a, std::int64_t a_row_stride,
                  std::int64_t a_col_stride, const float* b, std::int64_t ldb, float* c,
                  std::int64_t ldc, __mmask16 last_mask) {
  __m512 acc[rows][vectors];
#pragma GCC unroll 8
  for (int r = 0; r < rows; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < vectors; ++v) acc[r][v] = _mm512_setzero_ps();
  for (std::int64_t p = 0; p < k; ++p) {
    const float* b_row = b + p * ldb;
    __m512 bv[vectors];
#pragma GCC unroll 4
    for (int v = 0; v < vectors; ++v) {
      bv[v] = v + 1 < vectors ? _mm512_loadu_ps(b_row + 16 * v)
                              : _mm512_maskz_loadu_ps(last_mask, b_row + 16 * v);
    }
    const float* a_col = a + p * a_col_stride;
#pragma GCC unroll 8
    for (int r = 0; r < rows; ++r) {
      const __m512 av = _mm512_set1_ps(a_col[r * a_row_stride]);
#pragma GCC unroll 4
      for (int v = 0; v < vectors; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  const __m512 alpha_v = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < rows; ++r) {
    float* c_row = c + r * ldc;
#pragma GCC unroll 4
    for (int v = 0; v < vectors; ++v) {
      const __mmask16 mask = v + 1 < vectors ? __mmask16(0xffff) : last_mask;
      const __m512 cv = _mm512_maskz_loadu_ps(mask, c_row + 16 * v);
      _mm512_mask_storeu_ps(c_row + 16 * v, mask, _mm512_fmadd_ps(alpha_v, acc[r][v], cv));
    }
  }
}

using MicroKernel = void (*)(std::int64_t, float, const float*, std::int64_t, std::int64_t,
                             const float*, std::int64_t, float*, std::int64_t, __mmask16);

template <int rows>
MicroKernel pick_vectors(int vectors) {
  switch (vectors) {
    case 1:
      return micro_kernel<rows, 1>;
    case 2:
      return micro_kernel<rows, 2>;
    case 3:
      return micro_kernel<rows, 3>;
    default:
      return micro_kernel<rows, 4>;
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
    case 4:
      return pick_vectors<4>(vectors);
    case 5:
      return pick_vectors<5>(vectors);
    default:
      return pick_vectors<6>(vectors);
  }
}

}  // namespace

void tile_gemm(std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a,
               std::int64_t a_row_stride, std::int64_t a_col_stride, const float* b,
               std::int64_t ldb, float* c, std::int64_t ldc) {
  for (std::int64_t j0 = 0; j0 < n; j0 += 16 * kVectors) {
    const std::int64_t width = std::min<std::int64_t>(16 * kVectors, n - j0);
    const int vectors = static_cast<int>((width + 15) / 16);
    const int tail = static_cast<int>(width - 16 * (vectors - 1));
    const auto last_mask = static_cast<__mmask16>((1u << tail) - 1u);
    for (std::int64_t i0 = 0; i0 < m; i0 += kRows) {
      const int rows = static_cast<int>(std::min<std::int64_t>(kRows, m - i0));
      pick(rows, vectors)(k, alpha, a + i0 * a_row_stride, a_row_stride, a_col_stride, b + j0, ldb,
                          c + i0 * ldc + j0, ldc, last_mask);
    }
  }
}

float exp_shifted(float* x, std::int64_t n, float shift) {
  const __m512 shift_v = _mm512_set1_ps(shift);
  __m512 sum = _mm512_setzero_ps();
  for (std::int64_t j = 0; j < n; j += 16) {
    const auto mask = static_cast<__mmask16>(n - j >= 16 ? 0xffffu : (1u << (n - j)) - 1u);
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, x + j), shift_v));
    _mm512_mask_storeu_ps(x + j, mask, e);
    sum = _mm512_mask_add_ps(sum, mask, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

}  // namespace pq::runtime::avx512
