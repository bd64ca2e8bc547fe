#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

namespace pq::scout {

// The decisions coordinate descent may change: per item (a sibling group or a lone Linear) the
// bytes of each option it may take, options ordered by bytes ascending.
struct PolishProblem {
  std::vector<std::vector<std::uint64_t>> option_bytes;
  std::uint64_t budget_bytes = 0;
};

// Measured KL of a full choice (option index per item).
using ChoiceMeasurer = std::function<double(const std::vector<std::size_t>& choice)>;

struct PolishOptions {
  // Items in the order they are tried (each once per sweep); empty: 0, 1, 2, ...
  std::vector<std::size_t> item_order;
  std::size_t max_sweeps = 2;
  std::size_t max_evaluations = 64;
  // A flip is accepted only when it lowers KL by more than this (PrismaSCOUT's coord-descent
  // accepts drops > 1e-12; method-facts.md §6).
  double min_improvement = 1e-12;
};

// One single-item flip that was measured.
struct PolishTrial {
  std::size_t item = 0;
  std::size_t from = 0;
  std::size_t to = 0;
  double kl_before = 0.0;
  double kl_after = 0.0;
  bool accepted = false;
};

struct PolishResult {
  std::vector<std::size_t> choice;
  double kl = 0.0;  // measured KL of `choice`; never above the starting KL
  std::uint64_t bytes = 0;
  std::vector<PolishTrial> trials;
};

// Coordinate descent from `start` (whose measured KL is `start_kl`): sweeps the items, trying
// each one's adjacent options (one cheaper, one dearer) that keep the total within the budget,
// and keeps a flip only when it strictly lowers the measured KL. Every accepted state was
// measured, so the result is never worse than the start. A choice is measured at most once.
// Stops after a sweep without an accepted flip, after max_sweeps, or when max_evaluations
// measurements are spent.
PolishResult coordinate_descent(const PolishProblem& problem, std::vector<std::size_t> start,
                                double start_kl, const ChoiceMeasurer& measure,
                                const PolishOptions& options = {});

}  // namespace pq::scout
