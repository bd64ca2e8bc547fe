#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "common/error.h"

namespace pq::cli {

// --kv-cache none|fp8: whether the checkpoint is made for vLLM's FP8 key/value cache
// (`vllm serve --kv-cache-dtype fp8`) with calibrated per-layer scales (docs/export.md); parsed
// into `fp8` before the command's callback runs. The default, none, is the bf16 cache.
inline void add_kv_cache_option(CLI::App* cmd, bool& fp8, const std::string& what) {
  cmd->add_option_function<std::string>(
      "--kv-cache",
      [&fp8](const std::string& name) {
        PQ_CHECK(name == "none" || name == "fp8", "unknown --kv-cache '{}' (known: none, fp8)",
                 name);
        fp8 = name == "fp8";
      },
      "KV cache the checkpoint is served with: none (bf16, default) or fp8 (" + what + ")");
}

}  // namespace pq::cli
