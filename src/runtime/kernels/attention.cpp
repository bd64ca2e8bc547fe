#include "runtime/kernels/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/error.h"

namespace pq::runtime {
namespace {

// Query and key tile sizes: a [64 x 64] score tile plus [64 x D] operands stay in L2 for D <= 256.
constexpr std::int64_t kQueryTile = 64;
constexpr std::int64_t kKeyTile = 64;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

void check_shape(const char* what, const AttentionShape& s) {
  PQ_CHECK(s.seq_len >= 0 && s.num_heads > 0 && s.num_kv_heads > 0 && s.head_dim > 0 &&
               s.sliding_window >= 0 && s.num_heads % s.num_kv_heads == 0,
           "{}: invalid shape T={} H={} Hkv={} D={} window={}", what, s.seq_len, s.num_heads,
           s.num_kv_heads, s.head_dim, s.sliding_window);
}

// The keys query i may attend to are [first_key(i), i].
std::int64_t first_key(const AttentionShape& s, std::int64_t i) {
  return s.sliding_window > 0 ? std::max<std::int64_t>(0, i - s.sliding_window + 1) : 0;
}

// One past the last query that sees key j.
std::int64_t query_end(const AttentionShape& s, std::int64_t j) {
  return s.sliding_window > 0 ? std::min(s.seq_len, j + s.sliding_window) : s.seq_len;
}

bool visible(const AttentionShape& s, std::int64_t i, std::int64_t j) {
  return j <= i && (s.sliding_window == 0 || j > i - s.sliding_window);
}

// Strided views of one head inside the [T, heads * D] activations.
struct HeadView {
  const float* base;
  std::int64_t stride;
  const float* row(std::int64_t t) const { return base + t * stride; }
};

// dst[d][j] = src.row(j0 + j)[d] for j < cols: a key tile transposed so that products with it
// run along contiguous memory.
void transpose_tile(HeadView src, std::int64_t j0, std::int64_t cols, std::int64_t dim,
                    float* dst) {
  for (std::int64_t j = 0; j < cols; ++j) {
    const float* r = src.row(j0 + j);
    for (std::int64_t d = 0; d < dim; ++d) dst[d * kKeyTile + j] = r[d];
  }
}

// s[i][j] = scale * sum_d a.row(i0 + i)[d] * bt[d][j] for an [rows x cols] tile.
void scores_tile(HeadView a, std::int64_t i0, std::int64_t rows, const float* bt, std::int64_t cols,
                 std::int64_t dim, float scale, float* s) {
  for (std::int64_t i = 0; i < rows; ++i) {
    float* srow = s + i * kKeyTile;
    std::fill(srow, srow + cols, 0.0f);
    const float* arow = a.row(i0 + i);
    for (std::int64_t d = 0; d < dim; ++d) {
      const float av = arow[d];
      const float* brow = bt + d * kKeyTile;
      for (std::int64_t j = 0; j < cols; ++j) srow[j] += av * brow[j];
    }
    for (std::int64_t j = 0; j < cols; ++j) srow[j] *= scale;
  }
}

void axpy(std::int64_t n, float alpha, const float* x, float* y) {
  for (std::int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

struct Views {
  HeadView q, k, v;
};

Views head_views(const AttentionShape& s, const float* q, const float* k, const float* v,
                 std::int64_t h) {
  const std::int64_t group = s.num_heads / s.num_kv_heads;
  const std::int64_t g = h / group;
  const std::int64_t q_stride = s.num_heads * s.head_dim;
  const std::int64_t kv_stride = s.num_kv_heads * s.head_dim;
  return {{q + h * s.head_dim, q_stride},
          {k + g * s.head_dim, kv_stride},
          {v + g * s.head_dim, kv_stride}};
}

}  // namespace

void causal_attention_forward(const AttentionShape& s, const float* q, const float* k,
                              const float* v, float* out, float* lse) {
  check_shape("causal_attention_forward", s);
  const std::int64_t T = s.seq_len, D = s.head_dim;
  const std::int64_t q_tiles = (T + kQueryTile - 1) / kQueryTile;
  const std::int64_t q_stride = s.num_heads * D;
#pragma omp parallel
  {
    std::vector<float> kt(static_cast<std::size_t>(D * kKeyTile));
    std::vector<float> scores(static_cast<std::size_t>(kQueryTile * kKeyTile));
    std::vector<float> acc(static_cast<std::size_t>(kQueryTile * D));
    std::vector<float> row_max(kQueryTile), row_sum(kQueryTile);
#pragma omp for schedule(dynamic) collapse(2)
    for (std::int64_t h = 0; h < s.num_heads; ++h) {
      for (std::int64_t tile = 0; tile < q_tiles; ++tile) {
        const Views view = head_views(s, q, k, v, h);
        const std::int64_t i0 = tile * kQueryTile;
        const std::int64_t rows = std::min(kQueryTile, T - i0);
        std::fill(acc.begin(), acc.end(), 0.0f);
        std::fill(row_max.begin(), row_max.end(), kNegInf);
        std::fill(row_sum.begin(), row_sum.end(), 0.0f);
        const std::int64_t key_end = i0 + rows;
        for (std::int64_t j0 = first_key(s, i0); j0 < key_end; j0 += kKeyTile) {
          const std::int64_t cols = std::min(kKeyTile, key_end - j0);
          transpose_tile(view.k, j0, cols, D, kt.data());
          scores_tile(view.q, i0, rows, kt.data(), cols, D, s.scale, scores.data());
          for (std::int64_t i = 0; i < rows; ++i) {
            float* srow = scores.data() + i * kKeyTile;
            float tile_max = kNegInf;
            for (std::int64_t j = 0; j < cols; ++j) {
              if (!visible(s, i0 + i, j0 + j)) srow[j] = kNegInf;
              tile_max = std::max(tile_max, srow[j]);
            }
            if (tile_max == kNegInf) continue;  // no visible key of this row in this tile
            // Online softmax: rescale what was accumulated against the new running maximum.
            const float new_max = std::max(row_max[i], tile_max);
            const float correction = std::exp(row_max[i] - new_max);
            float* arow = acc.data() + i * D;
            float tile_sum = 0.0f;
            for (std::int64_t d = 0; d < D; ++d) arow[d] *= correction;
            for (std::int64_t j = 0; j < cols; ++j) {
              const float p = std::exp(srow[j] - new_max);
              tile_sum += p;
              if (p != 0.0f) axpy(D, p, view.v.row(j0 + j), arow);
            }
            row_sum[i] = row_sum[i] * correction + tile_sum;
            row_max[i] = new_max;
          }
        }
        for (std::int64_t i = 0; i < rows; ++i) {
          const float inv = 1.0f / row_sum[i];
          float* orow = out + (i0 + i) * q_stride + h * D;
          for (std::int64_t d = 0; d < D; ++d) orow[d] = acc[i * D + d] * inv;
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
  const std::int64_t T = s.seq_len, D = s.head_dim, H = s.num_heads;
  const std::int64_t group = H / s.num_kv_heads;
  const std::int64_t q_stride = H * D;
  const std::int64_t kv_stride = s.num_kv_heads * D;

  // delta[h][i] = sum_d dout[i,h,d] * out[i,h,d] = sum_j P[i][j] dP[i][j], the softmax-backward
  // row term (FlashAttention-2, Dao 2023, Algorithm 2).
  std::vector<float> delta(static_cast<std::size_t>(H * T));
#pragma omp parallel for collapse(2)
  for (std::int64_t h = 0; h < H; ++h) {
    for (std::int64_t i = 0; i < T; ++i) {
      const float* o = out + i * q_stride + h * D;
      const float* g = dout + i * q_stride + h * D;
      float sum = 0.0f;
      for (std::int64_t d = 0; d < D; ++d) sum += o[d] * g[d];
      delta[h * T + i] = sum;
    }
  }

  // Recomputes P and dS = P * (dP - delta) for one [rows x cols] tile of head h.
  auto ds_tile = [&](std::int64_t h, const Views& view, HeadView dout_view, std::int64_t i0,
                     std::int64_t rows, std::int64_t j0, std::int64_t cols, float* kt, float* vt,
                     float* p, float* ds) {
    transpose_tile(view.k, j0, cols, D, kt);
    transpose_tile(view.v, j0, cols, D, vt);
    scores_tile(view.q, i0, rows, kt, cols, D, s.scale, p);
    scores_tile(dout_view, i0, rows, vt, cols, D, 1.0f, ds);
    for (std::int64_t i = 0; i < rows; ++i) {
      const float row_lse = lse[h * T + i0 + i];
      const float row_delta = delta[h * T + i0 + i];
      for (std::int64_t j = 0; j < cols; ++j) {
        float& pij = p[i * kKeyTile + j];
        pij = visible(s, i0 + i, j0 + j) ? std::exp(pij - row_lse) : 0.0f;
        float& dsij = ds[i * kKeyTile + j];
        dsij = pij * (dsij - row_delta);
      }
    }
  };

  const std::int64_t k_tiles = (T + kKeyTile - 1) / kKeyTile;
  const std::int64_t q_tiles = (T + kQueryTile - 1) / kQueryTile;
#pragma omp parallel
  {
    std::vector<float> kt(static_cast<std::size_t>(D * kKeyTile));
    std::vector<float> vt(static_cast<std::size_t>(D * kKeyTile));
    std::vector<float> p(static_cast<std::size_t>(kQueryTile * kKeyTile));
    std::vector<float> ds(static_cast<std::size_t>(kQueryTile * kKeyTile));
    // Pass 1: dK and dV, one task per (kv head, key tile) so that no two tasks write the same rows.
#pragma omp for schedule(dynamic) collapse(2)
    for (std::int64_t g = 0; g < s.num_kv_heads; ++g) {
      for (std::int64_t ktile = 0; ktile < k_tiles; ++ktile) {
        const std::int64_t j0 = ktile * kKeyTile;
        const std::int64_t cols = std::min(kKeyTile, T - j0);
        for (std::int64_t j = 0; j < cols; ++j) {
          std::fill_n(dk + (j0 + j) * kv_stride + g * D, D, 0.0f);
          std::fill_n(dv + (j0 + j) * kv_stride + g * D, D, 0.0f);
        }
        const std::int64_t last_query_end = query_end(s, j0 + cols - 1);
        for (std::int64_t h = g * group; h < (g + 1) * group; ++h) {
          const Views view = head_views(s, q, k, v, h);
          const HeadView dout_view{dout + h * D, q_stride};
          for (std::int64_t i0 = j0 - j0 % kQueryTile; i0 < last_query_end; i0 += kQueryTile) {
            const std::int64_t rows = std::min(kQueryTile, T - i0);
            ds_tile(h, view, dout_view, i0, rows, j0, cols, kt.data(), vt.data(), p.data(),
                    ds.data());
            for (std::int64_t i = 0; i < rows; ++i) {
              for (std::int64_t j = 0; j < cols; ++j) {
                const float pij = p[i * kKeyTile + j];
                if (pij == 0.0f) continue;
                axpy(D, pij, dout_view.row(i0 + i), dv + (j0 + j) * kv_stride + g * D);
                axpy(D, s.scale * ds[i * kKeyTile + j], view.q.row(i0 + i),
                     dk + (j0 + j) * kv_stride + g * D);
              }
            }
          }
        }
      }
    }
    // Pass 2: dQ, one task per (head, query tile).
#pragma omp for schedule(dynamic) collapse(2)
    for (std::int64_t h = 0; h < H; ++h) {
      for (std::int64_t qtile = 0; qtile < q_tiles; ++qtile) {
        const Views view = head_views(s, q, k, v, h);
        const HeadView dout_view{dout + h * D, q_stride};
        const std::int64_t i0 = qtile * kQueryTile;
        const std::int64_t rows = std::min(kQueryTile, T - i0);
        for (std::int64_t i = 0; i < rows; ++i)
          std::fill_n(dq + (i0 + i) * q_stride + h * D, D, 0.0f);
        const std::int64_t first = first_key(s, i0);
        for (std::int64_t j0 = first - first % kKeyTile; j0 < i0 + rows; j0 += kKeyTile) {
          const std::int64_t cols = std::min(kKeyTile, T - j0);
          ds_tile(h, view, dout_view, i0, rows, j0, cols, kt.data(), vt.data(), p.data(),
                  ds.data());
          for (std::int64_t i = 0; i < rows; ++i) {
            float* dqrow = dq + (i0 + i) * q_stride + h * D;
            for (std::int64_t j = 0; j < cols; ++j) {
              const float dsij = ds[i * kKeyTile + j];
              if (dsij != 0.0f) axpy(D, s.scale * dsij, view.k.row(j0 + j), dqrow);
            }
          }
        }
      }
    }
  }
}

}  // namespace pq::runtime
