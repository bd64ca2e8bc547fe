#include "alloc/knapsack.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <stdexcept>

#include "common/error.h"

namespace pq::alloc {

// Method. Every item starts at its smallest option (the base); the base assignment's bytes are
// summed exactly, so the minimum feasible budget is exact. The DP then distributes only the room
// above the base, budget - min_bytes, over the options' byte *increments* above their item's base.
// This avoids the upstream flaw of rounding each option's absolute size independently, which
// loses the exact endpoints (RobTand/prismaquant issue #358, ../shared/docs/method-facts.md §5).
//
// The room is measured in units of `u` bytes. Increments are rounded UP to whole units, so any
// choice that fits the DP's capacity floor(room / u) also fits the room in bytes: the solution
// never overshoots. When u divides every increment (u = gcd of all increments, used whenever the
// room spans at most max_units of it) the rounding is exact and so is the optimum. Otherwise u is
// the smallest unit giving at most max_units cells; rounding then costs each item less than one
// unit, so the solution is at least as good as the best assignment within
//   budget - (room mod u) - m * (u - 1)     (m = items with a choice),
// which SolveResolution reports as max_shortfall_bytes.
//
// dp_i[c] = least summed dL increment of items < i within c units. Because each row is a minimum
// over "at most c" units, it never increases with c, and one DP at the largest budget answers all
// smaller ones: budgets on one axis are monotone by construction. Backtracking needs the rows of
// every item; instead of storing them all (items x cells), rows are kept every ~sqrt(items) items
// and each block is recomputed once, deterministically, while all budgets walk back through it.

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

  for (AllocationItem& item : items_) {
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
  }
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
  // Room above the base for the budgets the DP must solve; feasible budgets at or beyond
  // saturation take every item's lowest-dL option directly.
  std::uint64_t max_room = 0;
  for (std::uint64_t budget : budgets) {
    if (budget >= min_bytes_ && budget < saturation_bytes_) {
      max_room = std::max(max_room, budget - min_bytes_);
    }
  }

  std::uint64_t gcd = 0;
  std::size_t items_with_choice = 0;
  for (const AllocationItem& item : items_) {
    for (const AllocationItem::Option& option : item.options) {
      gcd = std::gcd(gcd, option.bytes - item.options.front().bytes);
    }
    if (item.options.size() > 1) ++items_with_choice;
  }
  std::uint64_t unit = 1;
  bool exact = true;
  if (gcd > 0 && max_room / gcd <= max_units_) {
    unit = gcd;
  } else if (gcd > 0) {
    // Here max_room > max_units * gcd, so unit > gcd cannot divide every increment.
    unit = (max_room + max_units_ - 1) / max_units_;
    exact = false;
  }
  const std::size_t capacity = static_cast<std::size_t>(max_room / unit);

  std::vector<std::vector<UnitOption>> unit_options(items_.size());
  for (std::size_t i = 0; i < items_.size(); ++i) {
    const AllocationItem& item = items_[i];
    for (std::size_t k = 1; k < item.options.size(); ++k) {
      const std::uint64_t increment = item.options[k].bytes - item.options[0].bytes;
      unit_options[i].push_back(
          {static_cast<std::size_t>((increment + unit - 1) / unit),
           item.options[k].predicted_dloss - item.options[0].predicted_dloss});
    }
  }

  // Forward pass, keeping the row before every block_size-th item.
  const std::size_t n = items_.size();
  const std::size_t block_size =
      std::max<std::size_t>(1, static_cast<std::size_t>(std::ceil(std::sqrt(double(n)))));
  const std::size_t row = capacity + 1;
  std::vector<double> checkpoints(((n + block_size - 1) / block_size) * row);
  std::vector<double> current(row, 0.0), next(row);
  for (std::size_t i = 0; i < n; ++i) {
    if (i % block_size == 0) {
      std::copy(current.begin(), current.end(), checkpoints.begin() + (i / block_size) * row);
    }
    relax_item(unit_options[i], current.data(), next.data(), capacity);
    current.swap(next);
  }

  // Backward pass: every budget the DP answers walks back through each recomputed block.
  std::vector<std::size_t> walking;                             // indices into budgets
  std::vector<std::size_t> remaining_units;                     // per walking budget
  std::vector<std::vector<std::size_t>> picks(budgets.size());  // option index per item
  for (std::size_t t = 0; t < budgets.size(); ++t) {
    if (budgets[t] < min_bytes_) continue;
    picks[t].resize(n);
    if (budgets[t] >= saturation_bytes_) {
      for (std::size_t i = 0; i < n; ++i) picks[t][i] = items_[i].options.size() - 1;
      continue;
    }
    walking.push_back(t);
    remaining_units.push_back(static_cast<std::size_t>((budgets[t] - min_bytes_) / unit));
  }
  if (!walking.empty()) {
    std::vector<double> block_rows;
    for (std::size_t block = (n + block_size - 1) / block_size; block-- > 0;) {
      const std::size_t begin = block * block_size;
      const std::size_t end = std::min(n, begin + block_size);
      block_rows.resize((end - begin + 1) * row);
      std::copy(checkpoints.begin() + block * row, checkpoints.begin() + (block + 1) * row,
                block_rows.begin());
      for (std::size_t i = begin; i < end; ++i) {
        relax_item(unit_options[i], &block_rows[(i - begin) * row],
                   &block_rows[(i - begin + 1) * row], capacity);
      }
      for (std::size_t w = 0; w < walking.size(); ++w) {
        std::size_t& c = remaining_units[w];
        for (std::size_t i = end; i-- > begin;) {
          const std::size_t k = pick_option(unit_options[i], &block_rows[(i - begin) * row],
                                            &block_rows[(i - begin + 1) * row], c);
          picks[walking[w]][i] = k;
          if (k > 0) c -= unit_options[i][k - 1].units;
        }
      }
    }
  }

  std::vector<std::optional<Allocation>> results(budgets.size());
  for (std::size_t t = 0; t < budgets.size(); ++t) {
    if (picks[t].empty()) continue;
    Allocation allocation;
    allocation.budget_bytes = budgets[t];
    allocation.format_of_linear.resize(table_->linears.size());
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t format = items_[i].options[picks[t][i]].format;
      for (std::size_t m : items_[i].members) allocation.format_of_linear[m] = format;
    }
    for (std::size_t l = 0; l < table_->linears.size(); ++l) {
      const FormatCost& cost = *table_->linears[l].costs[allocation.format_of_linear[l]];
      allocation.bytes += cost.bytes;
      allocation.predicted_dloss += cost.predicted_dloss;
    }
    if (allocation.bytes > budgets[t]) {
      throw std::logic_error("knapsack solution exceeds its byte budget");
    }
    SolveResolution& resolution = allocation.resolution;
    resolution.unit_bytes = unit;
    if (!exact && budgets[t] < saturation_bytes_) {
      const std::uint64_t room = budgets[t] - min_bytes_;
      resolution.exact = false;
      resolution.max_shortfall_bytes =
          std::min<std::uint64_t>(room, room % unit + items_with_choice * (unit - 1));
    }
    results[t] = std::move(allocation);
  }
  return results;
}

}  // namespace pq::alloc
