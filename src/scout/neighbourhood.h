#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace pq::scout {

// One knapsack unit (a sibling group or a lone Linear) as L3 sees it: its options ordered by bytes
// ascending, the surrogate of each (summed over members) and the option the assignment gave it.
struct UnitOptions {
  std::vector<std::uint64_t> bytes;
  std::vector<double> dloss;
  std::size_t current = 0;
};

// The surrogate's marginal rate (dL saved per byte) at an assignment: the geometric mean of the
// best step up that no unit took and the worst step up that some unit took (the two bracket the
// Lagrange multiplier of the knapsack's LP relaxation); one of them when the other does not exist;
// 0 when neither does.
double marginal_rate(std::span<const UnitOptions> units);

// The units L3 measures, at most `count`: the first half (rounded up) are near-ties, the units
// with a step to a neighbouring option whose rate is closest to the marginal rate in log ratio;
// the rest are the units of highest current surrogate (equal surrogates: the nearer tie first).
// Units with a single option cannot flip and are never chosen.
std::vector<std::size_t> uncertain_units(std::span<const UnitOptions> units, std::size_t count);

}  // namespace pq::scout
