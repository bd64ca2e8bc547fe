// Chunked Gated DeltaNet core (qwen3_5-architecture-facts.md §4.3 forward; the backward follows
// the same factorisation, in the order of §4.7's pipeline): per chunk of kChunk tokens and value
// head, with gamma_i the cumulative log decay inside the chunk, D_ij = exp(gamma_i - gamma_j)
// (j <= i), K, Q, V the chunk's rows and S the state entering the chunk,
//   A = strictly_lower(diag(beta) (K K^T o D)),   P = (I + A)^-1,
//   U = P diag(beta) V,   W = P diag(beta e^gamma) K,   V_new = U - W S,
//   O = diag(e^gamma) Q S + (Q K^T o D, diagonal included) V_new,
//   S' = e^gamma_L S + K^T diag(e^(gamma_L - gamma)) V_new.
// Only the last three lines involve S; everything else is independent per chunk.
#include "runtime/kernels/gated_delta_rule.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <mutex>
#include <vector>

#include "runtime/kernels/gated_delta_rule_heads.h"
#include "runtime/kernels/gemm.h"

namespace pq::runtime {
namespace {

using gated_delta::HeadRows;
using enum Transpose;

// §4.3: HF's fallback and FLA both use 64. [64 x 64] blocks and [64 x 128] row blocks stay in L2.
constexpr std::int64_t kChunk = 64;
constexpr std::int64_t kChunkArea = kChunk * kChunk;

float dot(const float* a, const float* b, std::int64_t n) {
  float sum = 0.0f;
  for (std::int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// One chunk of one value head: its rows (strides as in HeadRows) and its decays.
struct Chunk {
  std::int64_t t0 = 0, length = 0;
  const float *q = nullptr, *k = nullptr, *v = nullptr;
  std::array<float, kChunk> gamma{};  // sum of g over the chunk's tokens up to i
  std::array<float, kChunk> decay{};  // e^gamma_i
  std::array<float, kChunk> tail{};   // e^(gamma_L - gamma_i), L the chunk's last token
  std::array<float, kChunk> beta{};
  float total_decay = 1.0f;  // e^gamma_L

  Chunk(const HeadRows& r, std::int64_t first, std::int64_t rows) : t0(first), length(rows) {
    q = r.q + t0 * r.qk_stride;
    k = r.k + t0 * r.qk_stride;
    v = r.v + t0 * r.v_stride;
    float sum = 0.0f;
    for (std::int64_t i = 0; i < length; ++i) {
      sum += r.g[(t0 + i) * r.gate_stride];
      gamma[i] = sum;
      decay[i] = std::exp(sum);
      beta[i] = r.beta[(t0 + i) * r.gate_stride];
    }
    total_decay = decay[length - 1];
    // Every exponent is <= 0 (g <= 0), so nothing here overflows; upper-triangle terms
    // exp(gamma_i - gamma_j), j > i, are never formed (§11 point 4).
    for (std::int64_t i = 0; i < length; ++i) tail[i] = std::exp(sum - gamma[i]);
  }
};

// The state-independent quantities of one chunk. [L x L] blocks have row stride kChunk; w and
// u have row stride dk and dv.
struct ChunkForm {
  float* p;    // P = (I + A)^-1, unit lower triangular
  float* kkd;  // K K^T o D strictly below the diagonal, zero elsewhere
  float* qkd;  // Q K^T o D on and below the diagonal, zero elsewhere
  float* w;    // W
  float* u;    // U, replaced by V_new once the entering state is known
};

struct Dims {
  std::int64_t dk, dv, qk_stride, v_stride;
};

// Fills f for chunk c; scaled_p is [kChunk x kChunk] scratch.
void prepare_chunk(const Chunk& c, const Dims& d, const ChunkForm& f, float* scaled_p) {
  const std::int64_t L = c.length;
  gemm_f32(kNo, kYes, L, L, d.dk, 1.0f, c.k, d.qk_stride, c.k, d.qk_stride, 0.0f, f.kkd, kChunk);
  gemm_f32(kNo, kYes, L, L, d.dk, 1.0f, c.q, d.qk_stride, c.k, d.qk_stride, 0.0f, f.qkd, kChunk);
  for (std::int64_t i = 0; i < L; ++i) {
    float* kkd = f.kkd + i * kChunk;
    float* qkd = f.qkd + i * kChunk;
    for (std::int64_t j = 0; j < i; ++j) {
      const float decay = std::exp(c.gamma[i] - c.gamma[j]);
      kkd[j] *= decay;
      qkd[j] *= decay;
    }
    kkd[i] = 0.0f;
    std::fill(kkd + i + 1, kkd + L, 0.0f);
    std::fill(qkd + i + 1, qkd + L, 0.0f);
  }
  // (I + A) P = I by forward substitution, one row at a time: row i of P is
  // e_i - sum_{m < i} A_im (row m of P), and row m is zero right of column m.
  for (std::int64_t i = 0; i < L; ++i) {
    float* row = f.p + i * kChunk;
    std::fill(row, row + L, 0.0f);
    row[i] = 1.0f;
    for (std::int64_t m = 0; m < i; ++m) {
      const float a = c.beta[i] * f.kkd[i * kChunk + m];
      const float* p_row = f.p + m * kChunk;
      for (std::int64_t j = 0; j <= m; ++j) row[j] -= a * p_row[j];
    }
  }
  // U = (P diag(beta)) V and W = (P diag(beta e^gamma)) K.
  for (std::int64_t i = 0; i < L; ++i)
    for (std::int64_t j = 0; j < L; ++j) scaled_p[i * kChunk + j] = f.p[i * kChunk + j] * c.beta[j];
  gemm_f32(kNo, kNo, L, d.dv, L, 1.0f, scaled_p, kChunk, c.v, d.v_stride, 0.0f, f.u, d.dv);
  for (std::int64_t i = 0; i < L; ++i)
    for (std::int64_t j = 0; j < L; ++j) scaled_p[i * kChunk + j] *= c.decay[j];
  gemm_f32(kNo, kNo, L, d.dk, L, 1.0f, scaled_p, kChunk, c.k, d.qk_stride, 0.0f, f.w, d.dk);
}

// Turns f.u into V_new, writes the chunk's outputs (rows of stride v_stride) unless out is
// nullptr, and moves state [dk, dv] past the chunk. scratch_v is [kChunk x dv].
void advance_chunk(const Chunk& c, const Dims& d, const ChunkForm& f, float* state, float* out,
                   float* scratch_v) {
  const std::int64_t L = c.length;
  gemm_f32(kNo, kNo, L, d.dv, d.dk, -1.0f, f.w, d.dk, state, d.dv, 1.0f, f.u, d.dv);
  if (out != nullptr) {
    gemm_f32(kNo, kNo, L, d.dv, d.dk, 1.0f, c.q, d.qk_stride, state, d.dv, 0.0f, out, d.v_stride);
    for (std::int64_t i = 0; i < L; ++i)
      for (std::int64_t j = 0; j < d.dv; ++j) out[i * d.v_stride + j] *= c.decay[i];
    gemm_f32(kNo, kNo, L, d.dv, L, 1.0f, f.qkd, kChunk, f.u, d.dv, 1.0f, out, d.v_stride);
  }
  for (std::int64_t i = 0; i < L; ++i)
    for (std::int64_t j = 0; j < d.dv; ++j) scratch_v[i * d.dv + j] = c.tail[i] * f.u[i * d.dv + j];
  for (std::int64_t i = 0; i < d.dk * d.dv; ++i) state[i] *= c.total_decay;
  gemm_f32(kYes, kNo, d.dk, d.dv, L, 1.0f, c.k, d.qk_stride, scratch_v, d.dv, 1.0f, state, d.dv);
}

Dims dims_of(const GatedDeltaShape& s) {
  return {s.key_dim, s.value_dim, s.num_key_heads * s.key_dim, s.num_value_heads * s.value_dim};
}

void load_state(const HeadRows& r, const Dims& d, std::vector<float>& state) {
  if (r.initial_state == nullptr) {
    std::fill(state.begin(), state.end(), 0.0f);
  } else {
    std::copy_n(r.initial_state, d.dk * d.dv, state.begin());
  }
}

// Per-thread scratch of the backward of one chunk.
struct BackwardScratch {
  std::vector<float> decayed_dout, dv_new, rows_v;  // [kChunk x dv]
  std::vector<float> rows_k, dw;                    // [kChunk x dk]
  std::vector<float> pair_decay, dm, dp, block;     // [kChunk x kChunk]

  explicit BackwardScratch(const Dims& d)
      : decayed_dout(kChunk * d.dv),
        dv_new(kChunk * d.dv),
        rows_v(kChunk * d.dv),
        rows_k(kChunk * d.dk),
        dw(kChunk * d.dk),
        pair_decay(kChunkArea),
        dm(kChunkArea),
        dp(kChunkArea),
        block(kChunkArea) {}
};

// Where the backward of one chunk writes: dq and dk rows of stride dk (the value head's own
// buffers), dv rows of stride v_stride, dg and dbeta with stride gate_stride.
struct ChunkGradients {
  float *dq, *dk, *dv, *dg, *dbeta;
  std::int64_t gate_stride;
};

// The backward of one chunk, given its form (f.u holding V_new), the state entering it, and
// d_state = dL/dS' on entry; d_state leaves as dL/dS for the entering state.
void backward_chunk(const Chunk& c, const Dims& d, const ChunkForm& f, const float* state,
                    const float* dout, float* d_state, const ChunkGradients& out,
                    BackwardScratch& b) {
  const std::int64_t L = c.length;
  const float* v_new = f.u;
  float* pair_decay = b.pair_decay.data();
  float* dm = b.dm.data();
  float* dp = b.dp.data();
  float* block = b.block.data();
  std::array<float, kChunk> dgamma{}, dbeta{};
  for (std::int64_t i = 0; i < L; ++i)
    for (std::int64_t j = 0; j <= i; ++j)
      pair_decay[i * kChunk + j] = std::exp(c.gamma[i] - c.gamma[j]);
  for (std::int64_t i = 0; i < L; ++i)
    for (std::int64_t j = 0; j < d.dv; ++j)
      b.decayed_dout[i * d.dv + j] = c.decay[i] * dout[i * d.v_stride + j];

  // V_new feeds O through (Q K^T o D) and S' through K^T diag(tail).
  gemm_f32(kYes, kNo, L, d.dv, L, 1.0f, f.qkd, kChunk, dout, d.v_stride, 0.0f, b.dv_new.data(),
           d.dv);
  gemm_f32(kNo, kNo, L, d.dv, d.dk, 1.0f, c.k, d.qk_stride, d_state, d.dv, 0.0f, b.rows_v.data(),
           d.dv);
  for (std::int64_t i = 0; i < L; ++i)
    for (std::int64_t j = 0; j < d.dv; ++j)
      b.dv_new[i * d.dv + j] += c.tail[i] * b.rows_v[i * d.dv + j];

  // O = diag(e^gamma) Q S + ...: dQ = diag(e^gamma) dO S^T, and dgamma_i = q_i . dq_i.
  gemm_f32(kNo, kYes, L, d.dk, d.dv, 1.0f, b.decayed_dout.data(), d.dv, state, d.dv, 0.0f, out.dq,
           d.dk);
  for (std::int64_t i = 0; i < L; ++i)
    dgamma[i] += dot(c.q + i * d.qk_stride, out.dq + i * d.dk, d.dk);

  // O = ... + M V_new with M = Q K^T o D: dM = dO V_new^T; dQ += (dM o D) K, dK = (dM o D)^T Q;
  // D_ij's exponent gives dgamma_i += dM_ij M_ij and dgamma_j -= dM_ij M_ij.
  gemm_f32(kNo, kYes, L, L, d.dv, 1.0f, dout, d.v_stride, v_new, d.dv, 0.0f, dm, kChunk);
  for (std::int64_t i = 0; i < L; ++i) {
    float* dm_row = dm + i * kChunk;
    for (std::int64_t j = 0; j < i; ++j) {
      const float through_decay = dm_row[j] * f.qkd[i * kChunk + j];
      dgamma[i] += through_decay;
      dgamma[j] -= through_decay;
    }
    for (std::int64_t j = 0; j <= i; ++j) dm_row[j] *= pair_decay[i * kChunk + j];
    std::fill(dm_row + i + 1, dm_row + L, 0.0f);
  }
  gemm_f32(kNo, kNo, L, d.dk, L, 1.0f, dm, kChunk, c.k, d.qk_stride, 1.0f, out.dq, d.dk);
  gemm_f32(kYes, kNo, L, d.dk, L, 1.0f, dm, kChunk, c.q, d.qk_stride, 0.0f, out.dk, d.dk);

  // S' = e^gamma_L S + K^T diag(tail) V_new: dK += diag(tail) V_new dS'^T; the tail factors
  // e^(gamma_L - gamma_i) and e^gamma_L give dgamma.
  gemm_f32(kNo, kYes, L, d.dk, d.dv, 1.0f, v_new, d.dv, d_state, d.dv, 0.0f, b.rows_k.data(), d.dk);
  float dgamma_last = c.total_decay * dot(d_state, state, d.dk * d.dv);
  for (std::int64_t i = 0; i < L; ++i) {
    const float* x = b.rows_k.data() + i * d.dk;
    const float through_tail = c.tail[i] * dot(c.k + i * d.qk_stride, x, d.dk);
    dgamma[i] -= through_tail;
    dgamma_last += through_tail;
    for (std::int64_t j = 0; j < d.dk; ++j) out.dk[i * d.dk + j] += c.tail[i] * x[j];
  }
  dgamma[L - 1] += dgamma_last;

  // V_new = U - W S: dU = dV_new, dW = -dV_new S^T.
  gemm_f32(kNo, kYes, L, d.dk, d.dv, -1.0f, b.dv_new.data(), d.dv, state, d.dv, 0.0f, b.dw.data(),
           d.dk);
  // W = P diag(beta e^gamma) K: the scaled K receives P^T dW.
  gemm_f32(kYes, kNo, L, d.dk, L, 1.0f, f.p, kChunk, b.dw.data(), d.dk, 0.0f, b.rows_k.data(),
           d.dk);
  for (std::int64_t j = 0; j < L; ++j) {
    const float* x = b.rows_k.data() + j * d.dk;
    const float through_k = c.decay[j] * dot(c.k + j * d.qk_stride, x, d.dk);
    dbeta[j] += through_k;
    dgamma[j] += c.beta[j] * through_k;
    const float scale = c.beta[j] * c.decay[j];
    for (std::int64_t e = 0; e < d.dk; ++e) out.dk[j * d.dk + e] += scale * x[e];
  }
  // U = P diag(beta) V: the scaled V receives P^T dU.
  gemm_f32(kYes, kNo, L, d.dv, L, 1.0f, f.p, kChunk, b.dv_new.data(), d.dv, 0.0f, b.rows_v.data(),
           d.dv);
  for (std::int64_t j = 0; j < L; ++j) {
    const float* x = b.rows_v.data() + j * d.dv;
    dbeta[j] += dot(c.v + j * d.v_stride, x, d.dv);
    for (std::int64_t e = 0; e < d.dv; ++e) out.dv[j * d.v_stride + e] = c.beta[j] * x[e];
  }

  // dP = dU (diag(beta) V)^T + dW (diag(beta e^gamma) K)^T = (dU V^T + dW K^T diag(e^gamma))
  // diag(beta).
  gemm_f32(kNo, kYes, L, L, d.dk, 1.0f, b.dw.data(), d.dk, c.k, d.qk_stride, 0.0f, dp, kChunk);
  for (std::int64_t i = 0; i < L; ++i)
    for (std::int64_t j = 0; j < L; ++j) dp[i * kChunk + j] *= c.decay[j];
  gemm_f32(kNo, kYes, L, L, d.dv, 1.0f, b.dv_new.data(), d.dv, c.v, d.v_stride, 1.0f, dp, kChunk);
  for (std::int64_t i = 0; i < L; ++i)
    for (std::int64_t j = 0; j < L; ++j) dp[i * kChunk + j] *= c.beta[j];
  // P = (I + A)^-1: dA = -P^T dP P^T (dp is overwritten with dA).
  gemm_f32(kNo, kYes, L, L, L, 1.0f, dp, kChunk, f.p, kChunk, 0.0f, block, kChunk);
  gemm_f32(kYes, kNo, L, L, L, -1.0f, f.p, kChunk, block, kChunk, 0.0f, dp, kChunk);

  // A_ij = beta_i (K K^T)_ij D_ij below the diagonal. block becomes d(K K^T), symmetrised
  // because K appears on both sides.
  std::fill(block, block + L * kChunk, 0.0f);
  for (std::int64_t i = 0; i < L; ++i) {
    for (std::int64_t j = 0; j < i; ++j) {
      const float da = dp[i * kChunk + j];
      const float through_a = da * f.kkd[i * kChunk + j];
      dbeta[i] += through_a;
      dgamma[i] += c.beta[i] * through_a;
      dgamma[j] -= c.beta[i] * through_a;
      const float dkk = c.beta[i] * pair_decay[i * kChunk + j] * da;
      block[i * kChunk + j] += dkk;
      block[j * kChunk + i] += dkk;
    }
  }
  gemm_f32(kNo, kNo, L, d.dk, L, 1.0f, block, kChunk, c.k, d.qk_stride, 1.0f, out.dk, d.dk);

  // gamma_i = sum_{j <= i} g_j, so dg_j = sum_{i >= j} dgamma_i.
  float suffix = 0.0f;
  for (std::int64_t i = L - 1; i >= 0; --i) {
    suffix += dgamma[i];
    out.dg[i * out.gate_stride] = suffix;
    out.dbeta[i * out.gate_stride] = dbeta[i];
  }

  // The entering state feeds S' (e^gamma_L S), O (diag(e^gamma) Q S) and V_new (-W S).
  for (std::int64_t i = 0; i < d.dk * d.dv; ++i) d_state[i] *= c.total_decay;
  gemm_f32(kYes, kNo, d.dk, d.dv, L, 1.0f, c.q, d.qk_stride, b.decayed_dout.data(), d.dv, 1.0f,
           d_state, d.dv);
  gemm_f32(kYes, kNo, d.dk, d.dv, L, -1.0f, f.w, d.dk, b.dv_new.data(), d.dv, 1.0f, d_state, d.dv);
}

}  // namespace

void gated_delta_rule_forward(const GatedDeltaShape& s, const GatedDeltaInputs& in, float* out,
                              float* final_state) {
  gated_delta::check_shape("gated_delta_rule_forward", s);
  const Dims d = dims_of(s);
  const std::int64_t T = s.seq_len;
#pragma omp parallel
  {
    std::vector<float> p(kChunkArea), kkd(kChunkArea), qkd(kChunkArea), scaled_p(kChunkArea);
    std::vector<float> w(kChunk * d.dk), u(kChunk * d.dv), scratch_v(kChunk * d.dv);
    std::vector<float> state(d.dk * d.dv);
    const ChunkForm form{p.data(), kkd.data(), qkd.data(), w.data(), u.data()};
#pragma omp for schedule(dynamic)
    for (std::int64_t h = 0; h < s.num_value_heads; ++h) {
      const HeadRows r(s, in, h);
      load_state(r, d, state);
      for (std::int64_t t0 = 0; t0 < T; t0 += kChunk) {
        const Chunk c(r, t0, std::min(kChunk, T - t0));
        prepare_chunk(c, d, form, scaled_p.data());
        advance_chunk(c, d, form, state.data(), out + t0 * d.v_stride + h * d.dv, scratch_v.data());
      }
      if (final_state != nullptr)
        std::copy(state.begin(), state.end(), final_state + h * d.dk * d.dv);
    }
  }
}

void gated_delta_rule_backward(const GatedDeltaShape& s, const GatedDeltaInputs& in,
                               const float* dout, const float* d_final_state,
                               const GatedDeltaGradients& grads) {
  gated_delta::check_shape("gated_delta_rule_backward", s);
  const Dims d = dims_of(s);
  const std::int64_t T = s.seq_len, chunks = (T + kChunk - 1) / kChunk;
  const std::int64_t state_size = d.dk * d.dv;
  std::fill_n(grads.dq, T * d.qk_stride, 0.0f);
  std::fill_n(grads.dk, T * d.qk_stride, 0.0f);
  // Value heads sharing a key head add their dq and dk under that key head's lock, once per head.
  std::vector<std::mutex> key_head_locks(s.num_key_heads);
#pragma omp parallel
  {
    // Every chunk's form and entering state, kept from the recomputed forward for the walk back.
    std::vector<float> p(chunks * kChunkArea), kkd(chunks * kChunkArea), qkd(chunks * kChunkArea);
    std::vector<float> w(T * d.dk), u(T * d.dv), states(chunks * state_size);
    std::vector<float> scaled_p(kChunkArea), scratch_v(kChunk * d.dv), state(state_size);
    std::vector<float> head_dq(T * d.dk), head_dk(T * d.dk);
    BackwardScratch scratch(d);
    auto form_of = [&](std::int64_t chunk) {
      const std::int64_t t0 = chunk * kChunk;
      return ChunkForm{p.data() + chunk * kChunkArea, kkd.data() + chunk * kChunkArea,
                       qkd.data() + chunk * kChunkArea, w.data() + t0 * d.dk, u.data() + t0 * d.dv};
    };
#pragma omp for schedule(dynamic)
    for (std::int64_t h = 0; h < s.num_value_heads; ++h) {
      const HeadRows r(s, in, h);
      load_state(r, d, state);
      for (std::int64_t chunk = 0; chunk < chunks; ++chunk) {
        const Chunk c(r, chunk * kChunk, std::min(kChunk, T - chunk * kChunk));
        std::copy(state.begin(), state.end(), states.begin() + chunk * state_size);
        prepare_chunk(c, d, form_of(chunk), scaled_p.data());
        advance_chunk(c, d, form_of(chunk), state.data(), nullptr, scratch_v.data());
      }
      float* d_state = state.data();
      if (d_final_state != nullptr) {
        std::copy_n(d_final_state + h * state_size, state_size, d_state);
      } else {
        std::fill(state.begin(), state.end(), 0.0f);
      }
      for (std::int64_t chunk = chunks - 1; chunk >= 0; --chunk) {
        const std::int64_t t0 = chunk * kChunk;
        const Chunk c(r, t0, std::min(kChunk, T - t0));
        const ChunkGradients out{head_dq.data() + t0 * d.dk,
                                 head_dk.data() + t0 * d.dk,
                                 grads.dv + t0 * d.v_stride + h * d.dv,
                                 grads.dg + t0 * r.gate_stride + h,
                                 grads.dbeta + t0 * r.gate_stride + h,
                                 r.gate_stride};
        backward_chunk(c, d, form_of(chunk), states.data() + chunk * state_size,
                       dout + t0 * d.v_stride + h * d.dv, d_state, out, scratch);
      }
      if (grads.d_initial_state != nullptr) {
        std::copy_n(d_state, state_size, grads.d_initial_state + h * state_size);
      }
      const std::lock_guard<std::mutex> lock(key_head_locks[r.key_head]);
      for (std::int64_t t = 0; t < T; ++t) {
        float* dq = grads.dq + t * d.qk_stride + r.key_head * d.dk;
        float* dk = grads.dk + t * d.qk_stride + r.key_head * d.dk;
        for (std::int64_t e = 0; e < d.dk; ++e) {
          dq[e] += head_dq[t * d.dk + e];
          dk[e] += head_dk[t * d.dk + e];
        }
      }
    }
  }
}

}  // namespace pq::runtime
