#include "scout/neighbourhood.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace pq::scout {

namespace {

// dL saved per extra byte from option `lo` to option lo + 1.
double step_rate(const UnitOptions& unit, std::size_t lo) {
  return (unit.dloss[lo] - unit.dloss[lo + 1]) /
         static_cast<double>(unit.bytes[lo + 1] - unit.bytes[lo]);
}

}  // namespace

double marginal_rate(std::span<const UnitOptions> units) {
  double best_untaken = 0.0;
  double worst_taken = std::numeric_limits<double>::infinity();
  for (const UnitOptions& unit : units) {
    if (unit.current + 1 < unit.dloss.size()) {
      best_untaken = std::max(best_untaken, step_rate(unit, unit.current));
    }
    if (unit.current > 0) worst_taken = std::min(worst_taken, step_rate(unit, unit.current - 1));
  }
  const bool taken = std::isfinite(worst_taken) && worst_taken > 0.0;
  if (taken && best_untaken > 0.0) return std::sqrt(best_untaken * worst_taken);
  return taken ? worst_taken : best_untaken;
}

std::vector<std::size_t> uncertain_units(std::span<const UnitOptions> units, std::size_t count) {
  const double rate = marginal_rate(units);
  const auto tie_distance = [&](const UnitOptions& unit) {
    double distance = std::numeric_limits<double>::infinity();
    const auto consider = [&](std::size_t lo) {
      const double r = step_rate(unit, lo);
      if (r > 0.0 && rate > 0.0) distance = std::min(distance, std::fabs(std::log(r / rate)));
    };
    if (unit.current > 0) consider(unit.current - 1);
    if (unit.current + 1 < unit.dloss.size()) consider(unit.current);
    return distance;
  };
  std::vector<std::size_t> flippable;
  for (std::size_t u = 0; u < units.size(); ++u) {
    if (units[u].dloss.size() > 1) flippable.push_back(u);
  }
  count = std::min(count, flippable.size());
  std::vector<std::size_t> chosen;

  std::vector<std::size_t> order = flippable;
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return tie_distance(units[a]) < tie_distance(units[b]);
  });
  for (const std::size_t u : order) {
    if (chosen.size() == (count + 1) / 2) break;
    if (std::isfinite(tie_distance(units[u]))) chosen.push_back(u);
  }
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return units[a].dloss[units[a].current] > units[b].dloss[units[b].current];
  });
  for (const std::size_t u : order) {
    if (chosen.size() == count) break;
    if (std::find(chosen.begin(), chosen.end(), u) == chosen.end()) chosen.push_back(u);
  }
  return chosen;
}

}  // namespace pq::scout
