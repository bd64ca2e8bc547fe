#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "alloc/assignment.h"
#include "alloc/pareto.h"
#include "formats/serving.h"

namespace pq::alloc {

// What `prismaquant allocate` was asked to do. Exactly one of target_bits / target_bytes.
struct AllocateJob {
  std::filesystem::path cost;  // WORK/cost (holding cost.json) or the cost.json file itself
  std::filesystem::path out;   // WORK/alloc; created when missing
  std::optional<std::string> target_bits;   // bits per quantizable parameter, e.g. "4.75"
  std::optional<std::string> target_bytes;  // whole-checkpoint size, e.g. "24GB"
  std::optional<std::string> pareto;        // comma-separated bits targets
  std::vector<std::string> formats;         // restrict the choice; empty: all in the cost table
  std::uint64_t max_units = AllocatorOptions{}.max_units;
  // The GPU generation the checkpoint is for; the cost table must have been measured for it
  // (its meta.serve_on). Unset: whatever the table was measured for.
  std::optional<formats::ServingTarget> serve_on;
};

struct AllocateOutcome {
  AssignmentFile assignment;
  std::optional<ParetoSweep> sweep;  // with --pareto
  std::size_t items = 0;             // knapsack decisions (sibling groups and lone Linears)
};

// Reads the cost table, solves the main budget and every Pareto target, and writes
// out/assignment.json (and out/pareto.csv, out/pareto.svg with a sweep), each atomically.
// pq::Error for bad input, including a budget below the minimum achievable size.
AllocateOutcome run_allocate(const AllocateJob& job);

// A few lines for the terminal: the chosen mix, sizes, predicted dL and the knee.
std::string summarize_outcome(const AllocateOutcome& outcome);

}  // namespace pq::alloc
