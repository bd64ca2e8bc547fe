#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "runtime/model.h"

namespace pq::cli {

// --compute f32|bf16: what the runtime's GEMMs multiply (runtime::ComputeType); parsed into
// `compute` before the command's callback runs, whose default it keeps when not given.
inline void add_compute_option(CLI::App* cmd, runtime::ComputeType& compute,
                               const std::string& what) {
  cmd->add_option_function<std::string>(
      "--compute",
      [&compute](const std::string& name) { compute = runtime::parse_compute_type(name); },
      what + " (default " + std::string(runtime::compute_type_name(compute)) + ")");
}

}  // namespace pq::cli
