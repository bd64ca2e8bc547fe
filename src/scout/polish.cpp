#include "scout/polish.h"

#include <numeric>
#include <set>

#include "common/error.h"

namespace pq::scout {

PolishResult coordinate_descent(const PolishProblem& problem, std::vector<std::size_t> start,
                                double start_kl, const ChoiceMeasurer& measure,
                                const PolishOptions& options) {
  const std::size_t items = problem.option_bytes.size();
  PQ_CHECK(start.size() == items, "polish: a choice of {} items for a problem of {}", start.size(),
           items);
  PolishResult result;
  result.choice = std::move(start);
  result.kl = start_kl;
  for (std::size_t i = 0; i < items; ++i) {
    PQ_CHECK(result.choice[i] < problem.option_bytes[i].size(),
             "polish: item {} starts at option {} of {}", i, result.choice[i],
             problem.option_bytes[i].size());
    result.bytes += problem.option_bytes[i][result.choice[i]];
  }
  PQ_CHECK(result.bytes <= problem.budget_bytes,
           "polish: the start takes {} bytes, over the budget of {}", result.bytes,
           problem.budget_bytes);

  std::vector<std::size_t> order = options.item_order;
  if (order.empty()) {
    order.resize(items);
    std::iota(order.begin(), order.end(), 0);
  }
  // Measured choices: one measured before was not accepted then, at a KL no lower than now
  // (accepted KLs only fall), so it cannot be accepted now and is not measured again.
  std::set<std::vector<std::size_t>> measured = {result.choice};
  std::size_t evaluations = 0;
  for (std::size_t sweep = 0; sweep < options.max_sweeps; ++sweep) {
    bool improved = false;
    for (const std::size_t item : order) {
      PQ_CHECK(item < items, "polish: item order names item {} of {}", item, items);
      const std::vector<std::uint64_t>& bytes = problem.option_bytes[item];
      const std::size_t current = result.choice[item];
      std::vector<std::size_t> targets;
      if (current > 0) targets.push_back(current - 1);
      if (current + 1 < bytes.size()) targets.push_back(current + 1);
      for (const std::size_t to : targets) {
        const std::uint64_t new_bytes = result.bytes - bytes[current] + bytes[to];
        if (new_bytes > problem.budget_bytes) continue;
        std::vector<std::size_t> trial = result.choice;
        trial[item] = to;
        if (!measured.insert(trial).second) continue;
        if (evaluations == options.max_evaluations) return result;
        const double kl = measure(trial);
        ++evaluations;
        const bool accepted = kl < result.kl - options.min_improvement;
        result.trials.push_back({item, current, to, result.kl, kl, accepted});
        if (accepted) {
          result.choice = std::move(trial);
          result.kl = kl;
          result.bytes = new_bytes;
          improved = true;
          break;  // the item's other neighbour is relative to the old option
        }
      }
    }
    if (!improved) break;
  }
  return result;
}

}  // namespace pq::scout
