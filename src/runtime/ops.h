#pragma once

#include <cstdint>

namespace pq::runtime {

// Elementwise and row-wise operations of the decoder with their hand-written gradients. All
// tensors are row-major float32; loops over rows run in parallel with OpenMP.

// Loops touching fewer elements than this run on one thread: below it, waking the OpenMP team
// costs more than the work (and far more on an oversubscribed machine).
inline constexpr std::int64_t kParallelElements = 1 << 16;

// RMSNorm as Hugging Face computes it (LlamaRMSNorm): y = x * rsqrt(mean(x^2) + eps) * weight,
// in float32. Normalizes each `width`-wide row of x [rows, width]; saves 1/rms per row in rstd.
void rms_norm_forward(const float* x, const float* weight, std::int64_t rows, std::int64_t width,
                      float eps, float* y, float* rstd);
// dx = rstd * (w*dy - x_hat * mean(x_hat * w*dy)), x_hat = x * rstd. Overwrites dx if
// `accumulate` is false, else adds to it. (The norm weights are not quantized, so their own
// gradient is not needed.)
void rms_norm_backward(const float* x, const float* weight, const float* rstd, const float* dy,
                       std::int64_t rows, std::int64_t width, float* dx, bool accumulate);

// SwiGLU: act = silu(gate) * up, silu(g) = g / (1 + exp(-g)) (transformers ACT2FN["silu"]).
void swiglu_forward(const float* gate, const float* up, std::int64_t n, float* act);
// From d(act): dgate = dact * up * silu'(gate), dup = dact * silu(gate).
void swiglu_backward(const float* gate, const float* up, const float* dact, std::int64_t n,
                     float* dgate, float* dup);

// GeGLU with the tanh-approximated GELU (transformers ACT2FN["gelu_pytorch_tanh"], Gemma 4's
// hidden_activation; gemma4-architecture-facts.md §5): act = gelu(gate) * up,
// gelu(g) = g/2 (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))).
void geglu_forward(const float* gate, const float* up, std::int64_t n, float* act);
// From d(act): dgate = dact * up * gelu'(gate), dup = dact * gelu(gate).
void geglu_backward(const float* gate, const float* up, const float* dact, std::int64_t n,
                    float* dgate, float* dup);

// y[r, :] += bias for every row.
void add_bias(float* y, const float* bias, std::int64_t rows, std::int64_t width);
// y += x elementwise.
void add_inplace(float* y, const float* x, std::int64_t n);

// Summed next-token cross-entropy of one block of logits [rows, vocab]: row r is scored against
// target[r] with weight weights[r] (targets < 0 are skipped). Overwrites logits with
// dLoss/dlogits = weight * (softmax - onehot) and returns the weighted loss, accumulated in
// double.
double cross_entropy_forward_backward(float* logits, const std::int32_t* targets,
                                      const float* weights, std::int64_t rows, std::int64_t vocab);

}  // namespace pq::runtime
