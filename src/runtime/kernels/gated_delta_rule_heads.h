#pragma once

// Internal to the gated_delta_rule*.cpp files: shape checks and where one value head's rows live.

#include <cstdint>

#include "common/error.h"
#include "runtime/kernels/gated_delta_rule.h"

namespace pq::runtime::gated_delta {

inline void check_shape(const char* what, const GatedDeltaShape& s) {
  PQ_CHECK(s.seq_len >= 0 && s.num_key_heads > 0 && s.num_value_heads > 0 && s.key_dim > 0 &&
               s.value_dim > 0 && s.num_value_heads % s.num_key_heads == 0,
           "{}: invalid shape T={} Hk={} Hv={} dk={} dv={}", what, s.seq_len, s.num_key_heads,
           s.num_value_heads, s.key_dim, s.value_dim);
}

// The rows of value head h in the [T, heads * dim] inputs: row t of q is q + t * qk_stride, and
// so on; g and beta hold one value per row.
struct HeadRows {
  const float* q;
  const float* k;
  const float* v;
  const float* g;
  const float* beta;
  const float* initial_state;  // [dk, dv] or nullptr
  std::int64_t key_head;
  std::int64_t qk_stride, v_stride, gate_stride;

  HeadRows(const GatedDeltaShape& s, const GatedDeltaInputs& in, std::int64_t h)
      : key_head(h / (s.num_value_heads / s.num_key_heads)),
        qk_stride(s.num_key_heads * s.key_dim),
        v_stride(s.num_value_heads * s.value_dim),
        gate_stride(s.num_value_heads) {
    q = in.q + key_head * s.key_dim;
    k = in.k + key_head * s.key_dim;
    v = in.v + h * s.value_dim;
    g = in.g + h;
    beta = in.beta + h;
    initial_state =
        in.initial_state == nullptr ? nullptr : in.initial_state + h * s.key_dim * s.value_dim;
  }
};

}  // namespace pq::runtime::gated_delta
