// Token-by-token reference of the Gated DeltaNet core: qwen3_5-architecture-facts.md §4.2 step 8
// (forward) and §4.6 (backward), as plain loops over the state S [dk, dv] (row i: key dimension i).
#include <algorithm>
#include <cmath>
#include <vector>

#include "runtime/kernels/gated_delta_rule.h"
#include "runtime/kernels/gated_delta_rule_heads.h"

namespace pq::runtime {
namespace {

using gated_delta::HeadRows;

// The backward keeps the state every kSegment tokens and recomputes the states in between.
constexpr std::int64_t kSegment = 64;

struct Dims {
  std::int64_t dk, dv;
};

std::vector<float> initial_state(const HeadRows& r, Dims d) {
  if (r.initial_state == nullptr) return std::vector<float>(d.dk * d.dv, 0.0f);
  return {r.initial_state, r.initial_state + d.dk * d.dv};
}

// The read of token t: decayed = S~_t = exp(g_t) S_{t-1} (from `previous`, which it may alias),
// p = S~_t^T k_t and u = u_t = beta_t (v_t - p).
void read(const HeadRows& r, Dims d, std::int64_t t, const float* previous, float* decayed,
          float* p, float* u) {
  const float decay = std::exp(r.g[t * r.gate_stride]);
  const float beta = r.beta[t * r.gate_stride];
  const float* k = r.k + t * r.qk_stride;
  const float* v = r.v + t * r.v_stride;
  for (std::int64_t i = 0; i < d.dk * d.dv; ++i) decayed[i] = decay * previous[i];
  std::fill_n(p, d.dv, 0.0f);
  for (std::int64_t i = 0; i < d.dk; ++i)
    for (std::int64_t j = 0; j < d.dv; ++j) p[j] += decayed[i * d.dv + j] * k[i];
  for (std::int64_t j = 0; j < d.dv; ++j) u[j] = beta * (v[j] - p[j]);
}

// The write of token t: next = S_t = S~_t + k_t u_t^T (`next` may alias `decayed`).
void write(const HeadRows& r, Dims d, std::int64_t t, const float* decayed, const float* u,
           float* next) {
  const float* k = r.k + t * r.qk_stride;
  for (std::int64_t i = 0; i < d.dk; ++i)
    for (std::int64_t j = 0; j < d.dv; ++j)
      next[i * d.dv + j] = decayed[i * d.dv + j] + k[i] * u[j];
}

// out += state x (state [dk, dv], x [dv]): one value head's share of its key head's dq_t or dk_t.
void add_state_times(Dims d, const float* state, const float* x, float* out) {
  for (std::int64_t i = 0; i < d.dk; ++i) {
    float sum = 0.0f;
    for (std::int64_t j = 0; j < d.dv; ++j) sum += state[i * d.dv + j] * x[j];
    out[i] += sum;
  }
}

}  // namespace

void gated_delta_rule_forward_recurrent(const GatedDeltaShape& s, const GatedDeltaInputs& in,
                                        float* out, float* final_state) {
  gated_delta::check_shape("gated_delta_rule_forward_recurrent", s);
  const Dims d{s.key_dim, s.value_dim};
#pragma omp parallel for schedule(dynamic)
  for (std::int64_t h = 0; h < s.num_value_heads; ++h) {
    const HeadRows r(s, in, h);
    std::vector<float> state = initial_state(r, d);
    std::vector<float> p(d.dv), u(d.dv);
    for (std::int64_t t = 0; t < s.seq_len; ++t) {
      read(r, d, t, state.data(), state.data(), p.data(), u.data());
      write(r, d, t, state.data(), u.data(), state.data());
      const float* q = r.q + t * r.qk_stride;
      float* o = out + t * r.v_stride + h * d.dv;
      std::fill_n(o, d.dv, 0.0f);
      for (std::int64_t i = 0; i < d.dk; ++i)
        for (std::int64_t j = 0; j < d.dv; ++j) o[j] += state[i * d.dv + j] * q[i];
    }
    if (final_state != nullptr)
      std::copy(state.begin(), state.end(), final_state + h * d.dk * d.dv);
  }
}

void gated_delta_rule_backward_recurrent(const GatedDeltaShape& s, const GatedDeltaInputs& in,
                                         const float* dout, const float* d_final_state,
                                         const GatedDeltaGradients& grads) {
  gated_delta::check_shape("gated_delta_rule_backward_recurrent", s);
  const Dims d{s.key_dim, s.value_dim};
  const std::int64_t T = s.seq_len, state_size = d.dk * d.dv;
  const std::int64_t group = s.num_value_heads / s.num_key_heads;
  const std::int64_t segments = (T + kSegment - 1) / kSegment;
  // One task per key head: its value heads add their q and k gradients into the same rows.
#pragma omp parallel for schedule(dynamic)
  for (std::int64_t key_head = 0; key_head < s.num_key_heads; ++key_head) {
    const std::int64_t qk_stride = s.num_key_heads * d.dk;
    for (std::int64_t t = 0; t < T; ++t) {
      std::fill_n(grads.dq + t * qk_stride + key_head * d.dk, d.dk, 0.0f);
      std::fill_n(grads.dk + t * qk_stride + key_head * d.dk, d.dk, 0.0f);
    }
    std::vector<float> checkpoints(segments * state_size);
    // states[i] is the state before token t0 + i of the segment being walked back.
    std::vector<float> states((kSegment + 1) * state_size), decayed(state_size);
    std::vector<float> ds(state_size), p(d.dv), u(d.dv), du(d.dv), dp(d.dv);
    for (std::int64_t h = key_head * group; h < (key_head + 1) * group; ++h) {
      const HeadRows r(s, in, h);
      std::vector<float> state = initial_state(r, d);
      for (std::int64_t t = 0; t < T; ++t) {
        if (t % kSegment == 0) {
          std::copy(state.begin(), state.end(), checkpoints.begin() + (t / kSegment) * state_size);
        }
        read(r, d, t, state.data(), state.data(), p.data(), u.data());
        write(r, d, t, state.data(), u.data(), state.data());
      }
      if (d_final_state != nullptr) {
        std::copy_n(d_final_state + h * state_size, state_size, ds.begin());
      } else {
        std::fill(ds.begin(), ds.end(), 0.0f);
      }
      for (std::int64_t segment = segments - 1; segment >= 0; --segment) {
        const std::int64_t t0 = segment * kSegment, length = std::min(kSegment, T - t0);
        std::copy_n(checkpoints.begin() + segment * state_size, state_size, states.begin());
        for (std::int64_t i = 0; i < length; ++i) {
          read(r, d, t0 + i, states.data() + i * state_size, decayed.data(), p.data(), u.data());
          write(r, d, t0 + i, decayed.data(), u.data(), states.data() + (i + 1) * state_size);
        }
        for (std::int64_t i = length - 1; i >= 0; --i) {
          const std::int64_t t = t0 + i;
          const float* state = states.data() + (i + 1) * state_size;  // S_t
          read(r, d, t, states.data() + i * state_size, decayed.data(), p.data(), u.data());
          const float* q = r.q + t * r.qk_stride;
          const float* k = r.k + t * r.qk_stride;
          const float* v = r.v + t * r.v_stride;
          const float* dO = dout + t * r.v_stride + h * d.dv;
          const float beta = r.beta[t * r.gate_stride];
          float* dq = grads.dq + t * qk_stride + key_head * d.dk;
          float* dk = grads.dk + t * qk_stride + key_head * d.dk;
          // o_t = S_t^T q_t: dS += q_t do_t^T, dq_t += S_t do_t.
          for (std::int64_t a = 0; a < d.dk; ++a)
            for (std::int64_t b = 0; b < d.dv; ++b) ds[a * d.dv + b] += q[a] * dO[b];
          add_state_times(d, state, dO, dq);
          // S_t = S~_t + k_t u_t^T: du = dS^T k_t, dk_t += dS u_t.
          std::fill(du.begin(), du.end(), 0.0f);
          for (std::int64_t a = 0; a < d.dk; ++a)
            for (std::int64_t b = 0; b < d.dv; ++b) du[b] += ds[a * d.dv + b] * k[a];
          add_state_times(d, ds.data(), u.data(), dk);
          // u_t = beta_t (v_t - p_t).
          float dbeta = 0.0f;
          for (std::int64_t b = 0; b < d.dv; ++b) {
            dbeta += du[b] * (v[b] - p[b]);
            grads.dv[t * r.v_stride + h * d.dv + b] = beta * du[b];
            dp[b] = -beta * du[b];
          }
          grads.dbeta[t * r.gate_stride + h] = dbeta;
          // p_t = S~_t^T k_t: dS~ = dS + k_t dp^T, dk_t += S~_t dp.
          for (std::int64_t a = 0; a < d.dk; ++a)
            for (std::int64_t b = 0; b < d.dv; ++b) ds[a * d.dv + b] += k[a] * dp[b];
          add_state_times(d, decayed.data(), dp.data(), dk);
          // S~_t = exp(g_t) S_{t-1}: dg_t = <dS~, S~_t>, dS_{t-1} = exp(g_t) dS~.
          float dg = 0.0f;
          for (std::int64_t a = 0; a < state_size; ++a) dg += ds[a] * decayed[a];
          grads.dg[t * r.gate_stride + h] = dg;
          const float decay = std::exp(r.g[t * r.gate_stride]);
          for (float& e : ds) e *= decay;
        }
      }
      if (grads.d_initial_state != nullptr) {
        std::copy(ds.begin(), ds.end(), grads.d_initial_state + h * state_size);
      }
    }
  }
}

}  // namespace pq::runtime
