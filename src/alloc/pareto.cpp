#include "alloc/pareto.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>

#include "common/error.h"

namespace pq::alloc {

std::optional<std::size_t> kneedle(std::span<const double> x, std::span<const double> y) {
  if (x.size() < 3 || x.size() != y.size()) return std::nullopt;
  const auto [x_min, x_max] = std::minmax_element(x.begin(), x.end());
  const auto [y_min, y_max] = std::minmax_element(y.begin(), y.end());
  const double x_span = *x_max - *x_min;
  const double y_span = *y_max - *y_min;
  if (!(x_span > 0.0) || !(y_span > 0.0)) return std::nullopt;
  // Points within rounding error of the chord lie on it: a straight line has no knee.
  constexpr double kOnChord = 1e-9;
  std::optional<std::size_t> knee;
  double best = kOnChord;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double xn = (x[i] - *x_min) / x_span;
    const double yn = (y[i] - *y_min) / y_span;
    const double difference = (1.0 - xn) - yn;
    if (difference > best) {
      best = difference;
      knee = i;
    }
  }
  return knee;
}

ParetoSweep make_pareto_sweep(const CostTable& table, std::vector<BitsTarget> targets,
                              std::vector<std::optional<Allocation>> allocations) {
  PQ_CHECK(targets.size() == allocations.size(), "pareto sweep: {} targets but {} allocations",
           targets.size(), allocations.size());
  std::vector<std::size_t> order(targets.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return targets[a].value < targets[b].value;
  });

  ParetoSweep sweep;
  sweep.model = table.model;
  sweep.formats = table.formats;
  const std::uint64_t params = table.quantizable_params();
  for (std::size_t index : order) {
    ParetoPoint point;
    point.target = std::move(targets[index]);
    point.budget_bytes = point.target.budget_bytes(params);
    PQ_CHECK(sweep.points.empty() || sweep.points.back().budget_bytes != point.budget_bytes,
             "pareto target {} repeats target {} (same byte budget)", point.target.text,
             sweep.points.back().target.text);
    if (allocations[index]) {
      point.totals = summarize(table, *allocations[index]);
      point.allocation = std::move(allocations[index]);
    }
    sweep.points.push_back(std::move(point));
  }

  std::vector<std::size_t> feasible;
  std::vector<double> bits, dloss;
  for (std::size_t i = 0; i < sweep.points.size(); ++i) {
    const ParetoPoint& point = sweep.points[i];
    if (!point.totals) continue;
    if (!dloss.empty() && point.totals->predicted_dloss > dloss.back()) {
      throw std::logic_error("pareto sweep: a larger budget got a higher predicted dL");
    }
    feasible.push_back(i);
    bits.push_back(point.totals->bits_per_quantizable_param);
    dloss.push_back(point.totals->predicted_dloss);
  }
  if (const auto knee = kneedle(bits, dloss)) sweep.knee = feasible[*knee];
  return sweep;
}

ParetoSweep sweep_pareto(const KnapsackAllocator& allocator, std::vector<BitsTarget> targets) {
  const std::uint64_t params = allocator.table().quantizable_params();
  std::vector<std::uint64_t> budgets;
  for (const BitsTarget& target : targets) budgets.push_back(target.budget_bytes(params));
  return make_pareto_sweep(allocator.table(), std::move(targets), allocator.solve_many(budgets));
}

}  // namespace pq::alloc
