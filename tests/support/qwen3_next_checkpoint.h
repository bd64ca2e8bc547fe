#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "io/safetensors.h"

namespace pq::test {

// The BF16/F32 bytes of rows [begin, end) of a 2-D tensor, or of matrix `index` of a 3-D one.
std::vector<std::uint8_t> rows_of(const io::Checkpoint& checkpoint, const std::string& name,
                                  std::int64_t begin, std::int64_t end, std::int64_t index = 0);

// Writes `dir` as a Qwen3NextForCausalLM checkpoint holding the text model and MTP head of the
// shared Qwen3.5 checkpoint `source_model` in Qwen3-Next's layout (flat config, "model." prefix,
// experts one tensor each, GDN projections fused and interleaved per key-head group:
// qwen3_5-architecture-facts.md §4.1, §6.3; a dense source's layers all in mlp_only_layers).
void write_qwen3_next(const std::filesystem::path& dir,
                      const std::string& source_model = "qwen3_5-moe-tiny-random");

}  // namespace pq::test
