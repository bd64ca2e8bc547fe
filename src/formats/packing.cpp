#include "formats/packing.h"

#include "common/error.h"

namespace pq::formats {

void pack_fp4(std::span<const std::uint8_t> codes, std::span<std::uint8_t> packed) {
  PQ_CHECK(codes.size() == 2 * packed.size(), "pack_fp4: {} codes into {} bytes", codes.size(),
           packed.size());
  for (std::size_t j = 0; j < packed.size(); ++j) {
    packed[j] = static_cast<std::uint8_t>((codes[2 * j] & 0xF) | (codes[2 * j + 1] << 4));
  }
}

void unpack_fp4(std::span<const std::uint8_t> packed, std::span<std::uint8_t> codes) {
  PQ_CHECK(codes.size() == 2 * packed.size(), "unpack_fp4: {} bytes into {} codes", packed.size(),
           codes.size());
  for (std::size_t j = 0; j < packed.size(); ++j) {
    codes[2 * j] = packed[j] & 0xF;
    codes[2 * j + 1] = packed[j] >> 4;
  }
}

void pack_fp6(std::span<const std::uint8_t> codes, std::span<std::uint8_t> packed) {
  PQ_CHECK(codes.size() % 4 == 0 && codes.size() / 4 * 3 == packed.size(),
           "pack_fp6: {} codes into {} bytes", codes.size(), packed.size());
  for (std::size_t q = 0; q < codes.size() / 4; ++q) {
    std::uint32_t word = 0;
    for (int i = 0; i < 4; ++i)
      word |= static_cast<std::uint32_t>(codes[4 * q + i] & 0x3F) << (6 * i);
    for (int b = 0; b < 3; ++b) packed[3 * q + b] = static_cast<std::uint8_t>(word >> (8 * b));
  }
}

void unpack_fp6(std::span<const std::uint8_t> packed, std::span<std::uint8_t> codes) {
  PQ_CHECK(codes.size() % 4 == 0 && codes.size() / 4 * 3 == packed.size(),
           "unpack_fp6: {} bytes into {} codes", packed.size(), codes.size());
  for (std::size_t q = 0; q < codes.size() / 4; ++q) {
    std::uint32_t word = 0;
    for (int b = 0; b < 3; ++b) word |= static_cast<std::uint32_t>(packed[3 * q + b]) << (8 * b);
    for (int i = 0; i < 4; ++i)
      codes[4 * q + i] = static_cast<std::uint8_t>((word >> (6 * i)) & 0x3F);
  }
}

void pack_int32(std::span<const std::uint8_t> codes, int bits, std::span<std::uint8_t> packed) {
  PQ_CHECK(bits > 0 && 32 % bits == 0, "pack_int32: {} bits do not divide 32", bits);
  const std::size_t per_word = 32 / bits;
  PQ_CHECK(codes.size() % per_word == 0 && codes.size() / per_word * 4 == packed.size(),
           "pack_int32: {} codes of {} bits into {} bytes", codes.size(), bits, packed.size());
  const std::uint32_t mask = (1u << bits) - 1;
  for (std::size_t w = 0; w < codes.size() / per_word; ++w) {
    std::uint32_t word = 0;
    for (std::size_t i = 0; i < per_word; ++i) {
      word |= (codes[w * per_word + i] & mask) << (i * bits);
    }
    for (int b = 0; b < 4; ++b) packed[4 * w + b] = static_cast<std::uint8_t>(word >> (8 * b));
  }
}

void unpack_int32(std::span<const std::uint8_t> packed, int bits, std::span<std::uint8_t> codes) {
  PQ_CHECK(bits > 0 && 32 % bits == 0, "unpack_int32: {} bits do not divide 32", bits);
  const std::size_t per_word = 32 / bits;
  PQ_CHECK(codes.size() % per_word == 0 && codes.size() / per_word * 4 == packed.size(),
           "unpack_int32: {} bytes into {} codes of {} bits", packed.size(), codes.size(), bits);
  const std::uint32_t mask = (1u << bits) - 1;
  for (std::size_t w = 0; w < codes.size() / per_word; ++w) {
    std::uint32_t word = 0;
    for (int b = 0; b < 4; ++b) word |= static_cast<std::uint32_t>(packed[4 * w + b]) << (8 * b);
    for (std::size_t i = 0; i < per_word; ++i) {
      codes[w * per_word + i] = static_cast<std::uint8_t>((word >> (i * bits)) & mask);
    }
  }
}

}  // namespace pq::formats
