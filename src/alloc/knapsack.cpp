#include "alloc/knapsack.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <stdexcept>

#include "common/error.h"

namespace pq::alloc {

// Method, per budget (every item starts at its smallest option, its base).
//
// 1. Lagrangian reduction. Taking the steps along the items' lower convex hulls of (bytes, dL) in
//    order of dL saved per byte, while they fit, solves the LP relaxation; the first step that
//    does not fit sets the multiplier lambda. Continuing with the steps that still fit gives a
//    feasible incumbent of cost U. For every assignment x within the budget B,
//      dL(x) >= L + sum_i rc_i(x_i),   L = sum_i min_o (dL_io + lambda bytes_io) - lambda B,
//    with reduced costs rc_io = dL_io + lambda bytes_io - min_o' (...) >= 0. So an option with
//    rc > U - L cannot be part of any assignment better than the incumbent and is dropped; items
//    left with one option are fixed. Typically only items whose efficiency is near lambda stay
//    free. (The bound is the classic one for the multiple-choice knapsack; see e.g. D. Pisinger,
//    "A minimal algorithm for the multiple-choice knapsack problem", EJOR 83, 1995.)
// 2. DP over the free items. Only the room above their bases is distributed, over the options'
//    byte *increments*, so the minimum budget is exact; this avoids the upstream flaw of rounding
//    each option's absolute size independently, which loses exact endpoints (RobTand/prismaquant
//    issue #358, ../shared/docs/method-facts.md §5). The room is measured in units of u bytes and
//    increments are rounded UP to whole units, so a choice fitting floor(room / u) units fits the
//    room in bytes: the solution never overshoots. When the room spans at most max_units of
//    u = gcd(increments), the rounding is exact and so is the optimum. Otherwise u is the
//    smallest unit giving max_units cells; rounding then costs each free item less than one
//    unit, and the result is at least as good as the best assignment within
//      budget - (room mod u) - m (u - 1)      (m = free items),
//    reported as max_shortfall_bytes. (Any such assignment better than the incumbent uses only
//    surviving options, so the DP sees it; the result is never worse than the incumbent.) The
//    Lagrangian bound L also bounds the optimum for the exact budget from below, so a coarse
//    result is reported with max_excess_dloss = its dL - L as well.
//
// dp_i[c] = least summed dL increment of items < i within c units; each row is a minimum over "at
// most c", so it never increases with c. Backtracking needs every row; instead of storing items x
// cells, rows are kept every ~sqrt(items) items and each block is recomputed once, bit-identically,
// when the walk back reaches it.

namespace {

// An option's increment over its item's base, on the DP axis.
struct UnitOption {
  std::size_t units = 0;
  double delta_dloss = 0.0;
};

// next[c] = min(prev[c], min_o prev[c - units_o] + delta_o) for c in [0, capacity].
void relax_item(const std::vector<UnitOption>& options, const double* __restrict prev,
                double* __restrict next, std::size_t capacity) {
  std::copy(prev, prev + capacity + 1, next);
  for (const UnitOption& option : options) {
    if (option.units > capacity) continue;
    const double delta = option.delta_dloss;
    double* __restrict shifted = next + option.units;
    const std::size_t count = capacity + 1 - option.units;
    for (std::size_t j = 0; j < count; ++j) {
      const double candidate = prev[j] + delta;
      shifted[j] = candidate < shifted[j] ? candidate : shifted[j];
    }
  }
}

// Index of an option reproducing after[c] from before: 0 is the base, k the k-th UnitOption.
std::size_t pick_option(const std::vector<UnitOption>& options, const double* before,
                        const double* after, std::size_t c) {
  if (before[c] == after[c]) return 0;
  for (std::size_t k = 0; k < options.size(); ++k) {
    const UnitOption& option = options[k];
    if (option.units <= c && before[c - option.units] + option.delta_dloss == after[c])
      return k + 1;
  }
  throw std::logic_error("knapsack backtracking found no option reproducing the DP value");
}

// An item left free by the reduction, with its surviving options (indices, bytes ascending).
struct FreeItem {
  std::size_t item = 0;
  std::vector<std::size_t> options;
};

// Solves the free items within `room` bytes above their bases; returns the chosen position in
// each FreeItem::options.
std::vector<std::size_t> solve_free_items(const std::vector<AllocationItem>& items,
                                          const std::vector<FreeItem>& free_items,
                                          std::uint64_t room, std::uint64_t max_units,
                                          SolveResolution& resolution) {
  const std::size_t n = free_items.size();
  std::uint64_t gcd = 0, spread = 0;
  for (const FreeItem& free : free_items) {
    const auto bytes = [&](std::size_t k) {
      return items[free.item].options[free.options[k]].bytes;
    };
    for (std::size_t k = 1; k < free.options.size(); ++k) gcd = std::gcd(gcd, bytes(k) - bytes(0));
    spread += bytes(free.options.size() - 1) - bytes(0);
  }
  std::vector<std::size_t> picks(n, 0);
  resolution = SolveResolution{};
  resolution.free_items = n;
  if (spread <= room) {  // every free item affords its best option
    for (std::size_t i = 0; i < n; ++i) picks[i] = free_items[i].options.size() - 1;
    return picks;
  }
  std::uint64_t unit = gcd;
  if (room / gcd > max_units) {
    // Here room > max_units * gcd, so unit > gcd cannot divide every increment.
    unit = (room + max_units - 1) / max_units;
    resolution.exact = false;
    resolution.max_shortfall_bytes = std::min<std::uint64_t>(room, room % unit + n * (unit - 1));
  }
  resolution.unit_bytes = unit;

  std::vector<std::vector<UnitOption>> unit_options(n);
  std::size_t max_useful_units = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const AllocationItem& item = items[free_items[i].item];
    const AllocationItem::Option& base = item.options[free_items[i].options[0]];
    for (std::size_t k = 1; k < free_items[i].options.size(); ++k) {
      const AllocationItem::Option& option = item.options[free_items[i].options[k]];
      unit_options[i].push_back(
          {static_cast<std::size_t>((option.bytes - base.bytes + unit - 1) / unit),
           option.predicted_dloss - base.predicted_dloss});
    }
    max_useful_units += unit_options[i].back().units;
  }
  const std::size_t capacity = std::min(static_cast<std::size_t>(room / unit), max_useful_units);

  // Forward pass, keeping the row before every block_size-th item.
  const std::size_t block_size =
      std::max<std::size_t>(1, static_cast<std::size_t>(std::ceil(std::sqrt(double(n)))));
  const std::size_t blocks = (n + block_size - 1) / block_size;
  const std::size_t row = capacity + 1;
  std::vector<double> checkpoints(blocks * row);
  std::vector<double> current(row, 0.0), next(row);
  for (std::size_t i = 0; i < n; ++i) {
    if (i % block_size == 0) {
      std::copy(current.begin(), current.end(), checkpoints.begin() + (i / block_size) * row);
    }
    relax_item(unit_options[i], current.data(), next.data(), capacity);
    current.swap(next);
  }

  // Backward pass through recomputed blocks.
  std::size_t c = capacity;
  std::vector<double> block_rows;
  for (std::size_t block = blocks; block-- > 0;) {
    const std::size_t begin = block * block_size;
    const std::size_t end = std::min(n, begin + block_size);
    block_rows.resize((end - begin + 1) * row);
    std::copy(checkpoints.begin() + block * row, checkpoints.begin() + (block + 1) * row,
              block_rows.begin());
    for (std::size_t i = begin; i < end; ++i) {
      relax_item(unit_options[i], &block_rows[(i - begin) * row],
                 &block_rows[(i - begin + 1) * row], capacity);
    }
    for (std::size_t i = end; i-- > begin;) {
      const std::size_t k = pick_option(unit_options[i], &block_rows[(i - begin) * row],
                                        &block_rows[(i - begin + 1) * row], c);
      picks[i] = k;
      if (k > 0) c -= unit_options[i][k - 1].units;
    }
  }
  return picks;
}

double bits_per_param(std::uint64_t bytes, std::uint64_t params) {
  return params == 0 ? 0.0 : 8.0 * static_cast<double>(bytes) / static_cast<double>(params);
}

}  // namespace

KnapsackAllocator::KnapsackAllocator(const CostTable& table, const AllocatorOptions& options)
    : table_(&table), max_units_(std::max<std::uint64_t>(options.max_units, 1)) {
  std::vector<bool> allowed(table.formats.size(), options.formats.empty());
  for (const std::string& name : options.formats) allowed[table.format_index(name)] = true;

  std::map<std::string, std::size_t> item_of_group;
  for (std::size_t i = 0; i < table.linears.size(); ++i) {
    const LinearCost& linear = table.linears[i];
    const std::string& key = linear.group.empty() ? linear.name : linear.group;
    const auto [it, inserted] = item_of_group.try_emplace(key, items_.size());
    if (inserted) items_.push_back(AllocationItem{key, {}, {}});
    items_[it->second].members.push_back(i);
  }

  for (std::size_t index = 0; index < items_.size(); ++index) {
    AllocationItem& item = items_[index];
    std::vector<AllocationItem::Option> candidates;
    for (std::size_t f = 0; f < table.formats.size(); ++f) {
      if (!allowed[f]) continue;
      AllocationItem::Option option{f, 0, 0.0};
      bool every_member = true;
      for (std::size_t m : item.members) {
        const std::optional<FormatCost>& cost = table.linears[m].costs[f];
        if (!cost) {
          every_member = false;
          break;
        }
        option.bytes += cost->bytes;
        option.predicted_dloss += cost->predicted_dloss;
      }
      if (every_member) candidates.push_back(option);
    }
    PQ_CHECK(!candidates.empty(), "{} \"{}\": no allowed format is offered for every member",
             item.members.size() > 1 ? "sibling group" : "linear", item.key);
    // Keep the options no other option beats on both bytes and dL (ties: the earlier format).
    std::stable_sort(candidates.begin(), candidates.end(), [](const auto& a, const auto& b) {
      return a.bytes != b.bytes ? a.bytes < b.bytes : a.predicted_dloss < b.predicted_dloss;
    });
    for (const AllocationItem::Option& option : candidates) {
      if (item.options.empty() || option.predicted_dloss < item.options.back().predicted_dloss) {
        item.options.push_back(option);
      }
    }
    min_bytes_ += item.options.front().bytes;
    saturation_bytes_ += item.options.back().bytes;

    // Lower convex hull (monotone chain): efficiencies strictly decrease along it.
    const auto efficiency = [&](std::size_t from, std::size_t to) {
      return (item.options[from].predicted_dloss - item.options[to].predicted_dloss) /
             static_cast<double>(item.options[to].bytes - item.options[from].bytes);
    };
    std::vector<std::size_t> hull;
    for (std::size_t k = 0; k < item.options.size(); ++k) {
      while (hull.size() >= 2 && efficiency(hull[hull.size() - 1], k) >=
                                     efficiency(hull[hull.size() - 2], hull[hull.size() - 1])) {
        hull.pop_back();
      }
      hull.push_back(k);
    }
    for (std::size_t h = 1; h < hull.size(); ++h) {
      hull_steps_.push_back({index, hull[h - 1], hull[h],
                             item.options[hull[h]].bytes - item.options[hull[h - 1]].bytes,
                             efficiency(hull[h - 1], hull[h])});
    }
  }
  std::sort(hull_steps_.begin(), hull_steps_.end(), [](const HullStep& a, const HullStep& b) {
    if (a.efficiency != b.efficiency) return a.efficiency > b.efficiency;
    return a.item != b.item ? a.item < b.item : a.from < b.from;
  });
}

std::vector<std::size_t> KnapsackAllocator::solve_one(std::uint64_t budget_bytes,
                                                      SolveResolution& resolution) const {
  const std::size_t n = items_.size();
  std::vector<std::size_t> incumbent(n, 0);
  if (budget_bytes >= saturation_bytes_) {
    for (std::size_t i = 0; i < n; ++i) incumbent[i] = items_[i].options.size() - 1;
    resolution = SolveResolution{};
    return incumbent;
  }

  // LP relaxation by hull steps; lambda from the first step that does not fit.
  std::uint64_t room = budget_bytes - min_bytes_;
  std::optional<double> lambda;
  for (const HullStep& step : hull_steps_) {
    if (incumbent[step.item] != step.from) continue;
    if (step.extra_bytes <= room) {
      room -= step.extra_bytes;
      incumbent[step.item] = step.to;
    } else if (!lambda) {
      lambda = step.efficiency;
    }
  }
  // The budget is below saturation, so some step did not fit.
  const double l = *lambda;

  // Lagrangian bound and reduced costs.
  double bound = -l * static_cast<double>(budget_bytes);
  double upper = 0.0;
  double scale = l * static_cast<double>(budget_bytes);
  std::vector<double> best_penalized(n);
  for (std::size_t i = 0; i < n; ++i) {
    const AllocationItem& item = items_[i];
    double best = INFINITY;
    for (const AllocationItem::Option& option : item.options) {
      best = std::min(best, option.predicted_dloss + l * static_cast<double>(option.bytes));
    }
    best_penalized[i] = best;
    bound += best;
    scale += std::abs(best);
    upper += item.options[incumbent[i]].predicted_dloss;
  }
  // Rounding in these sums must never drop an option that might matter: be generous.
  const double slack = std::max(upper - bound, 0.0) + 1e-9 * (scale + std::abs(upper));

  std::vector<FreeItem> free_items;
  std::vector<std::size_t> picks(n);
  std::uint64_t remaining = budget_bytes;
  for (std::size_t i = 0; i < n; ++i) {
    const AllocationItem& item = items_[i];
    FreeItem free{i, {}};
    for (std::size_t k = 0; k < item.options.size(); ++k) {
      const double reduced_cost = item.options[k].predicted_dloss +
                                  l * static_cast<double>(item.options[k].bytes) -
                                  best_penalized[i];
      if (reduced_cost <= slack || k == incumbent[i]) free.options.push_back(k);
    }
    remaining -= item.options[free.options.front()].bytes;
    if (free.options.size() == 1) {
      picks[i] = free.options.front();
    } else {
      free_items.push_back(std::move(free));
    }
  }

  const std::vector<std::size_t> free_picks =
      solve_free_items(items_, free_items, remaining, max_units_, resolution);
  double dp_dloss = 0.0;
  for (std::size_t f = 0; f < free_items.size(); ++f) {
    picks[free_items[f].item] = free_items[f].options[free_picks[f]];
  }
  for (std::size_t i = 0; i < n; ++i) dp_dloss += items_[i].options[picks[i]].predicted_dloss;
  // L is a lower bound on the optimum for this exact budget, so the result is within
  // (its dL - L) of it.
  const double result = std::min(dp_dloss, upper);
  if (!resolution.exact) resolution.max_excess_dloss = std::max(result - bound, 0.0);
  return dp_dloss <= upper ? picks : incumbent;
}

Allocation KnapsackAllocator::solve(std::uint64_t budget_bytes) const {
  const std::uint64_t params = table_->quantizable_params();
  PQ_CHECK(budget_bytes >= min_bytes_,
           "budget of {} bytes ({:.4f} bits/param) is infeasible: the minimum achievable is {} "
           "bytes ({:.4f} bits/param, every Linear at its smallest allowed format)",
           budget_bytes, bits_per_param(budget_bytes, params), min_bytes_,
           bits_per_param(min_bytes_, params));
  const std::uint64_t budgets[] = {budget_bytes};
  return *solve_many(budgets).front();
}

std::vector<std::optional<Allocation>> KnapsackAllocator::solve_many(
    std::span<const std::uint64_t> budgets) const {
  std::vector<std::optional<Allocation>> results(budgets.size());
  for (std::size_t t = 0; t < budgets.size(); ++t) {
    if (budgets[t] < min_bytes_) continue;
    Allocation allocation;
    allocation.budget_bytes = budgets[t];
    const std::vector<std::size_t> picks = solve_one(budgets[t], allocation.resolution);
    allocation.format_of_linear.resize(table_->linears.size());
    for (std::size_t i = 0; i < items_.size(); ++i) {
      for (std::size_t m : items_[i].members) {
        allocation.format_of_linear[m] = items_[i].options[picks[i]].format;
      }
    }
    for (std::size_t l = 0; l < table_->linears.size(); ++l) {
      const FormatCost& cost = *table_->linears[l].costs[allocation.format_of_linear[l]];
      allocation.bytes += cost.bytes;
      allocation.predicted_dloss += cost.predicted_dloss;
    }
    if (allocation.bytes > budgets[t]) {
      throw std::logic_error("knapsack solution exceeds its byte budget");
    }
    results[t] = std::move(allocation);
  }

  // Exact optima are monotone in the budget already; coarse ones and last-bit differences in the
  // re-summed dL need not be. A larger budget takes a smaller budget's better assignment.
  std::vector<std::size_t> order(budgets.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return budgets[a] < budgets[b]; });
  const Allocation* best = nullptr;
  for (std::size_t t : order) {
    if (!results[t]) continue;
    if (best && best->predicted_dloss < results[t]->predicted_dloss) {
      const SolveResolution resolution = results[t]->resolution;
      results[t] = *best;
      results[t]->budget_bytes = budgets[t];
      results[t]->resolution = resolution;
    }
    best = &*results[t];
  }
  return results;
}

}  // namespace pq::alloc
