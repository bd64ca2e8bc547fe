#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace pq::alloc {

// The cost stage's measurement of one Linear in one format (docs/artifacts.md, cost.json).
struct FormatCost {
  std::uint64_t bytes = 0;       // every stored byte of the Linear in this format
  double predicted_dloss = 0.0;  // surrogate loss increase; the allocator minimises its sum
  // Further error columns, carried for reports and other objectives; absent when not measured.
  std::optional<double> weight_mse;
  std::optional<double> act_weighted_mse;
  std::optional<double> output_mse;
};

// One quantizable Linear. `costs[f]` is empty when the Linear cannot take format f.
struct LinearCost {
  std::string name;                 // HF module name, e.g. model.layers.0.self_attn.q_proj
  std::vector<std::int64_t> shape;  // [out, in]
  std::string group;                // sibling group key; empty: the Linear decides alone
  std::uint64_t params = 0;         // out * in
  std::vector<std::optional<FormatCost>> costs;  // indexed like CostTable::formats
};

// WORK/cost/cost.json in memory: what the allocator needs to choose one format per Linear.
struct CostTable {
  std::string model;
  std::vector<std::string> formats;
  std::vector<LinearCost> linears;
  // Tensors that are never quantized (embeddings, norms, routers, biases, an unquantized
  // lm_head): they count towards the whole-checkpoint size and bits per parameter.
  std::uint64_t passthrough_params = 0;
  std::uint64_t passthrough_bytes = 0;
  // meta.serve_on of a cost stage's table: the GPU generation whose loadable formats it offers
  // (formats::serving_target_name); absent from tables written without one.
  std::optional<std::string> serve_on;

  std::uint64_t quantizable_params() const;
  // Index of `name` in formats; pq::Error naming the known formats when absent.
  std::size_t format_index(std::string_view name) const;
};

inline constexpr std::string_view kCostSchema = "prismaquant.cost/1";

// Validates and converts; errors are pq::Error naming `label` and the offending Linear/format.
// Formats must be known to the formats library (src/formats), accept the Linear's shape, and
// their bytes must equal formats::WeightFormat::bytes(shape) exactly.
CostTable cost_table_from_json(const nlohmann::json& j, const std::string& label);
nlohmann::json cost_table_to_json(const CostTable& table);
// Reads `path`, or `path`/cost.json when `path` is a directory.
CostTable read_cost_table(const std::filesystem::path& path);
void write_cost_table(const std::filesystem::path& path, const CostTable& table);

}  // namespace pq::alloc
