#pragma once

#include <cstdint>

namespace pq::runtime {

// The short convolution of Gated DeltaNet (qwen3_5-architecture-facts.md §4.2 step 2): a causal
// depthwise conv1d followed by SiLU over x [T, channels] (row-major, one token per row),
//   y[t, c] = SiLU( sum_{j < K} weight[c * K + j] * x[t - (K - 1) + j, c] ),  x[t < 0, c] = 0,
// with weight as stored, [channels, 1, K]: tap K - 1 multiplies the current token. There is no
// bias (§4.1).
void causal_conv1d_silu_forward(const float* x, const float* weight, std::int64_t seq_len,
                                std::int64_t channels, std::int64_t kernel_size, float* y);

// dx [T, channels] (overwritten) given dy; recomputes the pre-activation from x. The weight's own
// gradient is not computed: conv1d weights are not quantized.
void causal_conv1d_silu_backward(const float* x, const float* weight, const float* dy,
                                 std::int64_t seq_len, std::int64_t channels,
                                 std::int64_t kernel_size, float* dx);

}  // namespace pq::runtime
