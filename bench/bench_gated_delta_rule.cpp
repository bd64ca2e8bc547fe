// Gated DeltaNet core throughput at Qwen3.5-35B-A3B / Qwen3.6-35B-A3B layer shapes (16 key heads,
// 32 value heads, dk = dv = 128; qwen3_5-architecture-facts.md §1), one sequence of 4096 tokens:
// the chunked forward, and forward + backward as a Fisher pass runs them.
//
// FLOPs are those of the chunked algorithm's dense products as executed (2 per multiply-add,
// masked triangles included; the exps, the triangular inverse and the elementwise work are not
// counted). Per chunk of C tokens and value head (gated_delta_rule.cpp):
//   forward   2 C^2 (3 dk + 2 dv) + 6 C dk dv
//             (K K^T, Q K^T, U, W; W S, Q S, M V_new, state update; run as 5 GEMMs)
//   backward  C^2 (16 dk + 10 dv) + 16 C dk dv + 4 C^3
//             (the recomputed forward without O, 2 C^2 (3 dk + dv) + 4 C dk dv, then 17 products
//             run as 12 GEMMs)
// For C = 64 and dk = dv = 128: 180,224 FLOPs per token and value head forward, 491,520 backward.
// The token-by-token recurrence needs 7 dk dv = 114,688 forward; chunking trades more FLOPs for
// GEMM-shaped ones.
//
// The in-run baseline is the fp32 GEMM peak (BM_F32GemmPeak, its fastest iteration): gemm_f32 at
// the layer's z projection, x [4096, 2048] times W^T [2048, 4096]. BM_ChunkGemmBaseline shows the
// rate gemm_f32 reaches at the [64 x 128] x [128 x 128] blocks the kernel is made of. Rates are per
// second of main-thread CPU time, as in bench_runtime.cpp.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <ctime>
#include <random>
#include <vector>

#include "runtime/kernels/gated_delta_rule.h"
#include "runtime/kernels/gemm.h"

namespace {

namespace rt = pq::runtime;
using benchmark::Counter;

constexpr std::int64_t kKeyHeads = 16, kValueHeads = 32, kHeadDim = 128, kHidden = 2048;
constexpr std::int64_t kChunk = 64;

double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

// Measured by BM_F32GemmPeak, which runs first.
double g_f32_peak_gflops = 0.0;

std::vector<float> random_floats(std::int64_t n, std::uint32_t seed, float lo, float hi) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> x(static_cast<std::size_t>(n));
  for (float& e : x) e = dist(rng);
  return x;
}

void BM_F32GemmPeak(benchmark::State& state) {
  const std::int64_t m = state.range(0), n = kValueHeads * kHeadDim, k = kHidden;
  const auto a = random_floats(m * k, 1, -1, 1), b = random_floats(n * k, 2, -1, 1);
  std::vector<float> c(m * n);
  const double gflop = 2.0 * m * n * k / 1e9;
  for (auto _ : state) {
    const double start = thread_cpu_seconds();
    rt::gemm_f32(rt::Transpose::kNo, rt::Transpose::kYes, m, n, k, 1.0f, a.data(), k, b.data(), k,
                 0.0f, c.data(), n);
    benchmark::DoNotOptimize(c.data());
    g_f32_peak_gflops = std::max(g_f32_peak_gflops, gflop / (thread_cpu_seconds() - start));
  }
  state.counters["GFLOP/s"] = Counter(gflop, Counter::kIsIterationInvariantRate);
  state.counters["best GFLOP/s"] = g_f32_peak_gflops;
}

// One [64 x 128] x [128 x 128] gemm_f32 per chunk and value head, value heads in parallel as the
// kernel runs them.
void BM_ChunkGemmBaseline(benchmark::State& state) {
  const std::int64_t chunks = state.range(0) / kChunk;
  const auto a = random_floats(kChunk * kHeadDim, 1, -1, 1);
  const auto b = random_floats(kHeadDim * kHeadDim, 2, -1, 1);
  for (auto _ : state) {
#pragma omp parallel
    {
      std::vector<float> c(kChunk * kHeadDim);
#pragma omp for schedule(dynamic)
      for (std::int64_t h = 0; h < kValueHeads; ++h) {
        for (std::int64_t chunk = 0; chunk < chunks; ++chunk) {
          rt::gemm_f32(rt::Transpose::kNo, rt::Transpose::kNo, kChunk, kHeadDim, kHeadDim, 1.0f,
                       a.data(), kHeadDim, b.data(), kHeadDim, 0.0f, c.data(), kHeadDim);
        }
        benchmark::DoNotOptimize(c.data());
      }
    }
  }
  const double gflop = 2.0 * kValueHeads * chunks * kChunk * kHeadDim * kHeadDim / 1e9;
  state.counters["GFLOP/s"] = Counter(gflop, Counter::kIsIterationInvariantRate);
}

struct Layer {
  rt::GatedDeltaShape shape;
  std::vector<float> q, k, v, g, beta, out, dout, dq, dk, dv, dg, dbeta;

  explicit Layer(std::int64_t tokens)
      : shape{tokens, kKeyHeads, kValueHeads, kHeadDim, kHeadDim},
        q(unit_rows(tokens, 1.0f / std::sqrt(float(kHeadDim)), 1)),
        k(unit_rows(tokens, 1.0f, 2)),
        v(random_floats(tokens * kValueHeads * kHeadDim, 3, -1, 1)),
        // Decays as -exp(A_log) softplus(a + dt_bias) spreads them, from slow to fast.
        g(random_floats(tokens * kValueHeads, 4, -3.0f, -0.01f)),
        beta(random_floats(tokens * kValueHeads, 5, 0.05f, 0.95f)),
        out(v.size()),
        dout(random_floats(tokens * kValueHeads * kHeadDim, 6, -1, 1)),
        dq(q.size()),
        dk(k.size()),
        dv(v.size()),
        dg(g.size()),
        dbeta(beta.size()) {}

  static std::vector<float> unit_rows(std::int64_t tokens, float scale, std::uint32_t seed) {
    std::vector<float> x = random_floats(tokens * kKeyHeads * kHeadDim, seed, -1, 1);
    for (std::size_t row = 0; row < x.size(); row += kHeadDim) {
      float sum_sq = 0;
      for (std::int64_t i = 0; i < kHeadDim; ++i) sum_sq += x[row + i] * x[row + i];
      for (std::int64_t i = 0; i < kHeadDim; ++i) x[row + i] *= scale / std::sqrt(sum_sq);
    }
    return x;
  }

  rt::GatedDeltaInputs inputs() const {
    return {q.data(), k.data(), v.data(), g.data(), beta.data()};
  }
  rt::GatedDeltaGradients gradients() {
    return {dq.data(), dk.data(), dv.data(), dg.data(), dbeta.data()};
  }
};

// The header's FLOP formulas, summed over every (possibly partial) chunk of every value head.
double chunked_gflop(std::int64_t tokens, bool backward) {
  const double dk = kHeadDim, dv = kHeadDim;
  double flops = 0;
  for (std::int64_t t0 = 0; t0 < tokens; t0 += kChunk) {
    const double c = double(std::min(kChunk, tokens - t0));
    flops += 2 * c * c * (3 * dk + 2 * dv) + 6 * c * dk * dv;
    if (backward) flops += c * c * (16 * dk + 10 * dv) + 16 * c * dk * dv + 4 * c * c * c;
  }
  return kValueHeads * flops / 1e9;
}

void set_rates(benchmark::State& state, std::int64_t tokens, double gflop) {
  state.counters["tokens/s"] = Counter(double(tokens), Counter::kIsIterationInvariantRate);
  state.counters["GFLOP/s"] = Counter(gflop, Counter::kIsIterationInvariantRate);
  state.counters["%f32_peak"] =
      Counter(100.0 * gflop / g_f32_peak_gflops, Counter::kIsIterationInvariantRate);
}

void BM_GatedDeltaRuleForward(benchmark::State& state) {
  Layer layer(state.range(0));
  for (auto _ : state) {
    rt::gated_delta_rule_forward(layer.shape, layer.inputs(), layer.out.data(), nullptr);
    benchmark::DoNotOptimize(layer.out.data());
  }
  set_rates(state, layer.shape.seq_len, chunked_gflop(layer.shape.seq_len, false));
}

void BM_GatedDeltaRuleForwardBackward(benchmark::State& state) {
  Layer layer(state.range(0));
  for (auto _ : state) {
    rt::gated_delta_rule_forward(layer.shape, layer.inputs(), layer.out.data(), nullptr);
    rt::gated_delta_rule_backward(layer.shape, layer.inputs(), layer.dout.data(), nullptr,
                                  layer.gradients());
    benchmark::DoNotOptimize(layer.dq.data());
  }
  set_rates(state, layer.shape.seq_len, chunked_gflop(layer.shape.seq_len, true));
}

// The token-by-token reference, for scale (7 dk dv FLOPs per token and value head).
void BM_GatedDeltaRuleForwardRecurrent(benchmark::State& state) {
  Layer layer(state.range(0));
  for (auto _ : state) {
    rt::gated_delta_rule_forward_recurrent(layer.shape, layer.inputs(), layer.out.data(), nullptr);
    benchmark::DoNotOptimize(layer.out.data());
  }
  const double gflop = 7.0 * kHeadDim * kHeadDim * kValueHeads * layer.shape.seq_len / 1e9;
  state.counters["tokens/s"] =
      Counter(double(layer.shape.seq_len), Counter::kIsIterationInvariantRate);
  state.counters["GFLOP/s"] = Counter(gflop, Counter::kIsIterationInvariantRate);
}

BENCHMARK(BM_F32GemmPeak)->ArgName("tokens")->Arg(4096)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ChunkGemmBaseline)->ArgName("tokens")->Arg(4096)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_GatedDeltaRuleForward)->ArgName("tokens")->Arg(4096)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_GatedDeltaRuleForwardBackward)
    ->ArgName("tokens")
    ->Arg(4096)
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_GatedDeltaRuleForwardRecurrent)
    ->ArgName("tokens")
    ->Arg(1024)
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
