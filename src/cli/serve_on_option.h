#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "formats/serving.h"

namespace pq::cli {

// --serve-on blackwell|hopper|ada|ampere: the GPU generation stock vLLM serves the checkpoint on
// (formats/serving.h); parsed into `target` before the command's callback runs.
inline void add_serve_on_option(CLI::App* cmd, formats::ServingTarget& target) {
  cmd->add_option_function<std::string>(
      "--serve-on",
      [&target](const std::string& name) { target = formats::parse_serving_target(name); },
      "GPU generation vLLM serves the checkpoint on: blackwell (sm100/sm120), hopper (sm90), ada "
      "(sm89) or ampere (sm80/86); only formats vLLM loads there for each kind of layer are "
      "offered (default " +
          std::string(formats::serving_target_name(target)) + ")");
}

}  // namespace pq::cli
