#include "alloc/cost_table.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

#include "common/error.h"
#include "common/file_util.h"
#include "common/json_reader.h"
#include "formats/weight_format.h"

namespace pq::alloc {

using nlohmann::json;

namespace {

const json& required(const json& object, const char* key, const std::string& where) {
  PQ_CHECK(object.is_object(), "{}: expected a JSON object", where);
  const auto it = object.find(key);
  PQ_CHECK(it != object.end(), "{}: missing \"{}\"", where, key);
  return *it;
}

std::uint64_t unsigned_field(const json& object, const char* key, const std::string& where) {
  const json& value = required(object, key, where);
  PQ_CHECK(
      value.is_number_unsigned() || (value.is_number_integer() && value.get<std::int64_t>() >= 0),
      "{}: \"{}\" must be a non-negative integer", where, key);
  return value.get<std::uint64_t>();
}

double error_column(const json& value, const char* key, const std::string& where) {
  PQ_CHECK(value.is_number(), "{}: \"{}\" must be a number", where, key);
  const double x = value.get<double>();
  // A negative or non-finite error is a bug in the cost stage; the knapsack would chase it.
  PQ_CHECK(std::isfinite(x) && x >= 0.0, "{}: \"{}\" must be finite and >= 0, got {}", where, key,
           x);
  return x;
}

std::optional<double> optional_error_column(const json& object, const char* key,
                                            const std::string& where) {
  const auto it = object.find(key);
  if (it == object.end() || it->is_null()) return std::nullopt;
  return error_column(*it, key, where);
}

FormatCost parse_format_cost(const json& j, const std::string& where) {
  FormatCost cost;
  cost.bytes = unsigned_field(j, "bytes", where);
  PQ_CHECK(cost.bytes > 0, "{}: \"bytes\" must be positive", where);
  cost.predicted_dloss =
      error_column(required(j, "predicted_dloss", where), "predicted_dloss", where);
  cost.weight_mse = optional_error_column(j, "weight_mse", where);
  cost.act_weighted_mse = optional_error_column(j, "act_weighted_mse", where);
  cost.output_mse = optional_error_column(j, "output_mse", where);
  return cost;
}

LinearCost parse_linear(const json& j, const CostTable& table, const std::string& where_file) {
  const json& name = required(j, "name", where_file + ": linear");
  PQ_CHECK(name.is_string() && !name.get<std::string>().empty(),
           "{}: a linear has a missing or empty \"name\"", where_file);
  LinearCost linear;
  linear.name = name.get<std::string>();
  const std::string where = fmt::format("{}: linear {}", where_file, linear.name);

  const json& shape = required(j, "shape", where);
  PQ_CHECK(shape.is_array() && shape.size() == 2, "{}: \"shape\" must be [out, in]", where);
  unsigned __int128 numel = 1;
  for (const json& dim : shape) {
    PQ_CHECK(dim.is_number_integer() && dim.get<std::int64_t>() > 0,
             "{}: \"shape\" entries must be positive integers", where);
    linear.shape.push_back(dim.get<std::int64_t>());
    numel *= static_cast<unsigned __int128>(dim.get<std::int64_t>());
  }
  linear.params = unsigned_field(j, "params", where);
  PQ_CHECK(numel == linear.params, "{}: \"params\" {} is not out*in = {}*{}", where, linear.params,
           linear.shape[0], linear.shape[1]);

  if (const auto group = j.find("group"); group != j.end() && !group->is_null()) {
    PQ_CHECK(group->is_string(), "{}: \"group\" must be a string", where);
    linear.group = group->get<std::string>();
  }

  const json& costs = required(j, "costs", where);
  PQ_CHECK(costs.is_object() && !costs.empty(), "{}: \"costs\" must be a non-empty object", where);
  linear.costs.resize(table.formats.size());
  for (const auto& [format, cost] : costs.items()) {
    const auto known = std::find(table.formats.begin(), table.formats.end(), format);
    PQ_CHECK(known != table.formats.end(), "{}: unknown format \"{}\" (\"formats\" lists: {})",
             where, format, fmt::join(table.formats, ", "));
    const auto f = static_cast<std::size_t>(known - table.formats.begin());
    linear.costs[f] = parse_format_cost(cost, fmt::format("{} format {}", where, format));
  }
  return linear;
}

json format_cost_to_json(const FormatCost& cost) {
  json j = {{"bytes", cost.bytes}, {"predicted_dloss", cost.predicted_dloss}};
  if (cost.weight_mse) j["weight_mse"] = *cost.weight_mse;
  if (cost.act_weighted_mse) j["act_weighted_mse"] = *cost.act_weighted_mse;
  if (cost.output_mse) j["output_mse"] = *cost.output_mse;
  return j;
}

// What is charged must be what ships: every format must be one the exporter can write (the
// formats registry), hold the Linear's shape, and cost exactly formats::WeightFormat::bytes().
void check_against_formats(const CostTable& table, const std::string& label) {
  for (std::size_t f = 0; f < table.formats.size(); ++f) {
    const std::string& name = table.formats[f];
    const auto& known = formats::all_formats();
    const auto it = std::find_if(known.begin(), known.end(),
                                 [&](const formats::WeightFormat* w) { return w->name() == name; });
    if (it == known.end()) {
      std::vector<std::string_view> names;
      for (const formats::WeightFormat* w : known) names.push_back(w->name());
      fail("{}: unknown format \"{}\"; the formats library has: {}", label, name,
           fmt::join(names, ", "));
    }
    for (const LinearCost& linear : table.linears) {
      if (!linear.costs[f]) continue;
      const formats::Shape2D shape{linear.shape[0], linear.shape[1]};
      if (const auto reason = (*it)->rejects(shape)) {
        fail("{}: linear {} cannot take {}: {}", label, linear.name, name, *reason);
      }
      const std::uint64_t exact = (*it)->bytes(shape);
      PQ_CHECK(linear.costs[f]->bytes == exact,
               "{}: linear {} format {}: \"bytes\" {} differs from the format's exact size {}",
               label, linear.name, name, linear.costs[f]->bytes, exact);
    }
  }
}

}  // namespace

std::uint64_t CostTable::quantizable_params() const {
  std::uint64_t total = 0;
  for (const LinearCost& linear : linears) total += linear.params;
  return total;
}

std::size_t CostTable::format_index(std::string_view name) const {
  for (std::size_t f = 0; f < formats.size(); ++f) {
    if (formats[f] == name) return f;
  }
  fail("unknown format \"{}\"; the cost table has: {}", name, fmt::join(formats, ", "));
}

CostTable cost_table_from_json(const json& j, const std::string& label) {
  PQ_CHECK(j.is_object(), "{}: expected a JSON object", label);
  const json& schema = required(j, "schema", label);
  PQ_CHECK(schema.is_string() && schema.get<std::string>() == kCostSchema,
           "{}: \"schema\" must be \"{}\"", label, kCostSchema);

  CostTable table;
  const json& model = required(j, "model", label);
  PQ_CHECK(model.is_string(), "{}: \"model\" must be a string", label);
  table.model = model.get<std::string>();

  const json& formats = required(j, "formats", label);
  PQ_CHECK(formats.is_array() && !formats.empty(), "{}: \"formats\" must be a non-empty array",
           label);
  std::set<std::string> seen_formats;
  for (const json& format : formats) {
    PQ_CHECK(format.is_string() && !format.get<std::string>().empty(),
             "{}: \"formats\" entries must be non-empty strings", label);
    PQ_CHECK(seen_formats.insert(format.get<std::string>()).second,
             "{}: format \"{}\" listed twice", label, format.get<std::string>());
    table.formats.push_back(format.get<std::string>());
  }

  if (j.contains("meta") && j["meta"].is_object() && j["meta"].contains("serve_on")) {
    const json& serve_on = j["meta"]["serve_on"];
    PQ_CHECK(serve_on.is_string(), "{}: \"meta.serve_on\" must be a string", label);
    table.serve_on = serve_on.get<std::string>();
  }

  const json& passthrough = required(j, "passthrough", label);
  table.passthrough_params = unsigned_field(passthrough, "params", label + ": passthrough");
  table.passthrough_bytes = unsigned_field(passthrough, "bytes", label + ": passthrough");

  const json& linears = required(j, "linears", label);
  PQ_CHECK(linears.is_array() && !linears.empty(), "{}: \"linears\" must be a non-empty array",
           label);
  std::set<std::string> seen_names;
  for (const json& entry : linears) {
    LinearCost linear = parse_linear(entry, table, label);
    PQ_CHECK(seen_names.insert(linear.name).second, "{}: linear {} listed twice", label,
             linear.name);
    table.linears.push_back(std::move(linear));
  }
  check_against_formats(table, label);
  return table;
}

json cost_table_to_json(const CostTable& table) {
  json linears = json::array();
  for (const LinearCost& linear : table.linears) {
    json costs = json::object();
    for (std::size_t f = 0; f < table.formats.size(); ++f) {
      if (linear.costs[f]) costs[table.formats[f]] = format_cost_to_json(*linear.costs[f]);
    }
    linears.push_back({{"name", linear.name},
                       {"shape", linear.shape},
                       {"group", linear.group},
                       {"params", linear.params},
                       {"costs", std::move(costs)}});
  }
  return {
      {"schema", kCostSchema},
      {"model", table.model},
      {"formats", table.formats},
      {"passthrough", {{"params", table.passthrough_params}, {"bytes", table.passthrough_bytes}}},
      {"linears", std::move(linears)}};
}

CostTable read_cost_table(const std::filesystem::path& path) {
  const std::filesystem::path file =
      std::filesystem::is_directory(path) ? path / "cost.json" : path;
  return cost_table_from_json(read_json_file(file), file.string());
}

void write_cost_table(const std::filesystem::path& path, const CostTable& table) {
  write_text_file_atomic(path, cost_table_to_json(table).dump(1) + "\n");
}

}  // namespace pq::alloc
