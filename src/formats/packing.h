#pragma once

#include <cstdint>
#include <span>

namespace pq::formats {

// FP4 codes two per byte along each row, even column in the LOW nibble:
// byte[j] = code[2j] | code[2j+1] << 4 (compressed-tensors compressors/nvfp4/helpers.py
// pack_fp4_to_uint8 / unpack_fp4_from_uint8; same order in modelopt qtensor/nvfp4_tensor.py).
// Rows are independent because every supported row length is even.
void pack_fp4(std::span<const std::uint8_t> codes, std::span<std::uint8_t> packed);
void unpack_fp4(std::span<const std::uint8_t> packed, std::span<std::uint8_t> codes);

// FP6 codes four per three bytes, LSB first: the 24-bit little-endian word
// c0 | c1 << 6 | c2 << 12 | c3 << 18. Our own research layout (MXFP6 has no compressed-tensors
// format; format-facts.md A.0), used only to account and round-trip MXFP6 exactly.
void pack_fp6(std::span<const std::uint8_t> codes, std::span<std::uint8_t> packed);
void unpack_fp6(std::span<const std::uint8_t> packed, std::span<std::uint8_t> codes);

// compressed-tensors pack-quantized (compressors/pack_quantized/helpers.py pack_to_int32):
// offset-binary `bits`-bit codes (bits divides 32), 32/bits per int32, element i of a word in
// bits [i*bits, (i+1)*bits), words little-endian. Rows of `cols` codes give cols*bits/32 words.
void pack_int32(std::span<const std::uint8_t> codes, int bits, std::span<std::uint8_t> packed);
void unpack_int32(std::span<const std::uint8_t> packed, int bits, std::span<std::uint8_t> codes);

}  // namespace pq::formats
