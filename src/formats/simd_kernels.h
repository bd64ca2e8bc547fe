#pragma once

// SIMD kernels of the formats library, compiled with ISA flags: the AVX-512 (F, BW, VL, DQ) ones in
// formats_avx512.cpp, to call only after cpu_features().has_avx512_core(), and the AVX2 ones in
// formats_avx2.cpp, to call only after cpu_features().has_avx2_fma(). Each produces exactly the
// bits of its scalar counterpart in element.cpp / group_codec.cpp.

#include <cstdint>
#include <span>

#include "formats/element.h"
#include "formats/group_codec.h"

namespace pq::formats::simd {

void encode_elements_avx512(ElementType type, std::span<const float> values,
                            std::span<std::uint8_t> codes);
void decode_elements_avx512(ElementType type, std::span<const std::uint8_t> codes,
                            std::span<float> values);
void encode_elements16_avx512(ElementType type, std::span<const float> values,
                              std::span<std::uint16_t> codes);
void decode_elements16_avx512(ElementType type, std::span<const std::uint16_t> codes,
                              std::span<float> values);

std::uint32_t max_abs_bits_avx512(std::span<const float> x);

// One row of quantize_rows: `scales` holds the row's groups.
void quantize_row_avx512(const GroupCodec& codec, const float* x, std::int64_t cols,
                         std::int64_t group_size, bool scales_given, GroupScale* scales,
                         std::uint8_t* codes, float* dequantized);
void dequantize_row_avx512(const GroupCodec& codec, const std::uint8_t* codes,
                           const GroupScale* scales, std::int64_t cols, std::int64_t group_size,
                           float* out);

// The same kernels 8 lanes wide, for AVX2 CPUs without AVX-512.
void encode_elements_avx2(ElementType type, std::span<const float> values,
                          std::span<std::uint8_t> codes);
void decode_elements_avx2(ElementType type, std::span<const std::uint8_t> codes,
                          std::span<float> values);
void encode_elements16_avx2(ElementType type, std::span<const float> values,
                            std::span<std::uint16_t> codes);
void decode_elements16_avx2(ElementType type, std::span<const std::uint16_t> codes,
                            std::span<float> values);

std::uint32_t max_abs_bits_avx2(std::span<const float> x);

void quantize_row_avx2(const GroupCodec& codec, const float* x, std::int64_t cols,
                       std::int64_t group_size, bool scales_given, GroupScale* scales,
                       std::uint8_t* codes, float* dequantized);
void dequantize_row_avx2(const GroupCodec& codec, const std::uint8_t* codes,
                         const GroupScale* scales, std::int64_t cols, std::int64_t group_size,
                         float* out);
// quantize_with_steps: n values, each against its own step. AVX-512 CPUs take this one too.
void quantize_with_steps_avx2(const GroupCodec& codec, const float* x, const float* steps,
                              std::int64_t n, std::uint8_t* codes, float* dequantized);

}  // namespace pq::formats::simd
