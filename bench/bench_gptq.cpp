// GPTQ rounding of one Linear against plain round-to-nearest of the same weight, measured in the
// same run (the baseline): Nearest/<format>/<out>/<in> is WeightFormat::quantize;
// Gptq/<format>/<out>/<in>/<sweep> is gptq_round (Cholesky inverse, lazy-batch pass, optional
// scale sweep) plus encode_groups. The Hessian comes from 4096 correlated synthetic tokens.
// Shapes: qwen3-dense-tiny's down_proj (256 x 768), a Qwen3-30B-A3B expert's gate/up (768 x 2048)
// and down_proj (2048 x 768), and square 2048 and 4096 weights.
// LocalHessian/<format>/<out>/<in>/<bracket> is local_hessian_round plus encode_groups.

#include <benchmark/benchmark.h>
#include <cblas.h>

#include <bit>
#include <map>
#include <random>
#include <vector>

#include "export/gptq.h"
#include "export/local_hessian.h"
#include "formats/weight_format.h"

namespace {

using pq::formats::Shape2D;
using pq::formats::WeightFormat;

constexpr const char* kFormats[] = {"NVFP4A16", "INT4_W4A16", "FP8_E4M3"};

struct Problem {
  std::vector<float> weight;
  std::vector<float> hessian;
  std::vector<float> moment;
  std::int64_t tokens = 4096;
};

const Problem& problem(Shape2D shape) {
  static std::map<std::pair<std::int64_t, std::int64_t>, Problem> cache;
  Problem& p = cache[{shape.out, shape.in}];
  if (!p.weight.empty()) return p;
  std::mt19937 rng(42);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  p.weight.resize(shape.numel());
  for (float& v : p.weight) v = 0.02f * normal(rng);
  // x = z + latent mixing: channels correlated through 16 shared factors.
  constexpr int kRank = 16;
  std::vector<float> mixing(kRank * shape.in), x(p.tokens * shape.in);
  for (float& v : mixing) v = normal(rng);
  for (std::int64_t t = 0; t < p.tokens; ++t) {
    float latent[kRank];
    for (float& l : latent) l = normal(rng);
    for (std::int64_t j = 0; j < shape.in; ++j) {
      float v = normal(rng);
      for (int k = 0; k < kRank; ++k) v += latent[k] * mixing[k * shape.in + j];
      x[t * shape.in + j] = v;
    }
  }
  p.hessian.assign(shape.in * shape.in, 0.0f);
  cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, static_cast<int>(shape.in),
              static_cast<int>(p.tokens), 1.0f, x.data(), static_cast<int>(shape.in), 0.0f,
              p.hessian.data(), static_cast<int>(shape.in));
  for (std::int64_t a = 0; a < shape.in; ++a) {
    for (std::int64_t b = 0; b < a; ++b) p.hessian[a * shape.in + b] = p.hessian[b * shape.in + a];
  }
  p.moment.resize(shape.in);
  for (std::int64_t j = 0; j < shape.in; ++j) {
    p.moment[j] = p.hessian[j * shape.in + j] / static_cast<float>(p.tokens);
  }
  return p;
}

// NVFP4's global scale from the weight's amax, as the exporter sets it; ignored by the others.
pq::formats::QuantizeOptions options_for(const Problem& p) {
  pq::formats::QuantizeOptions options;
  options.weight_global_scale =
      pq::formats::nvfp4_global_scale(std::bit_cast<float>(pq::formats::max_abs_bits(p.weight)));
  return options;
}

void Nearest(benchmark::State& state, const char* name) {
  const WeightFormat& format = pq::formats::format_by_name(name);
  const Shape2D shape{state.range(0), state.range(1)};
  const Problem& p = problem(shape);
  const auto options = options_for(p);
  for (auto _ : state) benchmark::DoNotOptimize(format.quantize(p.weight, shape, options));
  state.SetItemsProcessed(state.iterations() * shape.numel());
}

void Gptq(benchmark::State& state, const char* name) {
  const WeightFormat& format = pq::formats::format_by_name(name);
  const Shape2D shape{state.range(0), state.range(1)};
  const Problem& p = problem(shape);
  const auto options = options_for(p);
  const auto layout = *format.group_layout(shape, options);
  const pq::exporter::CalibrationStatistics stats{
      .hessian = p.hessian, .tokens = p.tokens, .act_second_moment = p.moment};
  for (auto _ : state) {
    const auto grouped = pq::exporter::gptq_round(p.weight, shape, layout, stats,
                                                  {.scale_sweep = state.range(2) != 0});
    benchmark::DoNotOptimize(format.encode_groups(grouped->codes, grouped->scales, shape, options));
  }
  state.SetItemsProcessed(state.iterations() * shape.numel());
}

// Local-Hessian scales (local_hessian_round, with its output-error GEMM) plus encode_groups; the
// third argument is the E4M3 bracket (0: every byte).
void LocalHessian(benchmark::State& state, const char* name) {
  const WeightFormat& format = pq::formats::format_by_name(name);
  const Shape2D shape{state.range(0), state.range(1)};
  const Problem& p = problem(shape);
  const auto options = options_for(p);
  const auto layout = *format.group_layout(shape, options);
  const pq::exporter::CalibrationStatistics stats{
      .hessian = p.hessian, .tokens = p.tokens, .act_second_moment = p.moment};
  for (auto _ : state) {
    const auto grouped = pq::exporter::local_hessian_round(
        p.weight, shape, layout, stats, {.e4m3_bracket = static_cast<int>(state.range(2))});
    benchmark::DoNotOptimize(format.encode_groups(grouped->codes, grouped->scales, shape, options));
  }
  state.SetItemsProcessed(state.iterations() * shape.numel());
}

void register_all() {
  for (const char* name : {"NVFP4A16", "MXFP4A16"}) {
    for (const auto& [out, in] : {std::pair<std::int64_t, std::int64_t>{256, 768}, {2048, 2048}}) {
      for (const int bracket : {0, 8}) {
        if (bracket == 8 && std::string_view(name) != "NVFP4A16") continue;
        benchmark::RegisterBenchmark((std::string("LocalHessian/") + name).c_str(), LocalHessian,
                                     name)
            ->Args({out, in, bracket})
            ->Unit(benchmark::kMillisecond)
            ->Iterations(1);
      }
    }
  }
  for (const char* name : kFormats) {
    for (const auto& [out, in] : {std::pair<std::int64_t, std::int64_t>{256, 768},
                                  {768, 2048},
                                  {2048, 768},
                                  {2048, 2048},
                                  {4096, 4096}}) {
      benchmark::RegisterBenchmark((std::string("Nearest/") + name).c_str(), Nearest, name)
          ->Args({out, in})
          ->Unit(benchmark::kMillisecond);
      for (const int sweep : {0, 1}) {
        benchmark::RegisterBenchmark((std::string("Gptq/") + name).c_str(), Gptq, name)
            ->Args({out, in, sweep})
            ->Unit(benchmark::kMillisecond)
            ->Iterations(1);
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
