// GEMM throughput at the Linear shapes of a 1B-class model (hidden 2048, intermediate 6144) for
// the forward and both backward products, in fp32 and bf16. OpenBLAS sgemm at the same shapes is
// the in-run baseline; the best bf16 figure is the peak that bench_runtime compares against.
// Rates are per second of main-thread CPU time, as in bench_runtime.cpp (robust on a shared
// machine; equal to wall time on an idle one).
#include <benchmark/benchmark.h>
#include <cblas.h>

#include <cstdint>
#include <random>
#include <vector>

#include "runtime/kernels/gemm.h"

namespace {

using pq::runtime::Transpose;

// The three GEMMs of one Linear y[T, out] = x[T, in] W^T (see gemm.h).
enum class LinearGemm { kForward, kGradInput, kGradWeight };

struct GemmShape {
  Transpose ta, tb;
  std::int64_t m, n, k;
};

GemmShape linear_gemm(LinearGemm which, std::int64_t tokens, std::int64_t in, std::int64_t out) {
  switch (which) {
    case LinearGemm::kForward:
      return {Transpose::kNo, Transpose::kYes, tokens, out, in};
    case LinearGemm::kGradInput:
      return {Transpose::kNo, Transpose::kNo, tokens, in, out};
    case LinearGemm::kGradWeight:
      return {Transpose::kYes, Transpose::kNo, out, in, tokens};
  }
  return {};
}

std::int64_t lead(Transpose t, std::int64_t rows, std::int64_t cols) {
  return t == Transpose::kYes ? rows : cols;
}

std::vector<float> random_floats(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> x(n);
  for (float& e : x) e = dist(rng);
  return x;
}

void set_flops(benchmark::State& state, const GemmShape& g) {
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * g.m * g.n * g.k / 1e9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

// Arguments: tokens, in, out, gemm (LinearGemm: 0 = forward, 1 = dX, 2 = dW).
GemmShape shape_from(const benchmark::State& state) {
  return linear_gemm(static_cast<LinearGemm>(state.range(3)), state.range(0), state.range(1),
                     state.range(2));
}

void BM_GemmF32(benchmark::State& state) {
  const GemmShape g = shape_from(state);
  const auto a = random_floats(g.m * g.k, 1), b = random_floats(g.k * g.n, 2);
  std::vector<float> c(g.m * g.n);
  for (auto _ : state) {
    pq::runtime::gemm_f32(g.ta, g.tb, g.m, g.n, g.k, 1.0f, a.data(), lead(g.ta, g.m, g.k), b.data(),
                          lead(g.tb, g.k, g.n), 0.0f, c.data(), g.n);
    benchmark::DoNotOptimize(c.data());
  }
  set_flops(state, g);
}

void BM_GemmBf16(benchmark::State& state) {
  const GemmShape g = shape_from(state);
  const auto a32 = random_floats(g.m * g.k, 1), b32 = random_floats(g.k * g.n, 2);
  std::vector<std::uint16_t> a(a32.size()), b(b32.size());
  pq::runtime::convert_f32_to_bf16(a32, a);
  pq::runtime::convert_f32_to_bf16(b32, b);
  std::vector<float> c(g.m * g.n);
  for (auto _ : state) {
    pq::runtime::gemm_bf16(g.ta, g.tb, g.m, g.n, g.k, 1.0f, a.data(), lead(g.ta, g.m, g.k),
                           b.data(), lead(g.tb, g.k, g.n), 0.0f, c.data(), g.n);
    benchmark::DoNotOptimize(c.data());
  }
  set_flops(state, g);
}

// Baseline: OpenBLAS sgemm on the same operands.
void BM_OpenBlasSgemmBaseline(benchmark::State& state) {
  const GemmShape g = shape_from(state);
  const auto a = random_floats(g.m * g.k, 1), b = random_floats(g.k * g.n, 2);
  std::vector<float> c(g.m * g.n);
  auto trans = [](Transpose t) { return t == Transpose::kYes ? CblasTrans : CblasNoTrans; };
  for (auto _ : state) {
    cblas_sgemm(CblasRowMajor, trans(g.ta), trans(g.tb), int(g.m), int(g.n), int(g.k), 1.0f,
                a.data(), int(lead(g.ta, g.m, g.k)), b.data(), int(lead(g.tb, g.k, g.n)), 0.0f,
                c.data(), int(g.n));
    benchmark::DoNotOptimize(c.data());
  }
  set_flops(state, g);
}

void linear_shapes(benchmark::internal::Benchmark* bench) {
  bench->ArgNames({"tokens", "in", "out", "gemm"});
  for (std::int64_t tokens : {512, 2048})
    for (auto [in, out] :
         {std::pair<std::int64_t, std::int64_t>{2048, 2048}, {2048, 6144}, {6144, 2048}})
      for (int which = 0; which < 3; ++which) bench->Args({tokens, in, out, which});
  bench->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_OpenBlasSgemmBaseline)->Apply(linear_shapes);
BENCHMARK(BM_GemmF32)->Apply(linear_shapes);
BENCHMARK(BM_GemmBf16)->Apply(linear_shapes);

}  // namespace

BENCHMARK_MAIN();
