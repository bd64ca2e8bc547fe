#pragma once

#include <cstdlib>
#include <filesystem>
#include <string>

#include "alloc/assignment.h"
#include "alloc/cost_table.h"
#include "formats/weight_format.h"
#include "model/model_spec.h"

namespace pq::bench {

// ../shared/models/<name>: $PQ_SHARED_DIR when set, else the shared folder CMake found
// (PQ_BENCH_SHARED_DIR, defined for the benchmarks that read shared models).
inline std::filesystem::path shared_model(const std::string& name) {
  const char* env = std::getenv("PQ_SHARED_DIR");
  return std::filesystem::path(env != nullptr ? env : PQ_BENCH_SHARED_DIR) / "models" / name;
}

// Writes to `path` an assignment.json giving every candidate Linear of the model in `model_dir`
// the one `format`, built through the alloc library as the allocate stage would.
inline void write_uniform_assignment(const std::filesystem::path& model_dir,
                                     const std::string& format, const std::filesystem::path& path) {
  const model::ModelSpec spec = model::load_model_spec(model_dir);
  const formats::WeightFormat& f = formats::format_by_name(format);
  alloc::CostTable table;
  table.model = model_dir.filename().string();
  table.formats = {format};
  alloc::Allocation allocation;
  for (const model::Linear& linear : spec.linears) {
    if (!linear.is_candidate) continue;
    const formats::Shape2D shape{linear.out_features, linear.in_features};
    table.linears.push_back({linear.name,
                             {shape.out, shape.in},
                             linear.group.value_or(""),
                             static_cast<std::uint64_t>(shape.numel()),
                             {alloc::FormatCost{f.bytes(shape), 0.0, {}, {}, {}}}});
    allocation.format_of_linear.push_back(0);
    allocation.bytes += f.bytes(shape);
  }
  allocation.budget_bytes = allocation.bytes;
  alloc::write_assignment(path, alloc::make_assignment_file(
                                    table, allocation, {"bits_per_param", "16", allocation.bytes}));
}

}  // namespace pq::bench
