// Allocator speed on 10,000 items x 4 formats (MXFP4, NVFP4, MXFP8, BF16) with the byte counts of
// ../shared/docs/method-facts.md §4, at several bits-per-parameter budgets, and a whole Pareto
// sweep (upstream's default 11 targets). Baseline in the same run: sorting the 40,000
// option costs, a machine-speed reference that any allocator must at least pay.
#include <benchmark/benchmark.h>
#include <fmt/format.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "alloc/budget.h"
#include "alloc/knapsack.h"
#include "alloc/pareto.h"

namespace {

using namespace pq::alloc;

constexpr std::size_t kItems = 10'000;

FormatCost cost(std::uint64_t bytes, double predicted_dloss) {
  FormatCost c;
  c.bytes = bytes;
  c.predicted_dloss = predicted_dloss;
  return c;
}

// With `uniform`, every Linear has the same dL per parameter in each format: all items then tie
// in efficiency, the Lagrangian reduction fixes nothing, and the DP sees all 10,000 items (the
// allocator's worst case).
CostTable make_table(bool uniform) {
  std::mt19937_64 rng(2026);
  const std::int64_t dims[] = {1024, 1536, 2048, 2560, 4096, 5120, 8192, 11008, 14336};
  std::lognormal_distribution<double> sensitivity(0.0, 2.0);
  std::uniform_real_distribution<double> noise(0.8, 1.25);
  const auto jitter = [&] { return uniform ? 1.0 : noise(rng); };
  CostTable t;
  t.model = "bench-10k";
  t.formats = {"MXFP4", "NVFP4", "MXFP8", "BF16"};
  for (std::size_t i = 0; i < kItems; ++i) {
    const std::int64_t out = dims[rng() % std::size(dims)];
    const std::int64_t in = dims[rng() % std::size(dims)];
    const auto n = static_cast<std::uint64_t>(out * in);
    const double s = (uniform ? 1.0 : sensitivity(rng)) * 1e-9 * static_cast<double>(n);
    t.linears.push_back(
        {fmt::format("model.layers.{}.proj{}", i / 8, i % 8),
         {out, in},
         "",
         n,
         {cost(n / 2 + n / 32, 1.4 * s * jitter()), cost(n / 2 + n / 16, s * jitter()),
          cost(n + n / 32, 0.004 * s * jitter()), cost(2 * n, 0.0)}});
  }
  t.passthrough_params = 1'000'000'000;
  t.passthrough_bytes = 2'000'000'000;
  return t;
}

const CostTable& table() {
  static const CostTable table = make_table(false);
  return table;
}

const CostTable& uniform_table() {
  static const CostTable table = make_table(true);
  return table;
}

void BM_BaselineSortOptionCosts(benchmark::State& state) {
  std::vector<double> costs;
  for (const LinearCost& linear : table().linears) {
    for (const auto& c : linear.costs) costs.push_back(c->predicted_dloss);
  }
  for (auto _ : state) {
    std::vector<double> copy = costs;
    std::sort(copy.begin(), copy.end());
    benchmark::DoNotOptimize(copy.data());
  }
}
BENCHMARK(BM_BaselineSortOptionCosts)->Unit(benchmark::kMillisecond);

void BM_BuildAllocator(benchmark::State& state) {
  for (auto _ : state) {
    KnapsackAllocator allocator(table());
    benchmark::DoNotOptimize(allocator.min_bytes());
  }
}
BENCHMARK(BM_BuildAllocator)->Unit(benchmark::kMillisecond);

// state.range(0): target bits per parameter x 100.
void solve_at_target(benchmark::State& state, const CostTable& costs) {
  const KnapsackAllocator allocator(costs);
  const BitsTarget target =
      parse_bits_target(fmt::format("{}.{:02}", state.range(0) / 100, state.range(0) % 100));
  const std::uint64_t budget = target.budget_bytes(costs.quantizable_params());
  Allocation allocation;
  for (auto _ : state) {
    allocation = allocator.solve(budget);
    benchmark::DoNotOptimize(allocation.predicted_dloss);
  }
  const auto params = static_cast<double>(costs.quantizable_params());
  state.counters["free_items"] = static_cast<double>(allocation.resolution.free_items);
  state.counters["exact"] = allocation.resolution.exact ? 1 : 0;
  state.counters["unit_bytes"] = static_cast<double>(allocation.resolution.unit_bytes);
  state.counters["shortfall_bits"] =
      8.0 * static_cast<double>(allocation.resolution.max_shortfall_bytes) / params;
  state.counters["excess_dloss_rel"] =
      allocation.resolution.max_excess_dloss / allocation.predicted_dloss;
  state.counters["achieved_bits"] = 8.0 * static_cast<double>(allocation.bytes) / params;
}

void BM_SolveAtTarget(benchmark::State& state) {
  solve_at_target(state, table());
}
BENCHMARK(BM_SolveAtTarget)
    ->Arg(450)
    ->Arg(475)
    ->Arg(500)
    ->Arg(600)
    ->Arg(825)
    ->Unit(benchmark::kMillisecond);

void BM_SolveAtTargetUniformSensitivity(benchmark::State& state) {
  solve_at_target(state, uniform_table());
}
BENCHMARK(BM_SolveAtTargetUniformSensitivity)->Arg(475)->Arg(600)->Unit(benchmark::kMillisecond);

void BM_ParetoSweep11Targets(benchmark::State& state) {
  const KnapsackAllocator allocator(table());
  const std::vector<BitsTarget> targets =
      parse_bits_targets("4.5,4.6,4.7,4.75,4.85,5.0,5.25,5.5,6.0,7.0,8.25");
  for (auto _ : state) {
    const ParetoSweep sweep = sweep_pareto(allocator, targets);
    benchmark::DoNotOptimize(sweep.points.data());
  }
}
BENCHMARK(BM_ParetoSweep11Targets)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
