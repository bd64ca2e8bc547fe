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
#include "runtime/kernels/vector_math.h"

namespace pq::runtime {
namespace {

using gated_delta::HeadRows;
using enum Transpose;

// §4.3: HF's fallback and FLA both use 64. [64 x 64] blocks and [64 x 128] row blocks stay in L2.
constexpr std::int64_t kChunk = 64;
constexpr std::int64_t kChunkArea = kChunk * kChunk;

// Independent partial sums, which the compiler keeps in vector registers; a single running sum
// would be one serial chain of adds (about 4 cycles per element).
constexpr std::int64_t kPartialSums = 16;

float dot(const float* a, const float* b, std::int64_t n) {
  std::array<float, kPartialSums> partial{};
  std::int64_t i = 0;
  for (; i + kPartialSums <= n; i += kPartialSums)
    for (std::int64_t lane = 0; lane < kPartialSums; ++lane)
      partial[lane] += a[i + lane] * b[i + lane];
  float total = 0.0f;
  for (; i < n; ++i) total += a[i] * b[i];
  for (const float p : partial) total += p;
  return total;
}

float sum(const float* x, std::int64_t n) {
  std::array<float, kPartialSums> partial{};
  std::int64_t i = 0;
  for (; i + kPartialSums <= n; i += kPartialSums)
    for (std::int64_t lane = 0; lane < kPartialSums; ++lane) partial[lane] += x[i + lane];
  float total = 0.0f;
  for (; i < n; ++i) total += x[i];
  for (const float p : partial) total += p;
  return total;
}

// One chunk of one value head: its rows (strides as in HeadRows) and its decays.
struct Chunk {
  std::int64_t length = 0;
  const float *q = nullptr, *k = nullptr, *v = nullptr;  // row 0 of the chunk
  std::array<float, kChunk> gamma{};                     // sum of g over the chunk's tokens up to i
  std::array<float, kChunk> decay{};                     // e^gamma_i
  std::array<float, kChunk> tail{};  // e^(gamma_L - gamma_i), L the chunk's last token
  std::array<float, kChunk> beta{};
  float total_decay = 1.0f;  // e^gamma_L

  Chunk(const HeadRows& r, std::int64_t t0, std::int64_t rows) : length(rows) {
    q = r.q + t0 * r.qk_stride;
    k = r.k + t0 * r.qk_stride;
    v = r.v + t0 * r.v_stride;
    float cumulative = 0.0f;
    for (std::int64_t i = 0; i < length; ++i) {
      cumulative += r.g[(t0 + i) * r.gate_stride];
      gamma[i] = cumulative;
      decay[i] = std::exp(cumulative);
      beta[i] = r.beta[(t0 + i) * r.gate_stride];
    }
    total_decay = decay[length - 1];
    // Every exponent is <= 0 (g <= 0), so nothing here overflows; upper-triangle terms
    // exp(gamma_i - gamma_j), j > i, are never formed (§11 point 4).
    for (std::int64_t i = 0; i < length; ++i) tail[i] = std::exp(cumulative - gamma[i]);
  }
};

struct Dims {
  std::int64_t dk, dv, qk_stride, v_stride;
};

// The state-independent quantities of one chunk; the backward keeps them for every chunk. [C x C]
// blocks have row stride kChunk, w and v_new rows stride dk and dv.
struct ChunkForm {
  float* p;           // [C x C] P = (I + A)^-1, unit lower triangular
  float* pair_decay;  // [C x C] D_ij = e^(gamma_i - gamma_j) on and below the diagonal
  float* scores;      // [2C x C] rows [0, L): Q K^T o D with the diagonal, rows [L, 2L): K K^T o D
                      // strictly below it; zero elsewhere
  float* w;           // [C x dk] W (the backward's copy; the forward reads it from the operands)
  float* v_new;       // [C x dv] U, replaced by V_new once the entering state is known

  const float* qkd() const { return scores; }
  float* kkd(std::int64_t L) const { return scores + L * kChunk; }
};

// One chunk's operands packed so that products sharing an operand run as one GEMM:
// [W; Q] S, [Q; K] K^T, P [V | e^gamma K] and their transposes in the backward. Per thread.
struct ChunkOperands {
  std::vector<float> wqk;       // [3L x dk]: rows of W, then Q, then K
  std::vector<float> vk;        // [L x (dv + dk)]: row i is [v_i | e^gamma_i k_i]
  std::vector<float> uw;        // [L x (dv + dk)]
  std::vector<float> scaled_p;  // [C x C]
  std::vector<float> stacked;   // [2L x dv]: [W; Q] S, then [diag(tail) V_new; O]

  explicit ChunkOperands(const Dims& d)
      : wqk(3 * kChunk * d.dk),
        vk(kChunk * (d.dv + d.dk)),
        uw(kChunk * (d.dv + d.dk)),
        scaled_p(kChunkArea),
        stacked(2 * kChunk * d.dv) {}

  float* w_rows() { return wqk.data(); }
  float* q_rows(std::int64_t L, const Dims& d) { return wqk.data() + L * d.dk; }
  float* k_rows(std::int64_t L, const Dims& d) { return wqk.data() + 2 * L * d.dk; }
};

// Rows of the [T, heads * dim] inputs and gradients lie a page or more apart, so a row touched
// unannounced stalls on a TLB and a cache miss. gather_rows and scatter_rows request the row
// kRowsAhead ahead of the one they copy, so that the misses of that many rows overlap.
constexpr std::int64_t kRowsAhead = 16;

// Prefetches the cache lines of one row (for_write: to be written).
template <bool for_write>
void request_row(const float* row, std::int64_t width) {
  constexpr std::int64_t kLineFloats = 16;
  for (std::int64_t e = 0; e < width; e += kLineFloats) __builtin_prefetch(row + e, for_write);
}

// Copies `count` rows of `width` floats from src (row stride src_stride) to dst (row stride
// dst_stride).
void gather_rows(const float* src, std::int64_t count, std::int64_t src_stride, std::int64_t width,
                 float* dst, std::int64_t dst_stride) {
  for (std::int64_t row = 0; row < std::min(kRowsAhead, count); ++row)
    request_row<false>(src + row * src_stride, width);
  for (std::int64_t row = 0; row < count; ++row) {
    if (row + kRowsAhead < count) request_row<false>(src + (row + kRowsAhead) * src_stride, width);
    std::copy_n(src + row * src_stride, width, dst + row * dst_stride);
  }
}

// dst rows (stride dst_stride) receive, or with `accumulate` add, `count` dense rows of `width`
// floats from src.
void scatter_rows(const float* src, std::int64_t count, std::int64_t width, float* dst,
                  std::int64_t dst_stride, bool accumulate) {
  for (std::int64_t row = 0; row < std::min(kRowsAhead, count); ++row)
    request_row<true>(dst + row * dst_stride, width);
  for (std::int64_t row = 0; row < count; ++row) {
    if (row + kRowsAhead < count) request_row<true>(dst + (row + kRowsAhead) * dst_stride, width);
    float* out = dst + row * dst_stride;
    const float* in = src + row * width;
    if (accumulate) {
      for (std::int64_t e = 0; e < width; ++e) out[e] += in[e];
    } else {
      std::copy_n(in, width, out);
    }
  }
}

// Copies the chunk's q, k and v rows into the operands (W's rows are left as they are).
void pack_chunk(const Chunk& c, const Dims& d, ChunkOperands& ops) {
  const std::int64_t L = c.length, width = d.dv + d.dk;
  float* k_rows = ops.k_rows(L, d);
  gather_rows(c.q, L, d.qk_stride, d.dk, ops.q_rows(L, d), d.dk);
  gather_rows(c.k, L, d.qk_stride, d.dk, k_rows, d.dk);
  gather_rows(c.v, L, d.v_stride, d.dv, ops.vk.data(), width);
  for (std::int64_t i = 0; i < L; ++i) {
    float* decayed_k = ops.vk.data() + i * width + d.dv;
    for (std::int64_t e = 0; e < d.dk; ++e) decayed_k[e] = c.decay[i] * k_rows[i * d.dk + e];
  }
}

// Fills f for chunk c from its packed operands: U into f.v_new, W into the operands' W rows.
void prepare_chunk(const Chunk& c, const Dims& d, const ChunkForm& f, ChunkOperands& ops) {
  const std::int64_t L = c.length, width = d.dv + d.dk;
  gemm_f32(kNo, kYes, 2 * L, L, d.dk, 1.0f, ops.q_rows(L, d), d.dk, ops.k_rows(L, d), d.dk, 0.0f,
           f.scores, kChunk);
  // D row i: exp(gamma_i - gamma_j) as exp(x_j - shift) with x_j = -gamma_j, shift = -gamma_i.
  for (std::int64_t i = 0; i < L; ++i) {
    float* row = f.pair_decay + i * kChunk;
    for (std::int64_t j = 0; j <= i; ++j) row[j] = -c.gamma[j];
    exp_shifted_sum({row, static_cast<std::size_t>(i + 1)}, -c.gamma[i]);
  }
  float* kkd = f.kkd(L);
  for (std::int64_t i = 0; i < L; ++i) {
    const float* decay = f.pair_decay + i * kChunk;
    float* qkd_row = f.scores + i * kChunk;
    float* kkd_row = kkd + i * kChunk;
    for (std::int64_t j = 0; j <= i; ++j) qkd_row[j] *= decay[j];
    for (std::int64_t j = 0; j < i; ++j) kkd_row[j] *= decay[j];
    std::fill(qkd_row + i + 1, qkd_row + L, 0.0f);
    std::fill(kkd_row + i, kkd_row + L, 0.0f);
  }
  // (I + A) P = I by forward substitution, one row at a time: row i of P is
  // e_i - sum_{m < i} A_im (row m of P) with A_im = beta_i kkd_im. Each block of 16 columns is
  // summed in registers (updating the row in memory would chain every m through a store and a
  // load), and rows m < j0 are zero in the block from column j0 on.
  constexpr std::int64_t kColumnBlock = 16;
  for (std::int64_t i = 0; i < L; ++i) {
    float* row = f.p + i * kChunk;
    const float* a_row = kkd + i * kChunk;
    for (std::int64_t j0 = 0; j0 < kChunk; j0 += kColumnBlock) {
      std::array<float, kColumnBlock> block{};
      for (std::int64_t m = j0; m < i; ++m) {
        const float a = c.beta[i] * a_row[m];
        const float* p_row = f.p + m * kChunk + j0;
        for (std::int64_t j = 0; j < kColumnBlock; ++j) block[j] -= a * p_row[j];
      }
      std::copy(block.begin(), block.end(), row + j0);
    }
    row[i] = 1.0f;
  }
  // [U | W] = (P diag(beta)) [V | diag(e^gamma) K].
  for (std::int64_t i = 0; i < L; ++i)
    for (std::int64_t j = 0; j < L; ++j)
      ops.scaled_p[i * kChunk + j] = f.p[i * kChunk + j] * c.beta[j];
  gemm_f32(kNo, kNo, L, width, L, 1.0f, ops.scaled_p.data(), kChunk, ops.vk.data(), width, 0.0f,
           ops.uw.data(), width);
  for (std::int64_t i = 0; i < L; ++i) {
    const float* uw_row = ops.uw.data() + i * width;
    std::copy_n(uw_row, d.dv, f.v_new + i * d.dv);
    std::copy_n(uw_row + d.dv, d.dk, ops.w_rows() + i * d.dk);
  }
}

// Turns f.v_new from U into V_new, writes the chunk's outputs (rows of stride v_stride) unless
// out is nullptr, and moves state [dk, dv] past the chunk.
void advance_chunk(const Chunk& c, const Dims& d, const ChunkForm& f, ChunkOperands& ops,
                   float* state, float* out) {
  const std::int64_t L = c.length;
  float* ws = ops.stacked.data();  // W S
  float* qs = ws + L * d.dv;       // Q S
  gemm_f32(kNo, kNo, 2 * L, d.dv, d.dk, 1.0f, ops.w_rows(), d.dk, state, d.dv, 0.0f, ws, d.dv);
  for (std::int64_t i = 0; i < L * d.dv; ++i) f.v_new[i] -= ws[i];
  if (out != nullptr) {
    float* o = qs;
    for (std::int64_t i = 0; i < L; ++i)
      for (std::int64_t j = 0; j < d.dv; ++j) o[i * d.dv + j] *= c.decay[i];
    gemm_f32(kNo, kNo, L, d.dv, L, 1.0f, f.qkd(), kChunk, f.v_new, d.dv, 1.0f, o, d.dv);
    scatter_rows(o, L, d.dv, out, d.v_stride, false);
  }
  float* tail_v_new = ws;
  for (std::int64_t i = 0; i < L; ++i)
    for (std::int64_t j = 0; j < d.dv; ++j)
      tail_v_new[i * d.dv + j] = c.tail[i] * f.v_new[i * d.dv + j];
  gemm_f32(kYes, kNo, d.dk, d.dv, L, 1.0f, ops.k_rows(L, d), d.dk, tail_v_new, d.dv, c.total_decay,
           state, d.dv);
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

// Per-thread scratch and outputs of the backward of one chunk.
struct BackwardScratch {
  std::vector<float> stacked_v;          // [2C x dv]: dV_new, then -diag(e^gamma) dO
  std::vector<float> stacked_k;          // [2C x dk]: stacked_v S^T
  std::vector<float> duw, pt_duw;        // [C x (dv + dk)]: [dU | dW] and P^T [dU | dW]
  std::vector<float> dout_rows, rows_v;  // [C x dv]
  std::vector<float> rows_k;             // [C x dk]
  std::vector<float> dm, dp, block;      // [C x C]
  std::vector<float> pair_terms;  // [C x C]: below the diagonal, dL/dD_ij D_ij summed over uses
  std::vector<float> dmt_dkk;     // [C x 2C]: [dM^T | d(K K^T)]
  // The chunk's gradients: dq, dk [C x dk] and dv [C x dv] rows, dg and dbeta per token.
  std::vector<float> dq, dk, dv;
  std::array<float, kChunk> dg{}, dbeta{};

  explicit BackwardScratch(const Dims& d)
      : stacked_v(2 * kChunk * d.dv),
        stacked_k(2 * kChunk * d.dk),
        duw(kChunk * (d.dv + d.dk)),
        pt_duw(kChunk * (d.dv + d.dk)),
        dout_rows(kChunk * d.dv),
        rows_v(kChunk * d.dv),
        rows_k(kChunk * d.dk),
        dm(kChunkArea),
        dp(kChunkArea),
        block(kChunkArea),
        pair_terms(kChunkArea),
        dmt_dkk(2 * kChunkArea),
        dq(kChunk * d.dk),
        dk(kChunk * d.dk),
        dv(kChunk * d.dv) {}
};

// The backward of one chunk into b.dq, b.dk, b.dv, b.dg and b.dbeta, given its form (f.v_new
// holding V_new), its packed operands (W, Q, K and [V | e^gamma K]), the state entering it, its
// rows of dout (row stride v_stride), and d_state = dL/dS' on entry; d_state leaves as dL/dS for
// the entering state.
void backward_chunk(const Chunk& c, const Dims& d, const ChunkForm& f, ChunkOperands& ops,
                    const float* state, const float* dout, float* d_state, BackwardScratch& b) {
  const std::int64_t L = c.length, width = d.dv + d.dk;
  const float* v_new = f.v_new;
  const float* qkd = f.qkd();
  const float* kkd = f.kkd(L);
  const float* pair_decay = f.pair_decay;
  const float* q_rows = ops.q_rows(L, d);
  const float* k_rows = ops.k_rows(L, d);
  float* dv_new = b.stacked_v.data();
  float* minus_decayed_dout = dv_new + L * d.dv;
  float* dout_rows = b.dout_rows.data();
  float* dm = b.dm.data();
  float* dp = b.dp.data();
  float* pair_terms = b.pair_terms.data();
  float* dq = b.dq.data();
  float* dk = b.dk.data();
  std::array<float, kChunk> dgamma{};
  b.dbeta.fill(0.0f);
  gather_rows(dout, L, d.v_stride, d.dv, dout_rows, d.dv);
  for (std::int64_t i = 0; i < L; ++i)
    for (std::int64_t j = 0; j < d.dv; ++j)
      minus_decayed_dout[i * d.dv + j] = -c.decay[i] * dout_rows[i * d.dv + j];

  // V_new feeds O through (Q K^T o D) and S' through K^T diag(tail).
  gemm_f32(kYes, kNo, L, d.dv, L, 1.0f, qkd, kChunk, dout_rows, d.dv, 0.0f, dv_new, d.dv);
  gemm_f32(kNo, kNo, L, d.dv, d.dk, 1.0f, k_rows, d.dk, d_state, d.dv, 0.0f, b.rows_v.data(), d.dv);
  for (std::int64_t i = 0; i < L; ++i)
    for (std::int64_t j = 0; j < d.dv; ++j)
      dv_new[i * d.dv + j] += c.tail[i] * b.rows_v[i * d.dv + j];

  // Both uses of S^T at once: [dV_new; -diag(e^gamma) dO] S^T. The first block is -dW
  // (V_new = U - W S); the second is -dQ from O's term diag(e^gamma) Q S, whose exponent gives
  // dgamma_i = q_i . dq_i.
  gemm_f32(kNo, kYes, 2 * L, d.dk, d.dv, 1.0f, b.stacked_v.data(), d.dv, state, d.dv, 0.0f,
           b.stacked_k.data(), d.dk);
  const float* minus_dw = b.stacked_k.data();
  const float* minus_dq = minus_dw + L * d.dk;
  for (std::int64_t i = 0; i < L * d.dk; ++i) dq[i] = -minus_dq[i];
  for (std::int64_t i = 0; i < L; ++i) dgamma[i] += dot(q_rows + i * d.dk, dq + i * d.dk, d.dk);
  for (std::int64_t i = 0; i < L; ++i) {
    float* duw_row = b.duw.data() + i * width;
    std::copy_n(dv_new + i * d.dv, d.dv, duw_row);
    for (std::int64_t e = 0; e < d.dk; ++e) duw_row[d.dv + e] = -minus_dw[i * d.dk + e];
  }

  // O = ... + M V_new with M = Q K^T o D: dM = dO V_new^T; dQ += (dM o D) K, dK = (dM o D)^T Q.
  // D_ij = e^(gamma_i - gamma_j) contributes dM_ij M_ij to dgamma_i and takes it from dgamma_j.
  gemm_f32(kNo, kYes, L, L, d.dv, 1.0f, dout_rows, d.dv, v_new, d.dv, 0.0f, dm, kChunk);
  for (std::int64_t i = 0; i < L; ++i) {
    float* dm_row = dm + i * kChunk;
    for (std::int64_t j = 0; j < i; ++j)
      pair_terms[i * kChunk + j] = dm_row[j] * qkd[i * kChunk + j];
    for (std::int64_t j = 0; j <= i; ++j) dm_row[j] *= pair_decay[i * kChunk + j];
    std::fill(dm_row + i + 1, dm_row + L, 0.0f);
  }

  // S' = e^gamma_L S + K^T diag(tail) V_new: dK = diag(tail) V_new dS'^T; the tail factors
  // e^(gamma_L - gamma_i) and e^gamma_L give dgamma.
  gemm_f32(kNo, kYes, L, d.dk, d.dv, 1.0f, v_new, d.dv, d_state, d.dv, 0.0f, b.rows_k.data(), d.dk);
  float dgamma_last = c.total_decay * dot(d_state, state, d.dk * d.dv);
  for (std::int64_t i = 0; i < L; ++i) {
    const float* x = b.rows_k.data() + i * d.dk;
    const float through_tail = c.tail[i] * dot(k_rows + i * d.dk, x, d.dk);
    dgamma[i] -= through_tail;
    dgamma_last += through_tail;
    for (std::int64_t e = 0; e < d.dk; ++e) dk[i * d.dk + e] = c.tail[i] * x[e];
  }
  dgamma[L - 1] += dgamma_last;

  // [U | W] = P diag(beta) [V | diag(e^gamma) K]: the scaled operands receive P^T [dU | dW].
  gemm_f32(kYes, kNo, L, width, L, 1.0f, f.p, kChunk, b.duw.data(), width, 0.0f, b.pt_duw.data(),
           width);
  for (std::int64_t j = 0; j < L; ++j) {
    const float* to_v = b.pt_duw.data() + j * width;
    const float* to_k = to_v + d.dv;
    b.dbeta[j] += dot(ops.vk.data() + j * width, to_v, d.dv);
    for (std::int64_t e = 0; e < d.dv; ++e) b.dv[j * d.dv + e] = c.beta[j] * to_v[e];
    const float through_k = c.decay[j] * dot(k_rows + j * d.dk, to_k, d.dk);
    b.dbeta[j] += through_k;
    dgamma[j] += c.beta[j] * through_k;
    const float scale = c.beta[j] * c.decay[j];
    for (std::int64_t e = 0; e < d.dk; ++e) dk[j * d.dk + e] += scale * to_k[e];
  }
  // dP = [dU | dW] (diag(beta) [V | diag(e^gamma) K])^T, then dA = -P^T dP P^T.
  gemm_f32(kNo, kYes, L, L, width, 1.0f, b.duw.data(), width, ops.vk.data(), width, 0.0f, dp,
           kChunk);
  for (std::int64_t i = 0; i < L; ++i)
    for (std::int64_t j = 0; j < L; ++j) dp[i * kChunk + j] *= c.beta[j];
  gemm_f32(kNo, kYes, L, L, L, 1.0f, dp, kChunk, f.p, kChunk, 0.0f, b.block.data(), kChunk);
  gemm_f32(kYes, kNo, L, L, L, -1.0f, f.p, kChunk, b.block.data(), kChunk, 0.0f, dp, kChunk);

  // A_ij = beta_i (K K^T)_ij D_ij below the diagonal. The right half of dmt_dkk becomes
  // d(K K^T), symmetrised because K appears on both sides; the left half is dM^T, so that
  // dK += [dM^T | d(K K^T)] [Q; K] is one product.
  float* dmt_dkk = b.dmt_dkk.data();
  constexpr std::int64_t ld = 2 * kChunk;
  for (std::int64_t i = 0; i < L; ++i) {
    for (std::int64_t j = 0; j < L; ++j) dmt_dkk[i * ld + j] = dm[j * kChunk + i];
    std::fill_n(dmt_dkk + i * ld + L, L, 0.0f);
  }
  for (std::int64_t i = 0; i < L; ++i) {
    const float* da = dp + i * kChunk;
    const float* kkd_row = kkd + i * kChunk;
    b.dbeta[i] += dot(da, kkd_row, i);
    for (std::int64_t j = 0; j < i; ++j) {
      pair_terms[i * kChunk + j] += c.beta[i] * da[j] * kkd_row[j];
      dmt_dkk[i * ld + L + j] = c.beta[i] * pair_decay[i * kChunk + j] * da[j];
    }
  }
  for (std::int64_t i = 0; i < L; ++i)
    for (std::int64_t j = 0; j < i; ++j) dmt_dkk[j * ld + L + i] = dmt_dkk[i * ld + L + j];
  gemm_f32(kNo, kNo, L, d.dk, L, 1.0f, dm, kChunk, k_rows, d.dk, 1.0f, dq, d.dk);
  gemm_f32(kNo, kNo, L, d.dk, 2 * L, 1.0f, dmt_dkk, ld, q_rows, d.dk, 1.0f, dk, d.dk);

  // The D factors' share: dgamma_i += sum_j pair_ij - sum_j pair_ji.
  std::array<float, kChunk> column{};
  for (std::int64_t i = 0; i < L; ++i) {
    const float* row = pair_terms + i * kChunk;
    dgamma[i] += sum(row, i);
    for (std::int64_t j = 0; j < i; ++j) column[j] += row[j];
  }
  // gamma_i = sum_{j <= i} g_j, so dg_j = sum_{i >= j} dgamma_i.
  float suffix = 0.0f;
  for (std::int64_t i = L - 1; i >= 0; --i) {
    suffix += dgamma[i] - column[i];
    b.dg[i] = suffix;
  }

  // The entering state feeds S' (e^gamma_L S), V_new (-W S) and O (diag(e^gamma) Q S):
  // dS = e^gamma_L dS' - [W; Q]^T [dV_new; -diag(e^gamma) dO].
  gemm_f32(kYes, kNo, d.dk, d.dv, 2 * L, -1.0f, ops.w_rows(), d.dk, b.stacked_v.data(), d.dv,
           c.total_decay, d_state, d.dv);
}

}  // namespace

void gated_delta_rule_forward(const GatedDeltaShape& s, const GatedDeltaInputs& in, float* out,
                              float* final_state) {
  gated_delta::check_shape("gated_delta_rule_forward", s);
  const Dims d = dims_of(s);
  const std::int64_t T = s.seq_len;
#pragma omp parallel
  {
    std::vector<float> p(kChunkArea), pair_decay(kChunkArea), scores(2 * kChunkArea);
    std::vector<float> v_new(kChunk * d.dv), state(d.dk * d.dv);
    ChunkOperands ops(d);
    const ChunkForm form{p.data(), pair_decay.data(), scores.data(), nullptr, v_new.data()};
#pragma omp for schedule(dynamic)
    for (std::int64_t h = 0; h < s.num_value_heads; ++h) {
      const HeadRows r(s, in, h);
      load_state(r, d, state);
      for (std::int64_t t0 = 0; t0 < T; t0 += kChunk) {
        const Chunk c(r, t0, std::min(kChunk, T - t0));
        pack_chunk(c, d, ops);
        prepare_chunk(c, d, form, ops);
        advance_chunk(c, d, form, ops, state.data(), out + t0 * d.v_stride + h * d.dv);
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
  // Value heads sharing a key head add their dq and dk rows under that key head's lock.
  std::vector<std::mutex> key_head_locks(s.num_key_heads);
#pragma omp parallel
  {
    // Every chunk's form and entering state, kept from the recomputed forward for the walk back.
    std::vector<float> p(chunks * kChunkArea), pair_decay(chunks * kChunkArea);
    std::vector<float> scores(chunks * 2 * kChunkArea), w(T * d.dk), v_new(T * d.dv);
    std::vector<float> states(chunks * state_size), state(state_size);
    ChunkOperands ops(d);
    BackwardScratch scratch(d);
    auto form_of = [&](std::int64_t chunk) {
      const std::int64_t t0 = chunk * kChunk;
      return ChunkForm{p.data() + chunk * kChunkArea, pair_decay.data() + chunk * kChunkArea,
                       scores.data() + chunk * 2 * kChunkArea, w.data() + t0 * d.dk,
                       v_new.data() + t0 * d.dv};
    };
#pragma omp for schedule(dynamic)
    for (std::int64_t h = 0; h < s.num_value_heads; ++h) {
      const HeadRows r(s, in, h);
      load_state(r, d, state);
      for (std::int64_t chunk = 0; chunk < chunks; ++chunk) {
        const Chunk c(r, chunk * kChunk, std::min(kChunk, T - chunk * kChunk));
        const ChunkForm form = form_of(chunk);
        std::copy(state.begin(), state.end(), states.begin() + chunk * state_size);
        pack_chunk(c, d, ops);
        prepare_chunk(c, d, form, ops);
        std::copy_n(ops.w_rows(), c.length * d.dk, form.w);
        advance_chunk(c, d, form, ops, state.data(), nullptr);
      }
      float* d_state = state.data();
      if (d_final_state != nullptr) {
        std::copy_n(d_final_state + h * state_size, state_size, d_state);
      } else {
        std::fill(state.begin(), state.end(), 0.0f);
      }
      for (std::int64_t chunk = chunks - 1; chunk >= 0; --chunk) {
        const std::int64_t t0 = chunk * kChunk, L = std::min(kChunk, T - t0);
        const Chunk c(r, t0, L);
        const ChunkForm form = form_of(chunk);
        pack_chunk(c, d, ops);
        std::copy_n(form.w, L * d.dk, ops.w_rows());
        backward_chunk(c, d, form, ops, states.data() + chunk * state_size,
                       dout + t0 * d.v_stride + h * d.dv, d_state, scratch);
        scatter_rows(scratch.dv.data(), L, d.dv, grads.dv + t0 * d.v_stride + h * d.dv, d.v_stride,
                     false);
        for (std::int64_t i = 0; i < L; ++i) {
          grads.dg[(t0 + i) * r.gate_stride + h] = scratch.dg[i];
          grads.dbeta[(t0 + i) * r.gate_stride + h] = scratch.dbeta[i];
        }
        const std::int64_t key_offset = t0 * d.qk_stride + r.key_head * d.dk;
        const std::lock_guard<std::mutex> lock(key_head_locks[r.key_head]);
        scatter_rows(scratch.dq.data(), L, d.dk, grads.dq + key_offset, d.qk_stride, true);
        scatter_rows(scratch.dk.data(), L, d.dk, grads.dk + key_offset, d.qk_stride, true);
      }
      if (grads.d_initial_state != nullptr) {
        std::copy_n(d_state, state_size, grads.d_initial_state + h * state_size);
      }
    }
  }
}

}  // namespace pq::runtime
