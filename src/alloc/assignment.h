#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "alloc/cost_table.h"
#include "alloc/knapsack.h"

namespace pq::alloc {

struct FormatTally {
  std::uint64_t linears = 0;
  std::uint64_t params = 0;
  std::uint64_t bytes = 0;
  bool operator==(const FormatTally&) const = default;
};

// Sizes and predicted dL of one allocation, over the quantizable Linears and over the whole
// checkpoint (Linears plus passthrough tensors).
struct AllocationTotals {
  std::uint64_t quantizable_params = 0;
  std::uint64_t quantizable_bytes = 0;
  std::uint64_t checkpoint_params = 0;
  std::uint64_t checkpoint_bytes = 0;
  double bits_per_quantizable_param = 0.0;
  double bits_per_checkpoint_param = 0.0;
  double predicted_dloss = 0.0;
  std::map<std::string, FormatTally> per_format;  // every format of the cost table, zeros included
};

AllocationTotals summarize(const CostTable& table, const Allocation& allocation);

// The user's budget as requested: "bits_per_param" (value like "4.75", over quantizable
// parameters) or "checkpoint_bytes" (value in bytes, over the whole checkpoint).
struct BudgetRequest {
  std::string kind;
  std::string value;
  std::uint64_t budget_bytes = 0;  // what the knapsack got: the quantizable Linears' share
};

struct AssignedLinear {
  std::string name;
  std::string group;
  std::string format;
  std::uint64_t params = 0;
  std::uint64_t bytes = 0;
  double predicted_dloss = 0.0;
};

// WORK/alloc/assignment.json (docs/artifacts.md): the format of every Linear and the totals.
struct AssignmentFile {
  std::string model;
  // The serving target of the cost table the formats were chosen from (CostTable::serve_on);
  // export refuses to write the assignment for another one.
  std::optional<std::string> serve_on;
  BudgetRequest budget;
  SolveResolution resolution;
  AllocationTotals totals;
  std::vector<AssignedLinear> linears;
};

inline constexpr std::string_view kAssignmentSchema = "prismaquant.assignment/1";

AssignmentFile make_assignment_file(const CostTable& table, const Allocation& allocation,
                                    BudgetRequest budget);
nlohmann::json assignment_to_json(const AssignmentFile& file);
// Validates the schema and that the totals agree with the per-Linear records.
AssignmentFile assignment_from_json(const nlohmann::json& j, const std::string& label);
AssignmentFile read_assignment(const std::filesystem::path& path);
void write_assignment(const std::filesystem::path& path, const AssignmentFile& file);

}  // namespace pq::alloc
