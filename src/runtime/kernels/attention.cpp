#include "runtime/kernels/attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/cpu_features.h"
#include "common/error.h"
#include "runtime/kernels/simd.h"

// Flash-attention style tiling (Dao et al., FlashAttention-2, 2023, Algorithms 1 and 2): scores
// are produced one [query tile x key tile] block at a time with an online softmax, and the
// backward recomputes the probabilities from the saved log-sum-exp instead of storing them.
namespace pq::runtime {
namespace {

// A [64 x 64] score tile and [64 x D] operand tiles stay in L1/L2 for head_dim <= 256.
constexpr std::int64_t kQueryTile = 64;
constexpr std::int64_t kKeyTile = 64;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---- tile primitives (scalar versions; AVX-512 and AVX2 versions in attention_avx512.cpp,
// attention_avx2.cpp) ------------

// C[m, n] += alpha * A[m, k] B[k, n] with A(i, p) = a[i * a_row_stride + p * a_col_stride] (so
// transposed views of A are free), B rows contiguous (row p at b + p * ldb), C rows at c + i * ldc.
void tile_gemm_scalar(std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a,
                      std::int64_t a_row_stride, std::int64_t a_col_stride, const float* b,
                      std::int64_t ldb, float* c, std::int64_t ldc) {
  for (std::int64_t i = 0; i < m; ++i) {
    float* c_row = c + i * ldc;
    for (std::int64_t p = 0; p < k; ++p) {
      const float av = alpha * a[i * a_row_stride + p * a_col_stride];
      const float* b_row = b + p * ldb;
      for (std::int64_t j = 0; j < n; ++j) c_row[j] += av * b_row[j];
    }
  }
}

// x[j] = exp(x[j] - shift) for j < n (exp(-inf) = 0); returns the sum of the results.
float exp_shifted_scalar(float* x, std::int64_t n, float shift) {
  float sum = 0.0f;
  for (std::int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

struct TileOps {
  decltype(&tile_gemm_scalar) gemm;
  decltype(&exp_shifted_scalar) exp_shifted;
};

TileOps tile_ops() {
  if (cpu_features().has_avx512_core()) return {avx512::tile_gemm, avx512::exp_shifted};
  if (cpu_features().has_avx2_fma()) return {avx2::tile_gemm, avx2::exp_shifted};
  return {tile_gemm_scalar, exp_shifted_scalar};
}

// ---- geometry ---------------------------------------------------------------------------------

void check_shape(const char* what, const AttentionShape& s) {
  PQ_CHECK(s.seq_len >= 0 && s.num_heads > 0 && s.num_kv_heads > 0 && s.head_dim > 0 &&
               s.sliding_window >= 0 && s.num_heads % s.num_kv_heads == 0,
           "{}: invalid shape T={} H={} Hkv={} D={} window={}", what, s.seq_len, s.num_heads,
           s.num_kv_heads, s.head_dim, s.sliding_window);
}

// The keys query i attends to are [first_key(i), i].
std::int64_t first_key(const AttentionShape& s, std::int64_t i) {
  return s.sliding_window > 0 ? std::max<std::int64_t>(0, i - s.sliding_window + 1) : 0;
}

// One past the last query that attends to key j.
std::int64_t query_end(const AttentionShape& s, std::int64_t j) {
  return s.sliding_window > 0 ? std::min(s.seq_len, j + s.sliding_window) : s.seq_len;
}

// Pointers and strides of everything one call reads or writes, with per-head offsets.
struct Layout {
  const AttentionShape& s;
  std::int64_t q_stride, kv_stride, group;

  explicit Layout(const AttentionShape& shape)
      : s(shape),
        q_stride(shape.num_heads * shape.head_dim),
        kv_stride(shape.num_kv_heads * shape.head_dim),
        group(shape.num_heads / shape.num_kv_heads) {}

  std::int64_t q_offset(std::int64_t t, std::int64_t h) const {
    return t * q_stride + h * s.head_dim;
  }
  std::int64_t kv_offset(std::int64_t t, std::int64_t g) const {
    return t * kv_stride + g * s.head_dim;
  }
};

// Per kv head, x [T, Hkv*D] rearranged to [Hkv][D][T] so that score tiles (q . k over D) read
// contiguous key rows: O(T * D) per kv head, the size of x itself.
std::vector<float> transpose_heads(const Layout& l, const float* x) {
  const std::int64_t T = l.s.seq_len, D = l.s.head_dim;
  const std::int64_t t_blocks = (T + kKeyTile - 1) / kKeyTile;
  std::vector<float> out(static_cast<std::size_t>(l.s.num_kv_heads * D * T));
  // Blocks of kKeyTile positions: their D-wide rows stay in L1 while every d is written out.
#pragma omp parallel for collapse(2) schedule(static)
  for (std::int64_t g = 0; g < l.s.num_kv_heads; ++g) {
    for (std::int64_t block = 0; block < t_blocks; ++block) {
      const std::int64_t t0 = block * kKeyTile, t1 = std::min(T, t0 + kKeyTile);
      for (std::int64_t d = 0; d < D; ++d) {
        float* dst = out.data() + (g * D + d) * T;
        for (std::int64_t t = t0; t < t1; ++t) dst[t] = x[l.kv_offset(t, g) + d];
      }
    }
  }
  return out;
}

// scores[i][j] = scale * q_{i0+i} . k_{j0+j} of head h, with keys outside each query's window
// set to -inf. scores has row stride kKeyTile.
void score_tile(const TileOps& ops, const Layout& l, const float* q, const float* kt,
                std::int64_t h, std::int64_t i0, std::int64_t rows, std::int64_t j0,
                std::int64_t cols, float* scores) {
  const std::int64_t T = l.s.seq_len, D = l.s.head_dim;
  for (std::int64_t i = 0; i < rows; ++i) std::fill_n(scores + i * kKeyTile, cols, 0.0f);
  ops.gemm(rows, cols, D, l.s.scale, q + l.q_offset(i0, h), l.q_stride, 1,
           kt + (h / l.group) * D * T + j0, T, scores, kKeyTile);
  for (std::int64_t i = 0; i < rows; ++i) {
    float* row = scores + i * kKeyTile;
    const std::int64_t lo = std::clamp(first_key(l.s, i0 + i) - j0, std::int64_t{0}, cols);
    const std::int64_t hi = std::clamp(i0 + i + 1 - j0, std::int64_t{0}, cols);
    std::fill(row, row + lo, kNegInf);
    std::fill(row + hi, row + cols, kNegInf);
  }
}

}  // namespace

void causal_attention_forward(const AttentionShape& s, const float* q, const float* k,
                              const float* v, float* out, float* lse) {
  check_shape("causal_attention_forward", s);
  const TileOps ops = tile_ops();
  const Layout l(s);
  const std::int64_t T = s.seq_len, D = s.head_dim;
  const std::int64_t q_tiles = (T + kQueryTile - 1) / kQueryTile;
  const std::vector<float> kt = transpose_heads(l, k);
#pragma omp parallel
  {
    std::vector<float> scores(static_cast<std::size_t>(kQueryTile * kKeyTile));
    std::vector<float> acc(static_cast<std::size_t>(kQueryTile * D));
    std::vector<float> row_max(kQueryTile), row_sum(kQueryTile);
#pragma omp for collapse(2) schedule(dynamic)
    for (std::int64_t h = 0; h < s.num_heads; ++h) {
      for (std::int64_t tile_index = 0; tile_index < q_tiles; ++tile_index) {
        // Late query tiles see the most keys; handing them out first balances the threads.
        const std::int64_t i0 = (q_tiles - 1 - tile_index) * kQueryTile;
        const std::int64_t rows = std::min(kQueryTile, T - i0);
        std::fill(acc.begin(), acc.end(), 0.0f);
        std::fill(row_max.begin(), row_max.end(), kNegInf);
        std::fill(row_sum.begin(), row_sum.end(), 0.0f);
        for (std::int64_t j0 = first_key(s, i0); j0 < i0 + rows; j0 += kKeyTile) {
          const std::int64_t cols = std::min(kKeyTile, i0 + rows - j0);
          score_tile(ops, l, q, kt.data(), h, i0, rows, j0, cols, scores.data());
          for (std::int64_t i = 0; i < rows; ++i) {
            float* p = scores.data() + i * kKeyTile;
            const float tile_max = *std::max_element(p, p + cols);
            const float new_max = std::max(row_max[i], tile_max);
            if (new_max == kNegInf) {  // nothing visible to this row yet
              std::fill_n(p, cols, 0.0f);
              continue;
            }
            // Online softmax: rescale what was accumulated against the new running maximum.
            const float correction = std::exp(row_max[i] - new_max);
            row_sum[i] = row_sum[i] * correction + ops.exp_shifted(p, cols, new_max);
            row_max[i] = new_max;
            float* acc_row = acc.data() + i * D;
            for (std::int64_t d = 0; d < D; ++d) acc_row[d] *= correction;
          }
          ops.gemm(rows, D, cols, 1.0f, scores.data(), kKeyTile, 1,
                   v + l.kv_offset(j0, h / l.group), l.kv_stride, acc.data(), D);
        }
        for (std::int64_t i = 0; i < rows; ++i) {
          const float inv = 1.0f / row_sum[i];
          float* out_row = out + l.q_offset(i0 + i, h);
          for (std::int64_t d = 0; d < D; ++d) out_row[d] = acc[i * D + d] * inv;
          lse[h * T + i0 + i] = row_max[i] + std::log(row_sum[i]);
        }
      }
    }
  }
}

void causal_attention_backward(const AttentionShape& s, const float* q, const float* k,
                               const float* v, const float* out, const float* lse,
                               const float* dout, float* dq, float* dk, float* dv) {
  check_shape("causal_attention_backward", s);
  const TileOps ops = tile_ops();
  const Layout l(s);
  const std::int64_t T = s.seq_len, D = s.head_dim, H = s.num_heads;

  // delta[h][i] = dout_i . out_i = sum_j P_ij dP_ij, the row term of the softmax backward
  // (FlashAttention-2, Algorithm 2, line 4).
  std::vector<float> delta(static_cast<std::size_t>(H * T));
#pragma omp parallel for collapse(2) schedule(static)
  for (std::int64_t h = 0; h < H; ++h) {
    for (std::int64_t i = 0; i < T; ++i) {
      const float* o = out + l.q_offset(i, h);
      const float* g = dout + l.q_offset(i, h);
      float sum = 0.0f;
      for (std::int64_t d = 0; d < D; ++d) sum += o[d] * g[d];
      delta[h * T + i] = sum;
    }
  }
  const std::vector<float> kt = transpose_heads(l, k);
  const std::vector<float> vt = transpose_heads(l, v);

  // Recomputes P (into p) and dS = P * (dP - delta) (into ds) for one tile of head h, where
  // dP_ij = dout_i . v_j.
  auto probability_tiles = [&](std::int64_t h, std::int64_t i0, std::int64_t rows, std::int64_t j0,
                               std::int64_t cols, float* p, float* ds) {
    score_tile(ops, l, q, kt.data(), h, i0, rows, j0, cols, p);
    for (std::int64_t i = 0; i < rows; ++i) {
      ops.exp_shifted(p + i * kKeyTile, cols, lse[h * T + i0 + i]);
      std::fill_n(ds + i * kKeyTile, cols, 0.0f);
    }
    ops.gemm(rows, cols, D, 1.0f, dout + l.q_offset(i0, h), l.q_stride, 1,
             vt.data() + (h / l.group) * D * T + j0, T, ds, kKeyTile);
    for (std::int64_t i = 0; i < rows; ++i) {
      const float row_delta = delta[h * T + i0 + i];
      float* p_row = p + i * kKeyTile;
      float* ds_row = ds + i * kKeyTile;
      for (std::int64_t j = 0; j < cols; ++j) ds_row[j] = p_row[j] * (ds_row[j] - row_delta);
    }
  };

  // One task per (kv head, key tile) owns those rows of dk and dv and loops over the group's
  // query heads, so dK and dV need no synchronization. dQ rows receive contributions from every
  // key tile: each thread accumulates them in a dQ of its own (thread 0 directly in dq), and the
  // partial sums are added at the end. This computes every score tile once; computing dQ in a
  // separate pass per query tile would instead recompute P and dS.
  const std::int64_t k_tiles = (T + kKeyTile - 1) / kKeyTile;
  const std::int64_t q_size = T * l.q_stride;
  std::fill_n(dq, q_size, 0.0f);
  std::vector<std::vector<float>> dq_partials(static_cast<std::size_t>(omp_get_max_threads()));
#pragma omp parallel
  {
    std::vector<float> p(static_cast<std::size_t>(kQueryTile * kKeyTile));
    std::vector<float> ds(static_cast<std::size_t>(kQueryTile * kKeyTile));
    const int thread = omp_get_thread_num();
    float* my_dq = dq;
    if (thread > 0) {
      dq_partials[thread].assign(static_cast<std::size_t>(q_size), 0.0f);
      my_dq = dq_partials[thread].data();
    }
#pragma omp for collapse(2) schedule(dynamic)
    for (std::int64_t g = 0; g < s.num_kv_heads; ++g) {
      for (std::int64_t ktile = 0; ktile < k_tiles; ++ktile) {
        const std::int64_t j0 = ktile * kKeyTile;
        const std::int64_t cols = std::min(kKeyTile, T - j0);
        float* dk_tile = dk + l.kv_offset(j0, g);
        float* dv_tile = dv + l.kv_offset(j0, g);
        for (std::int64_t j = 0; j < cols; ++j) {
          std::fill_n(dk_tile + j * l.kv_stride, D, 0.0f);
          std::fill_n(dv_tile + j * l.kv_stride, D, 0.0f);
        }
        const std::int64_t i_end = query_end(s, j0 + cols - 1);
        for (std::int64_t h = g * l.group; h < (g + 1) * l.group; ++h) {
          for (std::int64_t i0 = j0; i0 < i_end; i0 += kQueryTile) {
            const std::int64_t rows = std::min(kQueryTile, i_end - i0);
            probability_tiles(h, i0, rows, j0, cols, p.data(), ds.data());
            // dV_j += P^T dout_i and dK_j += scale * dS^T q_i (P and dS read transposed), and
            // dQ_i += scale * dS k_j.
            ops.gemm(cols, D, rows, 1.0f, p.data(), 1, kKeyTile, dout + l.q_offset(i0, h),
                     l.q_stride, dv_tile, l.kv_stride);
            ops.gemm(cols, D, rows, s.scale, ds.data(), 1, kKeyTile, q + l.q_offset(i0, h),
                     l.q_stride, dk_tile, l.kv_stride);
            ops.gemm(rows, D, cols, s.scale, ds.data(), kKeyTile, 1, k + l.kv_offset(j0, g),
                     l.kv_stride, my_dq + l.q_offset(i0, h), l.q_stride);
          }
        }
      }
    }
  }
  for (std::size_t t = 1; t < dq_partials.size(); ++t) {
    if (dq_partials[t].empty()) continue;  // a thread of the team that was not started
    const float* partial = dq_partials[t].data();
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < q_size; ++i) dq[i] += partial[i];
  }
}

}  // namespace pq::runtime
