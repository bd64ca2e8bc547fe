#pragma once

#include <cstdint>

namespace pq::runtime {

// Causal self-attention of one sequence with grouped-query heads: query head h reads kv head
// h / (num_heads / num_kv_heads). With sliding_window = W > 0, query i sees keys j with
// i - W < j <= i (the convention of transformers' sliding_window_causal mask).
struct AttentionShape {
  std::int64_t seq_len;
  std::int64_t num_heads;
  std::int64_t num_kv_heads;
  std::int64_t head_dim;
  float scale;                      // multiplies q.k before the softmax, usually 1/sqrt(head_dim)
  std::int64_t sliding_window = 0;  // 0 = none
};

// q [T, H*D], k and v [T, Hkv*D], out [T, H*D], all row-major as the projections produce them;
// lse [H, T] receives the log-sum-exp of each (scaled) softmax row, which the backward reuses.
// Tiled (flash-attention style): scratch memory is O(tile * (tile + D)) per thread, never O(T^2).
void causal_attention_forward(const AttentionShape& shape, const float* q, const float* k,
                              const float* v, float* out, float* lse);

// Gradients for the forward above, given its out and lse. dq has q's layout, dk and dv have k's;
// dk and dv are summed over the query heads sharing each kv head. All three are overwritten.
void causal_attention_backward(const AttentionShape& shape, const float* q, const float* k,
                               const float* v, const float* out, const float* lse,
                               const float* dout, float* dq, float* dk, float* dv);

}  // namespace pq::runtime
