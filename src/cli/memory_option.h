#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <memory>
#include <string>

#include "alloc/budget.h"

namespace pq::cli {

// --max-memory SIZE ("10GiB", "12GB"): the peak memory a run may use; parsed into `bytes` before
// the command's callback runs (0 when not given: the stage's default, 80% of available memory).
inline void add_max_memory_option(CLI::App* cmd, std::int64_t& bytes) {
  cmd->add_option_function<std::string>(
      "--max-memory",
      [&bytes](const std::string& size) {
        bytes = static_cast<std::int64_t>(alloc::parse_byte_size(size));
      },
      "Peak memory the run may use (e.g. 10GiB; default 80% of available memory); it refuses "
      "to start, with its estimate, when it cannot fit");
}

}  // namespace pq::cli
