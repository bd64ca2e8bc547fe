#pragma once

#include <cstdint>
#include <span>
#include <string>

namespace pq::test {

// SHA-256 (FIPS 180-4) of `bytes` as 64 lowercase hex digits: the tests compare exported tensors
// with digests the fixtures took of the source checkpoint's bytes.
std::string sha256_hex(std::span<const std::uint8_t> bytes);

}  // namespace pq::test
