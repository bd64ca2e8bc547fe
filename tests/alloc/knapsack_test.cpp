#include "alloc/knapsack.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <random>
#include <utility>
#include <vector>

#include "common/error.h"
#include "random_instances.h"

namespace pq::alloc {
namespace {

using test::cost;
using test::InstanceSpec;
using test::random_cost_table;

// Every valid assignment's (bytes, summed dL), found by enumerating a format per Linear
// independently of the allocator's grouping code: a format must be offered for the Linear and
// all Linears of one group must agree.
std::vector<std::pair<std::uint64_t, double>> enumerate_assignments(const CostTable& table) {
  std::vector<std::pair<std::uint64_t, double>> valid;
  const std::size_t n = table.linears.size();
  const std::size_t formats = table.formats.size();
  std::vector<std::size_t> choice(n, 0);
  while (true) {
    bool ok = true;
    std::uint64_t bytes = 0;
    double dloss = 0.0;
    for (std::size_t l = 0; l < n && ok; ++l) {
      const auto& cost = table.linears[l].costs[choice[l]];
      ok = cost.has_value();
      for (std::size_t m = 0; m < l && ok; ++m) {
        if (!table.linears[l].group.empty() && table.linears[l].group == table.linears[m].group) {
          ok = choice[l] == choice[m];
        }
      }
      if (ok) {
        bytes += cost->bytes;
        dloss += cost->predicted_dloss;
      }
    }
    if (ok) valid.emplace_back(bytes, dloss);
    std::size_t l = 0;
    while (l < n && ++choice[l] == formats) choice[l++] = 0;
    if (l == n) break;
  }
  return valid;
}

std::optional<double> best_within(const std::vector<std::pair<std::uint64_t, double>>& valid,
                                  std::uint64_t budget) {
  std::optional<double> best;
  for (const auto& [bytes, dloss] : valid) {
    if (bytes <= budget && (!best || dloss < *best)) best = dloss;
  }
  return best;
}

void expect_consistent(const CostTable& table, const Allocation& allocation) {
  std::uint64_t bytes = 0;
  for (std::size_t l = 0; l < table.linears.size(); ++l) {
    const std::size_t f = allocation.format_of_linear[l];
    ASSERT_TRUE(table.linears[l].costs[f].has_value()) << table.linears[l].name;
    bytes += table.linears[l].costs[f]->bytes;
    for (std::size_t m = 0; m < l; ++m) {
      if (!table.linears[l].group.empty() && table.linears[l].group == table.linears[m].group) {
        EXPECT_EQ(f, allocation.format_of_linear[m]) << "group " << table.linears[l].group;
      }
    }
  }
  EXPECT_EQ(bytes, allocation.bytes);
  EXPECT_LE(allocation.bytes, allocation.budget_bytes);
}

bool near(double a, double b) {
  return std::abs(a - b) <= 1e-9 * (1.0 + std::abs(b));
}

TEST(KnapsackTest, MatchesExhaustiveSearchOnRandomInstances) {
  std::mt19937_64 rng(20261123);
  int solved = 0, infeasible = 0, unsatisfiable_groups = 0;
  for (int trial = 0; trial < 400; ++trial) {
    InstanceSpec spec;
    spec.linears = 1 + rng() % 7;
    spec.formats = 1 + rng() % 4;
    spec.groups = rng() % 3;
    spec.forbidden_probability = (rng() % 3) * 0.2;
    spec.byte_multiple = (trial % 3 == 0) ? 16 : 1;
    spec.integer_dloss = trial % 4 == 0;
    const CostTable table = random_cost_table(spec, rng);
    const auto valid = enumerate_assignments(table);
    if (valid.empty()) {
      // Some group has no format all its members can take: a clear error, not an empty answer.
      EXPECT_THROW(KnapsackAllocator{table}, pq::Error);
      ++unsatisfiable_groups;
      continue;
    }
    const KnapsackAllocator allocator(table);
    std::uint64_t min_bytes = std::numeric_limits<std::uint64_t>::max(), max_bytes = 0;
    for (const auto& [bytes, dloss] : valid) {
      min_bytes = std::min(min_bytes, bytes);
      max_bytes = std::max(max_bytes, bytes);
    }
    ASSERT_EQ(allocator.min_bytes(), min_bytes);
    // Budgets: infeasible, exactly tight at every achievable size, in between, and beyond.
    std::vector<std::uint64_t> budgets = {min_bytes - 1, max_bytes + 7};
    for (const auto& [bytes, dloss] : valid) budgets.push_back(bytes);
    for (int k = 0; k < 4; ++k) budgets.push_back(min_bytes + rng() % (max_bytes - min_bytes + 1));
    std::sort(budgets.begin(), budgets.end());
    budgets.erase(std::unique(budgets.begin(), budgets.end()), budgets.end());

    const auto results = allocator.solve_many(budgets);
    ASSERT_EQ(results.size(), budgets.size());
    for (std::size_t t = 0; t < budgets.size(); ++t) {
      const std::optional<double> best = best_within(valid, budgets[t]);
      ASSERT_EQ(results[t].has_value(), best.has_value()) << "trial " << trial;
      if (!best) {
        EXPECT_THROW(allocator.solve(budgets[t]), pq::Error);
        ++infeasible;
        continue;
      }
      const Allocation& allocation = *results[t];
      expect_consistent(table, allocation);
      EXPECT_TRUE(allocation.resolution.exact);
      EXPECT_TRUE(near(allocation.predicted_dloss, *best))
          << "trial " << trial << " budget " << budgets[t] << ": allocator "
          << allocation.predicted_dloss << ", exhaustive " << *best;
      ++solved;
    }
  }
  // The generator must actually produce every kind of case.
  EXPECT_GT(solved, 1000);
  EXPECT_GT(infeasible, 100);
  EXPECT_GT(unsatisfiable_groups, 0);
}

TEST(KnapsackTest, CoarseByteAxisNeverOvershootsAndHonoursItsBounds) {
  std::mt19937_64 rng(7);
  int coarse = 0;
  for (int trial = 0; trial < 200; ++trial) {
    InstanceSpec spec;
    spec.linears = 2 + rng() % 6;
    spec.formats = 2 + rng() % 3;
    spec.groups = rng() % 3;
    spec.forbidden_probability = 0.1;
    spec.max_bytes = 100000;
    const CostTable table = random_cost_table(spec, rng);
    const auto valid = enumerate_assignments(table);
    if (valid.empty()) continue;
    AllocatorOptions options;
    options.max_units = 1 + rng() % 16;
    const KnapsackAllocator allocator(table, options);
    for (int k = 0; k < 6; ++k) {
      const std::uint64_t budget = allocator.min_bytes() + rng() % (allocator.saturation_bytes() -
                                                                    allocator.min_bytes() + 1);
      const Allocation allocation = allocator.solve(budget);
      expect_consistent(table, allocation);
      const double optimum = *best_within(valid, budget);
      // Never better than the true optimum, never worse than the optimum of the reduced budget.
      EXPECT_GE(allocation.predicted_dloss, optimum - 1e-9 * (1.0 + optimum));
      const SolveResolution& resolution = allocation.resolution;
      ASSERT_LE(resolution.max_shortfall_bytes, budget - allocator.min_bytes());
      const double reduced = *best_within(valid, budget - resolution.max_shortfall_bytes);
      EXPECT_LE(allocation.predicted_dloss, reduced + 1e-9 * (1.0 + reduced));
      // The Lagrangian bound caps the excess over the exact optimum.
      EXPECT_LE(allocation.predicted_dloss,
                optimum + resolution.max_excess_dloss + 1e-9 * (1.0 + optimum));
      if (!resolution.exact) {
        EXPECT_GT(resolution.unit_bytes, 1u);
        ++coarse;
      } else {
        EXPECT_TRUE(near(allocation.predicted_dloss, optimum));
      }
    }
  }
  EXPECT_GT(coarse, 100);
}

TEST(KnapsackTest, GroupsOfferOnlyFormatsEveryMemberTakes) {
  CostTable table;
  table.model = "m";
  table.formats = {"NVFP4", "MXFP8", "BF16"};
  // q takes everything; k cannot take MXFP8 (say its out dim is not a multiple of 128).
  const auto linear = [&](std::string name, std::vector<std::optional<FormatCost>> costs) {
    table.linears.push_back({std::move(name), {16, 16}, "layer0.qkv", 256, std::move(costs)});
  };
  linear("q", {cost(144, 5.0), cost(264, 0.5), cost(512, 0.0)});
  linear("k", {cost(144, 5.0), std::nullopt, cost(512, 0.0)});
  const KnapsackAllocator allocator(table);
  ASSERT_EQ(allocator.items().size(), 1u);
  const auto& options = allocator.items()[0].options;
  ASSERT_EQ(options.size(), 2u);
  EXPECT_EQ(options[0].format, 0u);
  EXPECT_EQ(options[0].bytes, 288u);
  EXPECT_EQ(options[0].predicted_dloss, 10.0);
  EXPECT_EQ(options[1].format, 2u);
  // MXFP8 would fit 528 bytes for q alone, but the group cannot take it: stays NVFP4.
  const Allocation allocation = allocator.solve(800);
  EXPECT_EQ(allocation.format_of_linear, (std::vector<std::size_t>{0, 0}));
  EXPECT_EQ(allocator.solve(1024).format_of_linear, (std::vector<std::size_t>{2, 2}));
}

TEST(KnapsackTest, DominatedOptionsAreDropped) {
  CostTable table;
  table.model = "m";
  table.formats = {"A", "B", "C", "D"};
  // B is larger and worse than A; D ties C's bytes with a higher dL.
  table.linears.push_back(
      {"x", {8, 8}, "", 64, {cost(40, 3.0), cost(50, 3.5), cost(80, 1.0), cost(80, 2.0)}});
  const KnapsackAllocator allocator(table);
  const auto& options = allocator.items()[0].options;
  ASSERT_EQ(options.size(), 2u);
  EXPECT_EQ(options[0].format, 0u);
  EXPECT_EQ(options[1].format, 2u);
}

TEST(KnapsackTest, InfeasibleBudgetNamesTheMinimumBits) {
  CostTable table;
  table.model = "m";
  table.formats = {"NVFP4", "MXFP8", "BF16"};
  // 16x16 Linears: NVFP4 4.5 bits/param = 144 bytes, MXFP8 8.25 = 264, BF16 = 512.
  for (const char* name : {"a", "b"}) {
    table.linears.push_back(
        {name, {16, 16}, "", 256, {cost(144, 1), cost(264, 0.1), cost(512, 0)}});
  }
  const KnapsackAllocator allocator(table);
  EXPECT_EQ(allocator.min_bytes(), 288u);
  try {
    allocator.solve(256);  // 4 bits per parameter
    FAIL() << "expected pq::Error";
  } catch (const pq::Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("4.0000 bits/param"), std::string::npos) << message;
    EXPECT_NE(message.find("minimum achievable is 288 bytes (4.5000 bits/param"), std::string::npos)
        << message;
  }
  EXPECT_EQ(allocator.solve(288).bytes, 288u);
}

TEST(KnapsackTest, UnknownAllowedFormatIsAnError) {
  CostTable table;
  table.model = "m";
  table.formats = {"NVFP4"};
  table.linears.push_back({"a", {4, 4}, "", 16, {cost(9, 1.0)}});
  AllocatorOptions options;
  options.formats = {"NVFP5"};
  try {
    KnapsackAllocator allocator(table, options);
    FAIL() << "expected pq::Error";
  } catch (const pq::Error& e) {
    EXPECT_NE(std::string(e.what()).find("unknown format \"NVFP5\""), std::string::npos);
  }
}

TEST(KnapsackTest, RestrictingFormatsRemovesThem) {
  CostTable table;
  table.model = "m";
  table.formats = {"NVFP4", "BF16"};
  table.linears.push_back({"a", {4, 4}, "", 16, {cost(9, 1.0), cost(32, 0.0)}});
  AllocatorOptions options;
  options.formats = {"NVFP4"};
  const KnapsackAllocator allocator(table, options);
  EXPECT_EQ(allocator.solve(1000).format_of_linear[0], 0u);
  options.formats = {"BF16"};
  EXPECT_THROW(KnapsackAllocator(table, options).solve(9), pq::Error);
}

}  // namespace
}  // namespace pq::alloc
