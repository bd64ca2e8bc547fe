// GEMM throughput at the Linear shapes of a 1B-class model (hidden 2048, intermediate 6144) for
// the forward and both backward products, in fp32 and bf16. OpenBLAS sgemm at the same shapes is
// the in-run baseline; the best bf16 figure is the peak that bench_runtime compares against. The
// probe's Hessians: one triangle (gram_upper_f32) against the full product (gemm_f32).
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

// The probe's Hessian X^T X of `tokens` rows of width `in`, two ways: the full product by gemm_f32
// (the baseline) and the upper triangle by gram_upper_f32. Both are rated at the full product's
// 2 tokens in^2 FLOPs, so the ratio of their rates is the speed-up in time to the same Hessian.
void BM_HessianByGemmF32(benchmark::State& state) {
  const std::int64_t tokens = state.range(0), in = state.range(1);
  const auto x = random_floats(tokens * in, 1);
  std::vector<float> h(in * in);
  for (auto _ : state) {
    pq::runtime::gemm_f32(Transpose::kYes, Transpose::kNo, in, in, tokens, 1.0f, x.data(), in,
                          x.data(), in, 0.0f, h.data(), in);
    benchmark::DoNotOptimize(h.data());
  }
  set_flops(state, {Transpose::kYes, Transpose::kNo, in, in, tokens});
}

void BM_HessianByGramUpperF32(benchmark::State& state) {
  const std::int64_t tokens = state.range(0), in = state.range(1);
  const auto x = random_floats(tokens * in, 1);
  std::vector<float> h(in * in);
  for (auto _ : state) {
    pq::runtime::gram_upper_f32(in, tokens, 1.0f, x.data(), in, 0.0f, h.data(), in);
    benchmark::DoNotOptimize(h.data());
  }
  set_flops(state, {Transpose::kYes, Transpose::kNo, in, in, tokens});
}

void hessian_shapes(benchmark::internal::Benchmark* bench) {
  bench->ArgNames({"tokens", "in"});
  for (std::int64_t in : {2048, 6144}) bench->Args({4096, in});
  bench->Unit(benchmark::kMillisecond);
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
BENCHMARK(BM_HessianByGemmF32)->Apply(hessian_shapes);
BENCHMARK(BM_HessianByGramUpperF32)->Apply(hessian_shapes);

}  // namespace

BENCHMARK_MAIN();
