// libFuzzer target: any byte string as the text of model.safetensors.index.json. The parser must
// either throw pq::Error or return a non-empty weight map of plain file names (checked here, abort
// otherwise).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "common/error.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    const auto index = pq::io::parse_safetensors_index(text, "fuzz.index.json");
    if (index.weight_map.empty()) std::abort();
    for (const auto& [tensor, shard] : index.weight_map) {
      // A shard name that could leave the checkpoint directory, or break a one-line error
      // message, must never get through.
      if (shard.empty() || shard == "." || shard == ".." || shard.find('/') != std::string::npos) {
        std::abort();
      }
      for (const char c : shard) {
        if (static_cast<unsigned char>(c) < 0x20) std::abort();
      }
    }
  } catch (const pq::Error&) {
    // Rejecting malformed input with a pq::Error is the expected outcome.
  }
  return 0;
}
