// The Local-Hessian objective d^T B d, four doubles wide (AVX2, which every AVX-512 CPU also
// has). Compiled with -mavx2 -ffp-contract=off and entered only after cpu_features() says so. It
// gives the bits of the scalar reference (local_hessian_objective): each row sum (B d)_i is
// accumulated over j in the same order with a separate multiply and add, the block being exactly
// symmetric (its column j is its row j), and the final d_i (B d)_i are summed in i order.
#include <immintrin.h>

#include <cstddef>

#include "export/local_hessian_simd.h"

namespace pq::exporter::simd {

double local_hessian_objective_avx2(const double* d, const double* block, std::size_t n) {
  constexpr std::size_t kMaxLanes = 64 / 4;
  __m256d rows[kMaxLanes];
  const std::size_t lanes = n / 4;
  for (std::size_t v = 0; v < lanes; ++v) rows[v] = _mm256_setzero_pd();
  for (std::size_t j = 0; j < n; ++j) {
    const __m256d dj = _mm256_set1_pd(d[j]);
    const double* column = block + j * n;
    for (std::size_t v = 0; v < lanes; ++v) {
      rows[v] = _mm256_add_pd(rows[v], _mm256_mul_pd(_mm256_loadu_pd(column + 4 * v), dj));
    }
  }
  alignas(32) double products[64];
  for (std::size_t v = 0; v < lanes; ++v) {
    _mm256_store_pd(products + 4 * v, _mm256_mul_pd(_mm256_loadu_pd(d + 4 * v), rows[v]));
  }
  double sum = 0.0;
  for (std::size_t i = 0; i < n; ++i) sum += products[i];
  return sum;
}

}  // namespace pq::exporter::simd
