#include "scout/neighbourhood.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace pq::scout {
namespace {

// Rates (dL saved per byte) of each unit's steps, with its current option:
//   A: 0->1 0.6 (taken), 1->2 0.15        current dL 4
//   B: 0->1 0.3 (the best untaken step)   current dL 5
//   C: 0->1 1.8 (taken), 1->2 0.025       current dL 2
//   D: a single option, cannot flip       current dL 100
//   E: 0->1 0.4 (the worst taken step)    current dL 4
// Marginal rate sqrt(0.3 * 0.4); B and E sit closest to it (|ln| = 0.144 each), then A (0.549).
std::vector<UnitOptions> crafted_units() {
  return {
      {{10, 20, 40}, {10.0, 4.0, 1.0}, 1},  // A
      {{10, 20, 40}, {5.0, 2.0, 1.9}, 0},   // B
      {{10, 20, 40}, {20.0, 2.0, 1.5}, 1},  // C
      {{10}, {100.0}, 0},                   // D
      {{10, 20, 40}, {8.0, 4.0, 3.9}, 1},   // E
  };
}

TEST(MarginalRate, GeometricMeanOfTheBracketingSteps) {
  EXPECT_DOUBLE_EQ(marginal_rate(crafted_units()), std::sqrt(0.3 * 0.4));
  // Nothing taken: the best untaken step alone.
  const std::vector<UnitOptions> cheapest = {{{10, 20}, {5.0, 2.0}, 0}, {{10, 30}, {5.0, 1.0}, 0}};
  EXPECT_DOUBLE_EQ(marginal_rate(cheapest), 0.3);
  // Everything at its dearest option: the worst taken step alone.
  const std::vector<UnitOptions> dearest = {{{10, 20}, {5.0, 2.0}, 1}, {{10, 30}, {5.0, 1.0}, 1}};
  EXPECT_DOUBLE_EQ(marginal_rate(dearest), 0.2);
}

TEST(UncertainUnits, NearTiesFirstThenHighestSurrogate) {
  const std::vector<UnitOptions> units = crafted_units();
  // Half (2) near-ties: B, E; then by current dL: B (taken), A, E (taken), C.
  EXPECT_EQ(uncertain_units(units, 4), (std::vector<std::size_t>{1, 4, 0, 2}));
  // One near-tie (B), then the highest current dL: A and E tie at 4, and the nearer tie (E) wins.
  EXPECT_EQ(uncertain_units(units, 2), (std::vector<std::size_t>{1, 4}));
  // D, with a single option, is never chosen, however large its surrogate.
  EXPECT_EQ(uncertain_units(units, 10).size(), 4u);
  EXPECT_TRUE(uncertain_units(units, 0).empty());
}

}  // namespace
}  // namespace pq::scout
