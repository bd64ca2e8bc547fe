#pragma once

#include <optional>
#include <span>
#include <string>
#include <vector>

#include "alloc/assignment.h"
#include "alloc/budget.h"
#include "alloc/knapsack.h"

namespace pq::alloc {

struct ParetoPoint {
  BitsTarget target;
  std::uint64_t budget_bytes = 0;
  std::optional<Allocation> allocation;  // nullopt: the target is below the minimum achievable
  std::optional<AllocationTotals> totals;
};

// A predicted-dL-versus-size curve: one allocation per bits-per-parameter target.
struct ParetoSweep {
  std::string model;
  std::vector<std::string> formats;
  std::vector<ParetoPoint> points;  // targets ascending
  std::optional<std::size_t> knee;  // index into points
};

// Builds the sweep from KnapsackAllocator::solve_many's allocations for `targets` (same order,
// so predicted dL never rises with the target): sorts by target, rejects targets with the same
// byte budget, and finds the knee.
ParetoSweep make_pareto_sweep(const CostTable& table, std::vector<BitsTarget> targets,
                              std::vector<std::optional<Allocation>> allocations);
// Solves every target and builds the sweep.
ParetoSweep sweep_pareto(const KnapsackAllocator& allocator, std::vector<BitsTarget> targets);

// Kneedle (V. Satopaa, J. Albrecht, D. Irwin, B. Raghavan, "Finding a 'Kneedle' in a Haystack:
// Detecting Knee Points in System Behavior", ICDCS Workshops 2011) for a decreasing curve, x
// ascending: both axes are min-max normalised, and the knee is the point furthest below the
// chord between the endpoints, i.e. the maximum of the difference curve (1 - x_n) - y_n. No knee
// with fewer than 3 points, a degenerate axis, or no point strictly below the chord.
std::optional<std::size_t> kneedle(std::span<const double> x, std::span<const double> y);

}  // namespace pq::alloc
