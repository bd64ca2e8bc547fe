#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "alloc/cost_table.h"

namespace pq::alloc {

// One decision of the knapsack: a sibling group that vLLM loads as one module (q/k/v, gate/up,
// all experts of one MoE layer; ../shared/docs/format-facts.md A.3), or a Linear on its own.
struct AllocationItem {
  struct Option {
    std::size_t format = 0;      // index into CostTable::formats
    std::uint64_t bytes = 0;     // sum over members
    double predicted_dloss = 0;  // sum over members
  };
  std::string key;                   // the group key, or the Linear's name
  std::vector<std::size_t> members;  // indices into CostTable::linears
  // Formats every member can take, minus dominated ones (another option is no larger and no
  // worse); sorted by bytes ascending, so predicted dL strictly descends.
  std::vector<Option> options;
};

struct AllocatorOptions {
  // Formats the allocator may choose (names from the cost table); empty: all of them.
  std::vector<std::string> formats;
  // Most cells on the DP's byte axis. Budgets whose exact solution needs more are solved on a
  // coarser axis (see SolveResolution); time and memory grow linearly with this.
  std::uint64_t max_units = std::uint64_t{1} << 16;
};

// What the DP's byte resolution guarantees about one solution.
struct SolveResolution {
  std::uint64_t unit_bytes = 1;
  // True when the solution is optimal for the exact byte budget.
  bool exact = true;
  // Otherwise the solution's predicted dL is at most that of the best assignment fitting in
  // budget - max_shortfall_bytes.
  std::uint64_t max_shortfall_bytes = 0;
  // ... and its predicted dL exceeds the optimum for the exact budget by at most this (from the
  // Lagrangian lower bound; 0 when exact).
  double max_excess_dloss = 0.0;
  // Items the Lagrangian reduction left to the DP (the others were fixed exactly).
  std::uint64_t free_items = 0;
};

struct Allocation {
  std::vector<std::size_t> format_of_linear;  // per Linear, index into CostTable::formats
  std::uint64_t budget_bytes = 0;
  std::uint64_t bytes = 0;  // quantizable bytes, never above budget_bytes
  double predicted_dloss = 0.0;
  SolveResolution resolution;
};

// Multiple-choice knapsack: one format per item, minimising the summed predicted dL subject to
// the summed bytes fitting a byte budget. knapsack.cpp explains the method and its guarantees.
class KnapsackAllocator {
 public:
  // `table` must outlive the allocator.
  explicit KnapsackAllocator(const CostTable& table, const AllocatorOptions& options = {});

  const CostTable& table() const { return *table_; }
  const std::vector<AllocationItem>& items() const { return items_; }
  // Every item at its smallest option: the least budget that is feasible.
  std::uint64_t min_bytes() const { return min_bytes_; }
  // Every item at its lowest-dL option: budgets beyond this change nothing.
  std::uint64_t saturation_bytes() const { return saturation_bytes_; }

  // pq::Error naming the minimum achievable bits per parameter when the budget is infeasible.
  Allocation solve(std::uint64_t budget_bytes) const;
  // Solves every budget; nullopt for budgets below min_bytes(). A larger budget never gets a
  // higher predicted dL (it would take the smaller budget's assignment, which also fits).
  std::vector<std::optional<Allocation>> solve_many(std::span<const std::uint64_t> budgets) const;

 private:
  // A step along an item's lower convex hull of (bytes, dL): from one option to the next,
  // buying `saved_dloss` for `extra_bytes`. Sorted by efficiency, the steps give the LP
  // relaxation's solution and its Lagrange multiplier.
  struct HullStep {
    std::size_t item = 0;
    std::size_t from = 0;  // option indices
    std::size_t to = 0;
    std::uint64_t extra_bytes = 0;
    double efficiency = 0.0;  // dL saved per byte
  };

  std::vector<std::size_t> solve_one(std::uint64_t budget_bytes, SolveResolution& resolution) const;

  const CostTable* table_;
  std::vector<AllocationItem> items_;
  std::vector<HullStep> hull_steps_;
  std::uint64_t min_bytes_ = 0;
  std::uint64_t saturation_bytes_ = 0;
  std::uint64_t max_units_;
};

}  // namespace pq::alloc
