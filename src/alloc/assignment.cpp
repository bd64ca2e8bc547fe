#include "alloc/assignment.h"

#include <fmt/format.h>

#include <cmath>
#include <set>

#include "common/error.h"
#include "common/file_util.h"
#include "common/json_reader.h"

namespace pq::alloc {

using nlohmann::json;

namespace {

double bits_per_param(std::uint64_t bytes, std::uint64_t params) {
  return params == 0 ? 0.0 : 8.0 * static_cast<double>(bytes) / static_cast<double>(params);
}

void finish_totals(AllocationTotals& totals, std::uint64_t passthrough_params,
                   std::uint64_t passthrough_bytes) {
  totals.checkpoint_params = totals.quantizable_params + passthrough_params;
  totals.checkpoint_bytes = totals.quantizable_bytes + passthrough_bytes;
  totals.bits_per_quantizable_param =
      bits_per_param(totals.quantizable_bytes, totals.quantizable_params);
  totals.bits_per_checkpoint_param =
      bits_per_param(totals.checkpoint_bytes, totals.checkpoint_params);
}

const json& field(const json& object, const char* key, const std::string& where) {
  PQ_CHECK(object.is_object(), "{}: expected a JSON object", where);
  const auto it = object.find(key);
  PQ_CHECK(it != object.end(), "{}: missing \"{}\"", where, key);
  return *it;
}

std::string string_field(const json& object, const char* key, const std::string& where) {
  const json& value = field(object, key, where);
  PQ_CHECK(value.is_string(), "{}: \"{}\" must be a string", where, key);
  return value.get<std::string>();
}

std::uint64_t unsigned_field(const json& object, const char* key, const std::string& where) {
  const json& value = field(object, key, where);
  PQ_CHECK(
      value.is_number_unsigned() || (value.is_number_integer() && value.get<std::int64_t>() >= 0),
      "{}: \"{}\" must be a non-negative integer", where, key);
  return value.get<std::uint64_t>();
}

double number_field(const json& object, const char* key, const std::string& where) {
  const json& value = field(object, key, where);
  PQ_CHECK(value.is_number() && std::isfinite(value.get<double>()),
           "{}: \"{}\" must be a finite number", where, key);
  return value.get<double>();
}

bool same_sum(double a, double b) {
  return std::abs(a - b) <= 1e-9 * std::max(std::abs(a), std::abs(b));
}

}  // namespace

AllocationTotals summarize(const CostTable& table, const Allocation& allocation) {
  AllocationTotals totals;
  for (const std::string& format : table.formats) totals.per_format[format] = {};
  for (std::size_t l = 0; l < table.linears.size(); ++l) {
    const LinearCost& linear = table.linears[l];
    const std::size_t f = allocation.format_of_linear[l];
    const FormatCost& cost = *linear.costs[f];
    totals.quantizable_params += linear.params;
    totals.quantizable_bytes += cost.bytes;
    totals.predicted_dloss += cost.predicted_dloss;
    FormatTally& tally = totals.per_format[table.formats[f]];
    ++tally.linears;
    tally.params += linear.params;
    tally.bytes += cost.bytes;
  }
  finish_totals(totals, table.passthrough_params, table.passthrough_bytes);
  return totals;
}

AssignmentFile make_assignment_file(const CostTable& table, const Allocation& allocation,
                                    BudgetRequest budget) {
  AssignmentFile file;
  file.model = table.model;
  file.serve_on = table.serve_on;
  file.budget = std::move(budget);
  file.resolution = allocation.resolution;
  file.totals = summarize(table, allocation);
  for (std::size_t l = 0; l < table.linears.size(); ++l) {
    const LinearCost& linear = table.linears[l];
    const std::size_t f = allocation.format_of_linear[l];
    file.linears.push_back({linear.name, linear.group, table.formats[f], linear.params,
                            linear.costs[f]->bytes, linear.costs[f]->predicted_dloss});
  }
  return file;
}

json assignment_to_json(const AssignmentFile& file) {
  const AllocationTotals& t = file.totals;
  json counts = json::object();
  for (const auto& [format, tally] : t.per_format) {
    counts[format] = {{"linears", tally.linears}, {"params", tally.params}, {"bytes", tally.bytes}};
  }
  json linears = json::array();
  for (const AssignedLinear& linear : file.linears) {
    linears.push_back({{"name", linear.name},
                       {"group", linear.group},
                       {"format", linear.format},
                       {"params", linear.params},
                       {"bytes", linear.bytes},
                       {"predicted_dloss", linear.predicted_dloss}});
  }
  json out = {{"schema", kAssignmentSchema},
              {"model", file.model},
              {"budget",
               {{"kind", file.budget.kind},
                {"value", file.budget.value},
                {"budget_bytes", file.budget.budget_bytes}}},
              {"solver",
               {{"unit_bytes", file.resolution.unit_bytes},
                {"exact", file.resolution.exact},
                {"max_shortfall_bytes", file.resolution.max_shortfall_bytes},
                {"max_excess_dloss", file.resolution.max_excess_dloss},
                {"free_items", file.resolution.free_items}}},
              {"totals",
               {{"quantizable_params", t.quantizable_params},
                {"quantizable_bytes", t.quantizable_bytes},
                {"bits_per_quantizable_param", t.bits_per_quantizable_param},
                {"checkpoint_params", t.checkpoint_params},
                {"checkpoint_bytes", t.checkpoint_bytes},
                {"bits_per_checkpoint_param", t.bits_per_checkpoint_param},
                {"predicted_dloss", t.predicted_dloss}}},
              {"counts", std::move(counts)},
              {"linears", std::move(linears)}};
  if (file.serve_on) out["serve_on"] = *file.serve_on;
  return out;
}

AssignmentFile assignment_from_json(const json& j, const std::string& label) {
  PQ_CHECK(string_field(j, "schema", label) == kAssignmentSchema, "{}: \"schema\" must be \"{}\"",
           label, kAssignmentSchema);
  AssignmentFile file;
  file.model = string_field(j, "model", label);
  if (j.contains("serve_on")) file.serve_on = string_field(j, "serve_on", label);

  const json& budget = field(j, "budget", label);
  const std::string budget_where = label + ": budget";
  file.budget.kind = string_field(budget, "kind", budget_where);
  PQ_CHECK(file.budget.kind == "bits_per_param" || file.budget.kind == "checkpoint_bytes",
           "{}: unknown \"kind\" \"{}\"", budget_where, file.budget.kind);
  file.budget.value = string_field(budget, "value", budget_where);
  file.budget.budget_bytes = unsigned_field(budget, "budget_bytes", budget_where);

  const json& solver = field(j, "solver", label);
  const std::string solver_where = label + ": solver";
  file.resolution.unit_bytes = unsigned_field(solver, "unit_bytes", solver_where);
  const json& exact = field(solver, "exact", solver_where);
  PQ_CHECK(exact.is_boolean(), "{}: \"exact\" must be true or false", solver_where);
  file.resolution.exact = exact.get<bool>();
  file.resolution.max_shortfall_bytes = unsigned_field(solver, "max_shortfall_bytes", solver_where);
  file.resolution.max_excess_dloss = number_field(solver, "max_excess_dloss", solver_where);
  file.resolution.free_items = unsigned_field(solver, "free_items", solver_where);

  const json& counts = field(j, "counts", label);
  PQ_CHECK(counts.is_object(), "{}: \"counts\" must be an object", label);
  std::map<std::string, FormatTally> listed_counts;
  for (const auto& [format, tally] : counts.items()) {
    const std::string where = fmt::format("{}: counts.{}", label, format);
    listed_counts[format] = {unsigned_field(tally, "linears", where),
                             unsigned_field(tally, "params", where),
                             unsigned_field(tally, "bytes", where)};
  }

  // Recompute the totals from the records, then demand the file agrees with itself.
  AllocationTotals& totals = file.totals;
  for (const auto& [format, tally] : listed_counts) totals.per_format[format] = {};
  const json& linears = field(j, "linears", label);
  PQ_CHECK(linears.is_array(), "{}: \"linears\" must be an array", label);
  std::set<std::string> names;
  for (const json& entry : linears) {
    AssignedLinear linear;
    linear.name = string_field(entry, "name", label + ": linear");
    const std::string where = fmt::format("{}: linear {}", label, linear.name);
    PQ_CHECK(names.insert(linear.name).second, "{}: listed twice", where);
    linear.group = string_field(entry, "group", where);
    linear.format = string_field(entry, "format", where);
    linear.params = unsigned_field(entry, "params", where);
    linear.bytes = unsigned_field(entry, "bytes", where);
    linear.predicted_dloss = number_field(entry, "predicted_dloss", where);
    const auto tally = totals.per_format.find(linear.format);
    PQ_CHECK(tally != totals.per_format.end(), "{}: format \"{}\" is missing from \"counts\"",
             where, linear.format);
    ++tally->second.linears;
    tally->second.params += linear.params;
    tally->second.bytes += linear.bytes;
    totals.quantizable_params += linear.params;
    totals.quantizable_bytes += linear.bytes;
    totals.predicted_dloss += linear.predicted_dloss;
    file.linears.push_back(std::move(linear));
  }
  PQ_CHECK(totals.per_format == listed_counts, "{}: \"counts\" disagree with the linears", label);

  const json& listed = field(j, "totals", label);
  const std::string totals_where = label + ": totals";
  PQ_CHECK(
      unsigned_field(listed, "quantizable_params", totals_where) == totals.quantizable_params &&
          unsigned_field(listed, "quantizable_bytes", totals_where) == totals.quantizable_bytes,
      "{}: quantizable params/bytes disagree with the linears", totals_where);
  PQ_CHECK(same_sum(number_field(listed, "predicted_dloss", totals_where), totals.predicted_dloss),
           "{}: \"predicted_dloss\" disagrees with the linears", totals_where);
  const std::uint64_t checkpoint_params = unsigned_field(listed, "checkpoint_params", totals_where);
  const std::uint64_t checkpoint_bytes = unsigned_field(listed, "checkpoint_bytes", totals_where);
  PQ_CHECK(checkpoint_params >= totals.quantizable_params &&
               checkpoint_bytes >= totals.quantizable_bytes,
           "{}: the checkpoint is smaller than its quantizable part", totals_where);
  finish_totals(totals, checkpoint_params - totals.quantizable_params,
                checkpoint_bytes - totals.quantizable_bytes);
  return file;
}

AssignmentFile read_assignment(const std::filesystem::path& path) {
  const std::filesystem::path file =
      std::filesystem::is_directory(path) ? path / "assignment.json" : path;
  return assignment_from_json(read_json_file(file), file.string());
}

void write_assignment(const std::filesystem::path& path, const AssignmentFile& file) {
  write_text_file_atomic(path, assignment_to_json(file).dump(1) + "\n");
}

}  // namespace pq::alloc
