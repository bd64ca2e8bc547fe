#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "io/safetensors.h"

namespace pq::io {

// Block-scaled FP8 source weights (DeepSeek-V3, MiniMax-M2: minimax_m2-architecture-facts.md §6):
// an F8_E4M3 weight [N, K] with "<weight>_scale_inv" [ceil(N/128), ceil(K/128)] (F32, or BF16)
// beside it. The stored scale is the multiplier despite its name: W[i, j] = e4m3(weight[i, j]) x
// scale_inv[i / 128, j / 128]; edge blocks may be partial.
inline constexpr std::int64_t kFp8BlockSize = 128;

// "<weight>_scale_inv", the name of a block-scaled FP8 weight's scale tensor.
std::string fp8_block_scale_name(std::string_view weight);

// Whether tensor `name` of `checkpoint` is a block-scaled FP8 weight (F8_E4M3 with its scale).
bool is_fp8_block_weight(const Checkpoint& checkpoint, std::string_view name);

// Rows `rows` of a floating-point tensor seen as [product of the leading dims, last dim], decoded
// to float32, [rows.size(), columns]; a block-scaled FP8 weight is dequantized (the product of the
// E4M3 value and its block's scale, rounded once to float32). Throws pq::Error naming the tensor
// for a non-float tensor, a row out of range, an F8_E4M3 tensor without its scale, or a scale of
// the wrong shape or dtype.
std::vector<float> decode_weight_rows(const Checkpoint& checkpoint, std::string_view name,
                                      std::span<const std::int64_t> rows);

// The whole tensor, as decode_weight_rows.
std::vector<float> decode_weight(const Checkpoint& checkpoint, std::string_view name);

}  // namespace pq::io
