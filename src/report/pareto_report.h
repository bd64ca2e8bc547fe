#pragma once

#include <filesystem>
#include <string>

#include "alloc/pareto.h"

namespace pq::report {

// pareto.csv: one row per target (ascending), columns
//   target_bits, feasible, budget_bytes, achieved_bits, checkpoint_bits, quantizable_bytes,
//   checkpoint_bytes, predicted_dloss, knee, linears_<FORMAT>..., params_<FORMAT>...
// Infeasible targets have feasible=0 and empty measurement fields.
std::string pareto_csv(const alloc::ParetoSweep& sweep);

// pareto.svg: predicted dL against achieved bits per quantizable parameter, each point labelled
// with its target, the knee marked, and a table of the formats chosen at every target.
std::string pareto_svg(const alloc::ParetoSweep& sweep);

// Writes pareto.csv and pareto.svg into `directory`, each atomically.
void write_pareto_report(const std::filesystem::path& directory, const alloc::ParetoSweep& sweep);

}  // namespace pq::report
