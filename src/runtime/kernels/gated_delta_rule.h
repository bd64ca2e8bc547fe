#pragma once

#include <cstdint>

namespace pq::runtime {

// The Gated DeltaNet core of Qwen3.5/3.6 and Qwen3-Next "linear_attention" layers
// (qwen3_5-architecture-facts.md §4.2 step 8), for one sequence and every head: per value head h,
// with a state S [dk, dv] in fp32,
//   S~_t = exp(g_t) S_{t-1},  p_t = S~_t^T k_t,  u_t = beta_t (v_t - p_t),
//   S_t = S~_t + k_t u_t^T,   o_t = S_t^T q_t.
// Value head h reads key head h / (Hv / Hk) (§4.2 step 6); the backward sums the q and k
// gradients of the value heads sharing a key head. Packed documents are separate calls: each
// starts from its own state (§4.5).
//
// q and k are taken as the core uses them: L2-normalised, and q also scaled by dk^-1/2 (§4.2
// step 7). The caller runs l2_normalize_forward (gated_delta_net_norms.h) before and
// l2_normalize_backward after, which keeps this backward to the recurrence alone (§4.6).
struct GatedDeltaShape {
  std::int64_t seq_len;
  std::int64_t num_key_heads;    // Hk, linear_num_key_heads
  std::int64_t num_value_heads;  // Hv, linear_num_value_heads: a multiple of Hk
  std::int64_t key_dim;          // dk, linear_key_head_dim
  std::int64_t value_dim;        // dv, linear_value_head_dim
};

// Row-major, heads side by side within a row, as the projections produce them.
struct GatedDeltaInputs {
  const float* q;     // [T, Hk * dk], normalised and scaled
  const float* k;     // [T, Hk * dk], normalised
  const float* v;     // [T, Hv * dv]
  const float* g;     // [T, Hv]: log decay, -exp(A_log) * softplus(a + dt_bias) <= 0
  const float* beta;  // [T, Hv]: sigmoid(b)
  const float* initial_state = nullptr;  // [Hv, dk, dv]; nullptr is a zero state
};

// Gradients of the inputs above, all overwritten. d_initial_state may be nullptr when the
// initial state's gradient is not wanted.
struct GatedDeltaGradients {
  float* dq;                         // [T, Hk * dk]
  float* dk;                         // [T, Hk * dk]
  float* dv;                         // [T, Hv * dv]
  float* dg;                         // [T, Hv]
  float* dbeta;                      // [T, Hv]
  float* d_initial_state = nullptr;  // [Hv, dk, dv]
};

// out [T, Hv * dv]; final_state [Hv, dk, dv] receives S_T unless it is nullptr.
//
// Chunked form (§4.3): per chunk of 64 tokens the work is a handful of [64 x 64], [64 x d] and
// [d x d] products through gemm_f32; only the state hand-over between chunks is sequential.
// Parallel over value heads. Scratch memory is O(64 * (dk + dv) + dk * dv) per thread.
void gated_delta_rule_forward(const GatedDeltaShape& shape, const GatedDeltaInputs& in, float* out,
                              float* final_state);

// Gradients of the forward above, given dout [T, Hv * dv] and d_final_state [Hv, dk, dv]
// (nullptr when S_T is not used downstream). Recomputes the forward's chunk states and keeps them
// with each chunk's state-independent quantities: about (T / 64) dk dv + T (dk + dv + 256)
// floats of scratch per thread. Value heads add into their key head's dq and dk in the order they
// finish, so with three or more per key head the sums may differ between runs by rounding.
void gated_delta_rule_backward(const GatedDeltaShape& shape, const GatedDeltaInputs& in,
                               const float* dout, const float* d_final_state,
                               const GatedDeltaGradients& grads);

// Token-by-token reference implementations of the same two functions: the §4.2 recurrence and the
// §4.6 backward, written as plain loops. The backward keeps S every 64 tokens and recomputes the
// states in between. For tests and for decoding a few tokens.
void gated_delta_rule_forward_recurrent(const GatedDeltaShape& shape, const GatedDeltaInputs& in,
                                        float* out, float* final_state);
void gated_delta_rule_backward_recurrent(const GatedDeltaShape& shape, const GatedDeltaInputs& in,
                                         const float* dout, const float* d_final_state,
                                         const GatedDeltaGradients& grads);

}  // namespace pq::runtime
