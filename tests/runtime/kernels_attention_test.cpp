#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "common/cpu_features.h"
#include "common/error.h"
#include "runtime/kernels/attention.h"
#include "runtime/kernels/simd.h"

namespace pq::runtime {
namespace {

struct Inputs {
  std::vector<float> q, k, v, dout;
};

Inputs random_inputs(const AttentionShape& s, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  auto make = [&](std::int64_t n) {
    std::vector<float> x(static_cast<std::size_t>(n));
    for (float& e : x) e = dist(rng);
    return x;
  };
  const std::int64_t T = s.seq_len;
  return {make(T * s.num_heads * s.head_dim), make(T * s.num_kv_heads * s.head_dim),
          make(T * s.num_kv_heads * s.head_dim), make(T * s.num_heads * s.head_dim)};
}

bool visible(const AttentionShape& s, std::int64_t i, std::int64_t j) {
  return j <= i && (s.sliding_window == 0 || i - j < s.sliding_window);
}

// Naive attention in double: materializes every softmax row.
struct Reference {
  std::vector<double> out, lse, dq, dk, dv;
};

template <typename T>
Reference naive(const AttentionShape& s, const std::vector<T>& q, const std::vector<T>& k,
                const std::vector<T>& v, const std::vector<T>& dout) {
  const std::int64_t T_ = s.seq_len, H = s.num_heads, D = s.head_dim, Hkv = s.num_kv_heads;
  const std::int64_t group = H / Hkv;
  Reference r;
  r.out.assign(T_ * H * D, 0.0);
  r.lse.assign(H * T_, 0.0);
  r.dq.assign(T_ * H * D, 0.0);
  r.dk.assign(T_ * Hkv * D, 0.0);
  r.dv.assign(T_ * Hkv * D, 0.0);
  auto qi = [&](std::int64_t t, std::int64_t h, std::int64_t d) { return (t * H + h) * D + d; };
  auto ki = [&](std::int64_t t, std::int64_t g, std::int64_t d) { return (t * Hkv + g) * D + d; };
  for (std::int64_t h = 0; h < H; ++h) {
    const std::int64_t g = h / group;
    for (std::int64_t i = 0; i < T_; ++i) {
      std::vector<double> score(T_, -INFINITY), p(T_, 0.0), dp(T_, 0.0);
      double mx = -INFINITY;
      for (std::int64_t j = 0; j < T_; ++j) {
        if (!visible(s, i, j)) continue;
        double dot = 0;
        for (std::int64_t d = 0; d < D; ++d) dot += double(q[qi(i, h, d)]) * double(k[ki(j, g, d)]);
        score[j] = dot * s.scale;
        mx = std::max(mx, score[j]);
      }
      double sum = 0;
      for (std::int64_t j = 0; j < T_; ++j) sum += visible(s, i, j) ? std::exp(score[j] - mx) : 0.0;
      r.lse[h * T_ + i] = mx + std::log(sum);
      double row_delta = 0;
      for (std::int64_t j = 0; j < T_; ++j) {
        if (!visible(s, i, j)) continue;
        p[j] = std::exp(score[j] - r.lse[h * T_ + i]);
        for (std::int64_t d = 0; d < D; ++d) {
          r.out[qi(i, h, d)] += p[j] * double(v[ki(j, g, d)]);
          dp[j] += double(dout[qi(i, h, d)]) * double(v[ki(j, g, d)]);
        }
        row_delta += p[j] * dp[j];
      }
      for (std::int64_t j = 0; j < T_; ++j) {
        if (!visible(s, i, j)) continue;
        const double ds = p[j] * (dp[j] - row_delta) * s.scale;
        for (std::int64_t d = 0; d < D; ++d) {
          r.dq[qi(i, h, d)] += ds * double(k[ki(j, g, d)]);
          r.dk[ki(j, g, d)] += ds * double(q[qi(i, h, d)]);
          r.dv[ki(j, g, d)] += p[j] * double(dout[qi(i, h, d)]);
        }
      }
    }
  }
  return r;
}

// max |got - ref| / max(1, max |ref|).
double relative_error(const std::vector<float>& got, const std::vector<double>& ref) {
  double worst = 0, scale = 1;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    worst = std::max(worst, std::abs(got[i] - ref[i]));
    scale = std::max(scale, std::abs(ref[i]));
  }
  return worst / scale;
}

struct Result {
  std::vector<float> out, lse, dq, dk, dv;
};

Result run_kernels(const AttentionShape& s, const Inputs& in) {
  Result r;
  r.out.assign(in.q.size(), 0.0f);
  r.lse.assign(s.num_heads * s.seq_len, 0.0f);
  r.dq.assign(in.q.size(), NAN);  // outputs must be overwritten, not accumulated
  r.dk.assign(in.k.size(), NAN);
  r.dv.assign(in.v.size(), NAN);
  causal_attention_forward(s, in.q.data(), in.k.data(), in.v.data(), r.out.data(), r.lse.data());
  causal_attention_backward(s, in.q.data(), in.k.data(), in.v.data(), r.out.data(), r.lse.data(),
                            in.dout.data(), r.dq.data(), r.dk.data(), r.dv.data());
  return r;
}

AttentionShape shape(std::int64_t T, std::int64_t H, std::int64_t Hkv, std::int64_t D,
                     std::int64_t window) {
  return {T, H, Hkv, D, 1.0f / std::sqrt(static_cast<float>(D)), window};
}

class AttentionVsNaive : public ::testing::TestWithParam<AttentionShape> {};

TEST_P(AttentionVsNaive, ForwardAndBackwardMatchDoublePrecision) {
  const AttentionShape s = GetParam();
  const Inputs in = random_inputs(s, static_cast<std::uint32_t>(s.seq_len * 31 + s.head_dim));
  const Reference ref = naive(s, in.q, in.k, in.v, in.dout);
  const Result got = run_kernels(s, in);
  EXPECT_LT(relative_error(got.out, ref.out), 2e-6);
  EXPECT_LT(relative_error(got.lse, ref.lse), 2e-6);
  EXPECT_LT(relative_error(got.dq, ref.dq), 1e-5);
  EXPECT_LT(relative_error(got.dk, ref.dk), 1e-5);
  EXPECT_LT(relative_error(got.dv, ref.dv), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, AttentionVsNaive,
    ::testing::Values(shape(1, 2, 1, 8, 0),       // a single token
                      shape(70, 4, 2, 16, 0),     // GQA, a partial second tile
                      shape(150, 3, 3, 32, 0),    // multi-head, three tiles
                      shape(200, 4, 1, 64, 37),   // sliding window inside a tile
                      shape(130, 2, 2, 8, 64),    // window equal to the tile size
                      shape(90, 6, 2, 24, 500),   // window longer than the sequence
                      shape(257, 2, 1, 128, 100)  // window spanning tiles, D = 128
                      ));

// Finite differences of the double-precision forward (loss = sum out * dout) check the backward's
// mathematics independently of the naive backward.
TEST(AttentionBackward, MatchesFiniteDifferences) {
  const AttentionShape s = shape(9, 4, 2, 4, 4);
  const Inputs in = random_inputs(s, 11);
  const Result got = run_kernels(s, in);
  std::vector<double> q(in.q.begin(), in.q.end()), k(in.k.begin(), in.k.end()),
      v(in.v.begin(), in.v.end()), dout(in.dout.begin(), in.dout.end());
  auto loss = [&]() {
    const Reference r = naive(s, q, k, v, dout);
    double sum = 0;
    for (std::size_t i = 0; i < r.out.size(); ++i) sum += r.out[i] * dout[i];
    return sum;
  };
  const double eps = 1e-5;
  auto check = [&](std::vector<double>& x, const std::vector<float>& grad, const char* name) {
    for (std::size_t i = 0; i < x.size(); ++i) {
      const double saved = x[i];
      x[i] = saved + eps;
      const double up = loss();
      x[i] = saved - eps;
      const double down = loss();
      x[i] = saved;
      EXPECT_NEAR(grad[i], (up - down) / (2 * eps), 1e-5) << name << "[" << i << "]";
    }
  };
  check(q, got.dq, "dq");
  check(k, got.dk, "dk");
  check(v, got.dv, "dv");
}

// A SIMD implementation of the attention tile primitives, tested when the CPU runs it.
struct TileKernels {
  std::string name;
  bool (*available)();
  decltype(&avx512::tile_gemm) tile_gemm;
  decltype(&avx512::exp_shifted) exp_shifted;
};

void PrintTo(const TileKernels& kernels, std::ostream* os) {
  *os << kernels.name;
}

std::string kernels_name(const ::testing::TestParamInfo<TileKernels>& info) {
  return info.param.name;
}

class AttentionSimdKernels : public ::testing::TestWithParam<TileKernels> {
 protected:
  void SetUp() override {
    if (!GetParam().available())
      GTEST_SKIP() << "this CPU does not run the " << GetParam().name << " kernels";
  }
};

// The SIMD exponentials are polynomial approximations; the attention tolerances above rely on
// them staying within a few ulp of libm.
TEST_P(AttentionSimdKernels, ExpShiftedMatchesLibm) {
  std::vector<float> x;
  for (float v = -110.0f; v <= 80.0f; v += 0.0137f) x.push_back(v);
  x.push_back(-INFINITY);
  x.push_back(0.0f);
  std::vector<float> got = x;
  const float shift = 0.5f;
  const float sum =
      GetParam().exp_shifted(got.data(), static_cast<std::int64_t>(got.size()), shift);
  double expected_sum = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double want = std::exp(static_cast<double>(x[i] - shift));  // the shift is in float
    expected_sum += want;
    // Relative accuracy for normal results; results below the normal range only need to be tiny.
    if (want > 1e-37) {
      ASSERT_NEAR(got[i] / want, 1.0, 4e-7) << "x=" << x[i];
    } else {
      ASSERT_LE(got[i], 1e-37f) << "x=" << x[i];
    }
  }
  EXPECT_EQ(got[x.size() - 2], 0.0f);  // exp(-inf) is exactly 0: masked keys contribute nothing
  EXPECT_NEAR(sum / expected_sum, 1.0, 1e-5);
}

TEST_P(AttentionSimdKernels, TileGemmMatchesReferenceWithStridedAndTransposedA) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (const auto [m, n, k] : {std::array<std::int64_t, 3>{1, 1, 1},
                               {7, 13, 5},
                               {13, 70, 33},
                               {64, 128, 64},
                               {6, 200, 3}}) {
    for (const bool transposed_a : {false, true}) {
      const std::int64_t lda = (transposed_a ? m : k) + 3, ldb = n + 5, ldc = n + 2;
      std::vector<float> a((transposed_a ? k : m) * lda), b(k * ldb), c(m * ldc);
      for (float& e : a) e = dist(rng);
      for (float& e : b) e = dist(rng);
      for (float& e : c) e = dist(rng);
      const std::int64_t row_stride = transposed_a ? 1 : lda, col_stride = transposed_a ? lda : 1;
      std::vector<float> got = c;
      GetParam().tile_gemm(m, n, k, 0.75f, a.data(), row_stride, col_stride, b.data(), ldb,
                           got.data(), ldc);
      for (std::int64_t i = 0; i < m; ++i) {
        for (std::int64_t j = 0; j < ldc; ++j) {
          if (j >= n) {  // C's padding is never written
            ASSERT_EQ(got[i * ldc + j], c[i * ldc + j]);
            continue;
          }
          double want = 0, magnitude = std::abs(c[i * ldc + j]);
          for (std::int64_t p = 0; p < k; ++p) {
            const double term = 0.75 * a[i * row_stride + p * col_stride] * b[p * ldb + j];
            want += term;
            magnitude += std::abs(term);
          }
          want += c[i * ldc + j];
          ASSERT_NEAR(got[i * ldc + j], want, 1e-6 * magnitude) << m << "x" << n << "x" << k;
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Isas, AttentionSimdKernels,
    ::testing::Values(TileKernels{"avx512", [] { return cpu_features().has_avx512_core(); },
                                  avx512::tile_gemm, avx512::exp_shifted},
                      TileKernels{"avx2", [] { return cpu_features().has_avx2_fma(); },
                                  avx2::tile_gemm, avx2::exp_shifted}),
    kernels_name);

TEST(Attention, RejectsHeadsNotDivisibleByKvHeads) {
  const AttentionShape s = shape(4, 3, 2, 8, 0);
  std::vector<float> x(4 * 3 * 8), lse(12);
  EXPECT_THROW(causal_attention_forward(s, x.data(), x.data(), x.data(), x.data(), lse.data()),
               pq::Error);
}

}  // namespace
}  // namespace pq::runtime
