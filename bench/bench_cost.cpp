// Cost-stage throughput: for one Linear [1024, 1024] with a calibration Hessian [1024, 1024], the
// formats codec alone (WeightFormat::fake_quantize, the baseline measured in the same run) next
// to the whole per-(Linear, format) cost (fake_quantize + weight, activation-weighted and output
// errors, the last a GEMM against the Hessian, which dominates). items_per_second counts weights
// per wall-clock second (the GEMM is multi-threaded); one cost item is one weight in one format.
#include <benchmark/benchmark.h>

#include <random>
#include <string>
#include <vector>

#include "cost/cost_stage.h"
#include "formats/weight_format.h"

namespace {

constexpr pq::formats::Shape2D kShape{1024, 1024};
constexpr std::int64_t kTokens = 4096;

struct Fixture {
  pq::formats::QuantizeOptions options;  // NVFP4 W4A4 needs an input scale (unused by the weights)
  std::vector<float> weight;
  std::vector<float> hessian;
  std::vector<float> moment;
};

const Fixture& fixture() {
  static const Fixture f = [] {
    std::mt19937 rng(7);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    Fixture x;
    x.options.input_global_scale = pq::formats::nvfp4_global_scale(8.0f);
    x.weight.resize(kShape.numel());
    for (float& v : x.weight) v = 0.02f * normal(rng);
    // A symmetric positive semi-definite H with a dominant diagonal, as X^T X over kTokens rows.
    x.hessian.assign(kShape.in * kShape.in, 0.0f);
    x.moment.resize(kShape.in);
    for (std::int64_t i = 0; i < kShape.in; ++i) {
      x.moment[i] = 1.0f + static_cast<float>(i % 7);
      x.hessian[i * kShape.in + i] = x.moment[i] * kTokens;
    }
    return x;
  }();
  return f;
}

void BM_Codec(benchmark::State& state, std::string format_name) {
  const auto& format = pq::formats::format_by_name(format_name);
  const Fixture& f = fixture();
  std::vector<float> quantized(f.weight.size());
  for (auto _ : state) {
    format.fake_quantize(f.weight, kShape, quantized, f.options);
    benchmark::DoNotOptimize(quantized.data());
  }
  state.SetItemsProcessed(state.iterations() * kShape.numel());
}

void BM_Cost(benchmark::State& state, std::string format_name) {
  const auto& format = pq::formats::format_by_name(format_name);
  const Fixture& f = fixture();
  const pq::cost::LinearStatistics stats{1.0, f.moment, f.hessian, kTokens};
  std::vector<float> quantized(f.weight.size());
  for (auto _ : state) {
    format.fake_quantize(f.weight, kShape, quantized, f.options);
    const auto errors = pq::cost::measure_errors(f.weight, quantized, kShape, stats);
    benchmark::DoNotOptimize(errors);
  }
  state.SetItemsProcessed(state.iterations() * kShape.numel());
}

}  // namespace

BENCHMARK_CAPTURE(BM_Codec, NVFP4, std::string("NVFP4"))
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_CAPTURE(BM_Cost, NVFP4, std::string("NVFP4"))
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_CAPTURE(BM_Codec, MXFP8_E4M3, std::string("MXFP8_E4M3"))
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_CAPTURE(BM_Cost, MXFP8_E4M3, std::string("MXFP8_E4M3"))
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_CAPTURE(BM_Codec, BF16, std::string("BF16"))
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_CAPTURE(BM_Cost, BF16, std::string("BF16"))->Unit(benchmark::kMillisecond)->UseRealTime();

BENCHMARK_MAIN();
