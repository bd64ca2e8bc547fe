#include "runtime/kernels/gemm.h"

#include <cblas.h>

#include <algorithm>
#include <climits>
#include <functional>
#include <mutex>
#include <oneapi/dnnl/dnnl.hpp>
#include <unordered_map>
#include <vector>

#include "common/cpu_features.h"
#include "common/error.h"

namespace pq::runtime {
namespace {

bool is_trans(Transpose t) {
  return t == Transpose::kYes;
}

// Rows and columns of an operand as stored, given the [rows, cols] of its op().
std::int64_t stored_rows(Transpose t, std::int64_t op_rows, std::int64_t op_cols) {
  return is_trans(t) ? op_cols : op_rows;
}
std::int64_t stored_cols(Transpose t, std::int64_t op_rows, std::int64_t op_cols) {
  return is_trans(t) ? op_rows : op_cols;
}

void check_gemm_args(const char* what, Transpose ta, Transpose tb, std::int64_t m, std::int64_t n,
                     std::int64_t k, std::int64_t lda, std::int64_t ldb, std::int64_t ldc) {
  PQ_CHECK(m >= 0 && n >= 0 && k >= 0, "{}: negative size m={} n={} k={}", what, m, n, k);
  PQ_CHECK(lda >= std::max<std::int64_t>(1, stored_cols(ta, m, k)) &&
               ldb >= std::max<std::int64_t>(1, stored_cols(tb, k, n)) &&
               ldc >= std::max<std::int64_t>(1, n),
           "{}: leading dimension too small (m={} n={} k={} lda={} ldb={} ldc={})", what, m, n, k,
           lda, ldb, ldc);
}

// C = beta * C over an [m, n] block; beta == 0 writes zeros without reading C.
void scale_c(std::int64_t m, std::int64_t n, float beta, float* c, std::int64_t ldc) {
  if (beta == 1.0f) return;
  for (std::int64_t i = 0; i < m; ++i) {
    float* row = c + i * ldc;
    if (beta == 0.0f) {
      std::fill(row, row + n, 0.0f);
    } else {
      for (std::int64_t j = 0; j < n; ++j) row[j] *= beta;
    }
  }
}

// ---- oneDNN matmul, one cached primitive per shape and input type -----------------------------

struct MatmulKey {
  dnnl::memory::data_type input_type;  // of A and B; C is always f32
  bool trans_a, trans_b;
  std::int64_t m, n, k, lda, ldb, ldc;
  float alpha;
  bool accumulate;  // dst += product (sum post-op) instead of dst = product
  bool operator==(const MatmulKey&) const = default;
};

struct MatmulKeyHash {
  std::size_t operator()(const MatmulKey& key) const {
    std::size_t h = std::hash<std::int64_t>()(key.m);
    auto mix = [&h](std::size_t v) { h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2); };
    for (std::int64_t v : {key.n, key.k, key.lda, key.ldb, key.ldc})
      mix(std::hash<std::int64_t>()(v));
    mix(std::hash<float>()(key.alpha));
    mix((key.trans_a ? 1u : 0u) | (key.trans_b ? 2u : 0u) | (key.accumulate ? 4u : 0u) |
        (static_cast<unsigned>(key.input_type) << 3));
    return h;
  }
};

struct CachedMatmul {
  dnnl::matmul primitive;
  dnnl::memory::desc a_md, b_md, c_md, scratchpad_md;
};

class MatmulCache {
 public:
  // Creating a oneDNN primitive costs far more than a small GEMM, so shapes are kept; the runtime
  // uses a handful of shapes per model, and the bound only protects against unbounded growth.
  static constexpr std::size_t kMaxEntries = 1024;

  MatmulCache() : engine_(dnnl::engine::kind::cpu, 0) {}

  const dnnl::engine& engine() const { return engine_; }

  CachedMatmul get(const MatmulKey& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = entries_.find(key);
    if (it != entries_.end()) return it->second;
    if (entries_.size() >= kMaxEntries) entries_.clear();
    return entries_.emplace(key, create(key)).first->second;
  }

 private:
  CachedMatmul create(const MatmulKey& key) const {
    using dnnl::memory;
    using dims = memory::dims;
    // op(A)[i, p] lives at a[i * lda + p] (as stored) or a[p * lda + i] (transposed); strides
    // express both without copying. Likewise for B.
    const memory::desc a_md(dims{key.m, key.k}, key.input_type,
                            key.trans_a ? dims{1, key.lda} : dims{key.lda, 1});
    const memory::desc b_md(dims{key.k, key.n}, key.input_type,
                            key.trans_b ? dims{1, key.ldb} : dims{key.ldb, 1});
    const memory::desc c_md(dims{key.m, key.n}, memory::data_type::f32, dims{key.ldc, 1});
    dnnl::primitive_attr attr;
    // A scratchpad per call (not the library's shared one) keeps concurrent calls independent.
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    // oneDNN 2.x applies output scales before post-ops: dst = alpha * (A B) [+ dst].
    if (key.alpha != 1.0f) attr.set_output_scales(0, {key.alpha});
    if (key.accumulate) {
      dnnl::post_ops ops;
      ops.append_sum(1.0f);
      attr.set_post_ops(ops);
    }
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, c_md), attr, engine_);
    return CachedMatmul{dnnl::matmul(pd), a_md, b_md, c_md, pd.scratchpad_desc()};
  }

  dnnl::engine engine_;
  std::mutex mutex_;
  std::unordered_map<MatmulKey, CachedMatmul, MatmulKeyHash> entries_;
};

MatmulCache& matmul_cache() {
  static MatmulCache cache;
  return cache;
}

// C = alpha op(A) op(B) + beta C through a cached primitive; A and B hold input_type values.
void onednn_matmul(dnnl::memory::data_type input_type, Transpose ta, Transpose tb, std::int64_t m,
                   std::int64_t n, std::int64_t k, float alpha, const void* a, std::int64_t lda,
                   const void* b, std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
  // beta is folded into C first so that the primitive only needs "overwrite" or "accumulate".
  const bool accumulate = beta != 0.0f;
  if (accumulate) scale_c(m, n, beta, c, ldc);
  MatmulCache& cache = matmul_cache();
  const CachedMatmul mm = cache.get(
      MatmulKey{input_type, is_trans(ta), is_trans(tb), m, n, k, lda, ldb, ldc, alpha, accumulate});
  thread_local std::vector<std::uint8_t> scratchpad;
  scratchpad.resize(std::max<std::size_t>(scratchpad.size(), mm.scratchpad_md.get_size()));
  const dnnl::engine& engine = cache.engine();
  thread_local dnnl::stream stream(engine);
  dnnl::memory a_mem(mm.a_md, engine, const_cast<void*>(a));
  dnnl::memory b_mem(mm.b_md, engine, const_cast<void*>(b));
  dnnl::memory c_mem(mm.c_md, engine, c);
  dnnl::memory scratch_mem(mm.scratchpad_md, engine, scratchpad.data());
  mm.primitive.execute(stream, {{DNNL_ARG_SRC, a_mem},
                                {DNNL_ARG_WEIGHTS, b_mem},
                                {DNNL_ARG_DST, c_mem},
                                {DNNL_ARG_SCRATCHPAD, scratch_mem}});
  stream.wait();
}

// Widens a stored bf16 matrix [rows, cols] (row stride ld) into a dense fp32 one.
std::vector<float> widen(const std::uint16_t* src, std::int64_t rows, std::int64_t cols,
                         std::int64_t ld) {
  std::vector<float> out(static_cast<std::size_t>(rows * cols));
  for (std::int64_t r = 0; r < rows; ++r) {
    convert_bf16_to_f32(std::span(src + r * ld, static_cast<std::size_t>(cols)),
                        std::span(out.data() + r * cols, static_cast<std::size_t>(cols)));
  }
  return out;
}

}  // namespace

void gemm_f32(Transpose ta, Transpose tb, std::int64_t m, std::int64_t n, std::int64_t k,
              float alpha, const float* a, std::int64_t lda, const float* b, std::int64_t ldb,
              float beta, float* c, std::int64_t ldc) {
  check_gemm_args("gemm_f32", ta, tb, m, n, k, lda, ldb, ldc);
  if (m == 0 || n == 0) return;
  if (k == 0 || alpha == 0.0f) return scale_c(m, n, beta, c, ldc);
  if (cpu_features().has_avx512_core()) {
    // oneDNN's brgemm kernels reach about 1.7x OpenBLAS 0.3.21's sgemm on AVX-512 CPUs at the
    // runtime's shapes (bench_gemm); OpenBLAS remains the path for other CPUs.
    return onednn_matmul(dnnl::memory::data_type::f32, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta,
                         c, ldc);
  }
  PQ_CHECK(std::max({m, n, k, lda, ldb, ldc}) <= INT_MAX,
           "gemm_f32: size exceeds the BLAS integer range (m={} n={} k={})", m, n, k);
  cblas_sgemm(CblasRowMajor, is_trans(ta) ? CblasTrans : CblasNoTrans,
              is_trans(tb) ? CblasTrans : CblasNoTrans, static_cast<int>(m), static_cast<int>(n),
              static_cast<int>(k), alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta,
              c, static_cast<int>(ldc));
}

void gram_upper_f32(std::int64_t n, std::int64_t k, float alpha, const float* a, std::int64_t lda,
                    float beta, float* c, std::int64_t ldc) {
  PQ_CHECK(n >= 0 && k >= 0 && lda >= std::max<std::int64_t>(n, 1) &&
               ldc >= std::max<std::int64_t>(n, 1),
           "gram_upper_f32: bad arguments (n={} k={} lda={} ldc={})", n, k, lda, ldc);
  PQ_CHECK(std::max({n, k, lda, ldc}) <= INT_MAX,
           "gram_upper_f32: size exceeds the BLAS integer range (n={} k={})", n, k);
  if (n == 0) return;
  cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, static_cast<int>(n), static_cast<int>(k),
              alpha, a, static_cast<int>(lda), beta, c, static_cast<int>(ldc));
}

void mirror_upper_triangle(std::int64_t n, float* c, std::int64_t ldc) {
  // Tiles keep both the rows read and the rows written in cache.
  constexpr std::int64_t kTile = 64;
#pragma omp parallel for schedule(dynamic)
  for (std::int64_t i0 = 0; i0 < n; i0 += kTile) {
    for (std::int64_t j0 = 0; j0 <= i0; j0 += kTile) {
      for (std::int64_t i = i0; i < std::min(i0 + kTile, n); ++i) {
        for (std::int64_t j = j0; j < std::min({j0 + kTile, i, n}); ++j) {
          c[i * ldc + j] = c[j * ldc + i];
        }
      }
    }
  }
}

void gemm_bf16(Transpose ta, Transpose tb, std::int64_t m, std::int64_t n, std::int64_t k,
               float alpha, const std::uint16_t* a, std::int64_t lda, const std::uint16_t* b,
               std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
  check_gemm_args("gemm_bf16", ta, tb, m, n, k, lda, ldb, ldc);
  if (m == 0 || n == 0) return;
  if (k == 0 || alpha == 0.0f) return scale_c(m, n, beta, c, ldc);
  if (cpu_features().has_avx512_core()) {
    return onednn_matmul(dnnl::memory::data_type::bf16, ta, tb, m, n, k, alpha, a, lda, b, ldb,
                         beta, c, ldc);
  }
  // Without AVX-512 oneDNN only has slow reference bf16 kernels; bf16 -> fp32 is exact and every
  // bf16 product is exact in fp32, so sgemm on widened inputs computes the same thing.
  const std::vector<float> a32 = widen(a, stored_rows(ta, m, k), stored_cols(ta, m, k), lda);
  const std::vector<float> b32 = widen(b, stored_rows(tb, k, n), stored_cols(tb, k, n), ldb);
  gemm_f32(ta, tb, m, n, k, alpha, a32.data(), stored_cols(ta, m, k), b32.data(),
           stored_cols(tb, k, n), beta, c, ldc);
}

void gemm_reference(Transpose ta, Transpose tb, std::int64_t m, std::int64_t n, std::int64_t k,
                    float alpha, const float* a, std::int64_t lda, const float* b, std::int64_t ldb,
                    float beta, float* c, std::int64_t ldc) {
  check_gemm_args("gemm_reference", ta, tb, m, n, k, lda, ldb, ldc);
  for (std::int64_t i = 0; i < m; ++i) {
    for (std::int64_t j = 0; j < n; ++j) {
      double sum = 0.0;
      for (std::int64_t p = 0; p < k; ++p) {
        const float av = is_trans(ta) ? a[p * lda + i] : a[i * lda + p];
        const float bv = is_trans(tb) ? b[j * ldb + p] : b[p * ldb + j];
        sum += static_cast<double>(av) * static_cast<double>(bv);
      }
      float& out = c[i * ldc + j];
      const double prior = beta == 0.0f ? 0.0 : static_cast<double>(beta) * out;
      out = static_cast<float>(static_cast<double>(alpha) * sum + prior);
    }
  }
}

}  // namespace pq::runtime
