// Causal attention throughput at 1B-class head shapes (16 query heads, 8 kv heads, head_dim 128).
// FLOPs count only visible (query, key) pairs: 4 D per pair and head forward (q.k and p.v),
// 8 D more backward (dP, dV, dK, dQ), as FlashAttention-2 counts them. The in-run baseline is
// gemm_f32 at the size of one head's full score matrix. Rates are per second of main-thread CPU
// time, as in bench_runtime.cpp.
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "runtime/kernels/attention.h"
#include "runtime/kernels/gemm.h"

namespace {

using pq::runtime::AttentionShape;

constexpr std::int64_t kHeads = 16, kKvHeads = 8, kHeadDim = 128;

std::vector<float> random_floats(std::int64_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> x(static_cast<std::size_t>(n));
  for (float& e : x) e = dist(rng);
  return x;
}

// Arguments: tokens, sliding window (0 = none).
AttentionShape shape_from(const benchmark::State& state) {
  return {state.range(0), kHeads, kKvHeads, kHeadDim, 1.0f / std::sqrt(float(kHeadDim)),
          state.range(1)};
}

double visible_pairs(const AttentionShape& s) {
  double pairs = 0;
  for (std::int64_t i = 0; i < s.seq_len; ++i)
    pairs += s.sliding_window > 0 ? std::min<std::int64_t>(i + 1, s.sliding_window) : i + 1;
  return pairs;
}

struct Buffers {
  std::vector<float> q, k, v, out, lse, dout, dq, dk, dv;
  explicit Buffers(const AttentionShape& s)
      : q(random_floats(s.seq_len * kHeads * kHeadDim, 1)),
        k(random_floats(s.seq_len * kKvHeads * kHeadDim, 2)),
        v(random_floats(s.seq_len * kKvHeads * kHeadDim, 3)),
        out(q.size()),
        lse(static_cast<std::size_t>(kHeads * s.seq_len)),
        dout(random_floats(s.seq_len * kHeads * kHeadDim, 4)),
        dq(q.size()),
        dk(k.size()),
        dv(v.size()) {}
};

void BM_AttentionForward(benchmark::State& state) {
  const AttentionShape s = shape_from(state);
  Buffers b(s);
  for (auto _ : state) {
    pq::runtime::causal_attention_forward(s, b.q.data(), b.k.data(), b.v.data(), b.out.data(),
                                          b.lse.data());
    benchmark::DoNotOptimize(b.out.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(4.0 * kHeadDim * kHeads * visible_pairs(s) / 1e9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

void BM_AttentionBackward(benchmark::State& state) {
  const AttentionShape s = shape_from(state);
  Buffers b(s);
  pq::runtime::causal_attention_forward(s, b.q.data(), b.k.data(), b.v.data(), b.out.data(),
                                        b.lse.data());
  for (auto _ : state) {
    pq::runtime::causal_attention_backward(s, b.q.data(), b.k.data(), b.v.data(), b.out.data(),
                                           b.lse.data(), b.dout.data(), b.dq.data(), b.dk.data(),
                                           b.dv.data());
    benchmark::DoNotOptimize(b.dq.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(8.0 * kHeadDim * kHeads * visible_pairs(s) / 1e9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

// Baseline: all heads' full q k^T products as gemm_f32 calls ([T, D] x [D, T] per head).
void BM_ScoresAsGemmF32Baseline(benchmark::State& state) {
  const std::int64_t T = state.range(0);
  const auto q = random_floats(T * kHeads * kHeadDim, 1),
             k = random_floats(T * kKvHeads * kHeadDim, 2);
  std::vector<float> scores(static_cast<std::size_t>(T * T));
  using pq::runtime::Transpose;
  for (auto _ : state) {
    for (std::int64_t h = 0; h < kHeads; ++h) {
      pq::runtime::gemm_f32(Transpose::kNo, Transpose::kYes, T, T, kHeadDim, 1.0f,
                            q.data() + h * kHeadDim, kHeads * kHeadDim,
                            k.data() + (h / 2) * kHeadDim, kKvHeads * kHeadDim, 0.0f, scores.data(),
                            T);
    }
    benchmark::DoNotOptimize(scores.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * kHeads * T * T * kHeadDim / 1e9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

BENCHMARK(BM_ScoresAsGemmF32Baseline)
    ->ArgName("tokens")
    ->Arg(512)
    ->Arg(2048)

    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_AttentionForward)
    ->ArgNames({"tokens", "window"})
    ->Args({512, 0})
    ->Args({2048, 0})
    ->Args({2048, 512})

    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_AttentionBackward)
    ->ArgNames({"tokens", "window"})
    ->Args({512, 0})
    ->Args({2048, 0})
    ->Args({2048, 512})

    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
