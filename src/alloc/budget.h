#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace pq::alloc {

// A bits-per-parameter target as the user wrote it ("4.75"), kept exactly so that the byte
// budget floor(bits * params / 8) is computed without binary rounding (4.6 is not a double).
struct BitsTarget {
  std::string text;
  double value = 0.0;          // for reports only
  std::uint64_t mantissa = 0;  // value = mantissa / 10^decimals
  unsigned decimals = 0;

  // floor(value * params / 8): the byte budget of the quantizable Linears.
  std::uint64_t budget_bytes(std::uint64_t params) const;
};

// Parses a plain decimal ("4.75", "5", "8.25"); pq::Error on anything else.
BitsTarget parse_bits_target(std::string_view text);
// Parses a comma-separated list of targets ("4.5,4.75,5").
std::vector<BitsTarget> parse_bits_targets(std::string_view list);

// Parses a size with an optional unit: B, KB/MB/GB/TB (powers of 1000) or KiB/MiB/GiB/TiB
// (powers of 1024), case-insensitive, decimals allowed ("1.5GiB"); rounds down to whole bytes.
std::uint64_t parse_byte_size(std::string_view text);

}  // namespace pq::alloc
