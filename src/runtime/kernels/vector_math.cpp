#include "runtime/kernels/vector_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/cpu_features.h"
#include "common/error.h"
#include "runtime/kernels/simd.h"

namespace pq::runtime {

double exp_shifted_sum(std::span<float> x, float shift) {
  if (cpu_features().has_avx512_core()) {
    return avx512::exp_shifted_sum(x.data(), static_cast<std::int64_t>(x.size()), shift);
  }
  if (cpu_features().has_avx2_fma()) {
    return avx2::exp_shifted_sum(x.data(), static_cast<std::int64_t>(x.size()), shift);
  }
  double sum = 0.0;
  for (float& v : x) {
    v = std::exp(v - shift);
    sum += v;
  }
  return sum;
}

void sigmoid(std::span<const float> x, std::span<float> y) {
  PQ_CHECK(x.size() == y.size(), "sigmoid: {} inputs but {} outputs", x.size(), y.size());
  const bool avx512 = cpu_features().has_avx512_core();
  const bool avx2 = !avx512 && cpu_features().has_avx2_fma();
  // Chunks of 16k elements: enough work per chunk to be worth a thread on large arrays.
  constexpr std::int64_t kChunk = 1 << 14;
  const auto n = static_cast<std::int64_t>(x.size());
  const std::int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (chunks > 4)
  for (std::int64_t c = 0; c < chunks; ++c) {
    const std::int64_t begin = c * kChunk, count = std::min(kChunk, n - begin);
    if (avx512) {
      avx512::sigmoid(x.data() + begin, y.data() + begin, count);
      continue;
    }
    if (avx2) {
      avx2::sigmoid(x.data() + begin, y.data() + begin, count);
      continue;
    }
    for (std::int64_t i = begin; i < begin + count; ++i) y[i] = 1.0f / (1.0f + std::exp(-x[i]));
  }
}

}  // namespace pq::runtime
