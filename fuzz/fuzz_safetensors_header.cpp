// libFuzzer target: any byte string as a whole safetensors file. The parser must either throw
// pq::Error or return a header whose tensors tile the data section exactly (checked here, abort
// otherwise); decoding every float tensor then reads exactly those bytes, so AddressSanitizer
// reports any offset the parser let through that points outside the input.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>
#include <vector>

#include "common/error.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::uint8_t> file(data, size);
  try {
    const auto header = pq::io::parse_safetensors_header(file, "fuzz.safetensors");
    std::uint64_t cursor = 0;
    for (const auto& tensor : header.tensors) {
      if (tensor.data_begin != cursor ||
          tensor.nbytes() !=
              static_cast<std::uint64_t>(tensor.numel()) * pq::io::dtype_size(tensor.dtype)) {
        std::abort();
      }
      cursor = tensor.data_end;
    }
    if (header.data_offset + cursor != size) std::abort();
    std::vector<float> values;
    for (const auto& tensor : header.tensors) {
      const auto bytes = file.subspan(header.data_offset + tensor.data_begin, tensor.nbytes());
      if (!pq::io::dtype_is_float(tensor.dtype)) continue;
      values.resize(static_cast<std::size_t>(tensor.numel()));
      pq::io::decode_to_f32(tensor.dtype, bytes, values);
    }
  } catch (const pq::Error&) {
    // Rejecting malformed input with a pq::Error is the expected outcome.
  }
  return 0;
}
