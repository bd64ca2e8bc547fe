#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <thread>
#include <tuple>
#include <vector>

#include "common/error.h"
#include "runtime/kernels/gemm.h"

namespace pq::runtime {
namespace {

using Shape = std::tuple<std::int64_t, std::int64_t, std::int64_t>;  // m, n, k

struct Operands {
  std::int64_t lda, ldb, ldc;
  std::vector<float> a, b, c;
};

// Random operands for op(A) [m,k], op(B) [k,n], C [m,n], stored with padded leading dimensions so
// that strides are exercised (padding holds NaN: reading it would poison the result).
Operands make_operands(Transpose ta, Transpose tb, Shape shape, std::uint32_t seed) {
  const auto [m, n, k] = shape;
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  Operands ops;
  const std::int64_t a_rows = ta == Transpose::kYes ? k : m, a_cols = ta == Transpose::kYes ? m : k;
  const std::int64_t b_rows = tb == Transpose::kYes ? n : k, b_cols = tb == Transpose::kYes ? k : n;
  ops.lda = a_cols + 3;
  ops.ldb = b_cols + 5;
  ops.ldc = n + 2;
  auto fill = [&](std::vector<float>& x, std::int64_t rows, std::int64_t cols, std::int64_t ld) {
    x.assign(static_cast<std::size_t>(rows * ld), nan);
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t col = 0; col < cols; ++col) x[r * ld + col] = dist(rng);
  };
  fill(ops.a, a_rows, a_cols, ops.lda);
  fill(ops.b, b_rows, b_cols, ops.ldb);
  fill(ops.c, m, n, ops.ldc);
  return ops;
}

// Per-element error bound scale: |alpha| sum_p |a_ip b_pj| + |beta c_ij|, computed in double.
std::vector<double> magnitude(Transpose ta, Transpose tb, Shape shape, float alpha,
                              const Operands& ops, float beta) {
  const auto [m, n, k] = shape;
  std::vector<double> mag(static_cast<std::size_t>(m * n));
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < n; ++j) {
      double sum = 0;
      for (std::int64_t p = 0; p < k; ++p) {
        const float av = ta == Transpose::kYes ? ops.a[p * ops.lda + i] : ops.a[i * ops.lda + p];
        const float bv = tb == Transpose::kYes ? ops.b[j * ops.ldb + p] : ops.b[p * ops.ldb + j];
        sum += std::abs(static_cast<double>(av) * bv);
      }
      mag[i * n + j] = std::abs(alpha) * sum + std::abs(beta * ops.c[i * ops.ldc + j]);
    }
  return mag;
}

const Shape kShapes[] = {{1, 1, 1}, {7, 13, 5}, {33, 17, 65}, {64, 128, 96}, {129, 67, 300}};
const Transpose kTrans[] = {Transpose::kNo, Transpose::kYes};
const std::pair<float, float> kAlphaBeta[] = {{1.0f, 0.0f}, {1.0f, 1.0f}, {0.5f, -0.75f}};

// Worst |c - ref| / magnitude over the [m, n] block; padding of C must stay untouched.
double worst_error(Shape shape, const Operands& ops, const std::vector<float>& got,
                   const std::vector<float>& ref, const std::vector<double>& mag) {
  const auto [m, n, k] = shape;
  double worst = 0;
  for (std::int64_t i = 0; i < m; ++i) {
    for (std::int64_t j = 0; j < n; ++j) {
      const double err = std::abs(static_cast<double>(got[i * ops.ldc + j]) - ref[i * ops.ldc + j]);
      worst = std::max(worst, err / std::max(mag[i * n + j], 1e-30));
    }
    for (std::int64_t j = n; j < ops.ldc; ++j) EXPECT_TRUE(std::isnan(got[i * ops.ldc + j]));
  }
  return worst;
}

TEST(GemmF32, MatchesReferenceForEveryTransposeAndOddSizes) {
  std::uint32_t seed = 1;
  for (Transpose ta : kTrans)
    for (Transpose tb : kTrans)
      for (const Shape& shape : kShapes)
        for (const auto& [alpha, beta] : kAlphaBeta) {
          const auto [m, n, k] = shape;
          const Operands ops = make_operands(ta, tb, shape, seed++);
          std::vector<float> got = ops.c, ref = ops.c;
          gemm_f32(ta, tb, m, n, k, alpha, ops.a.data(), ops.lda, ops.b.data(), ops.ldb, beta,
                   got.data(), ops.ldc);
          gemm_reference(ta, tb, m, n, k, alpha, ops.a.data(), ops.lda, ops.b.data(), ops.ldb, beta,
                         ref.data(), ops.ldc);
          const double err =
              worst_error(shape, ops, got, ref, magnitude(ta, tb, shape, alpha, ops, beta));
          EXPECT_LT(err, 1e-6) << "ta=" << (ta == Transpose::kYes)
                               << " tb=" << (tb == Transpose::kYes) << " m=" << m << " n=" << n
                               << " k=" << k << " beta=" << beta;
        }
}

// gram_upper_f32 writes the upper triangle of alpha A^T A + beta C and leaves the strict lower
// triangle (here NaN) and C's padding untouched; mirror_upper_triangle then completes the matrix.
TEST(GramUpperF32, MatchesReferenceOnTheUpperTriangleOnly) {
  std::uint32_t seed = 100;
  for (const std::int64_t n : {1, 7, 65, 130}) {
    for (const auto& [alpha, beta] : kAlphaBeta) {
      const Shape shape{n, n, 37};
      const Operands ops = make_operands(Transpose::kYes, Transpose::kNo, shape, seed++);
      std::vector<float> got = ops.c, ref = ops.c;
      const float nan = std::numeric_limits<float>::quiet_NaN();
      for (std::int64_t i = 0; i < n; ++i) {
        for (std::int64_t j = 0; j < i; ++j) got[i * ops.ldc + j] = nan;
      }
      gram_upper_f32(n, 37, alpha, ops.a.data(), ops.lda, beta, got.data(), ops.ldc);
      gemm_reference(Transpose::kYes, Transpose::kNo, n, n, 37, alpha, ops.a.data(), ops.lda,
                     ops.a.data(), ops.lda, beta, ref.data(), ops.ldc);
      Operands gram = ops;
      gram.b = ops.a;
      gram.ldb = ops.lda;
      const std::vector<double> mag =
          magnitude(Transpose::kYes, Transpose::kNo, shape, alpha, gram, beta);
      for (std::int64_t i = 0; i < n; ++i) {
        for (std::int64_t j = 0; j < i; ++j) ASSERT_TRUE(std::isnan(got[i * ops.ldc + j]));
        for (std::int64_t j = i; j < n; ++j) {
          const double err =
              std::abs(static_cast<double>(got[i * ops.ldc + j]) - ref[i * ops.ldc + j]);
          EXPECT_LT(err / std::max(mag[i * n + j], 1e-30), 1e-6) << i << "," << j;
        }
        for (std::int64_t j = n; j < ops.ldc; ++j) EXPECT_TRUE(std::isnan(got[i * ops.ldc + j]));
      }
      mirror_upper_triangle(n, got.data(), ops.ldc);
      for (std::int64_t i = 0; i < n; ++i) {
        for (std::int64_t j = 0; j < n; ++j) {
          ASSERT_EQ(got[i * ops.ldc + j], got[j * ops.ldc + i]) << i << "," << j;
        }
      }
    }
  }
}

// Rounds every value to bf16 (and keeps the bit patterns) so both paths see identical inputs.
std::vector<std::uint16_t> to_bf16(std::vector<float>& x) {
  std::vector<std::uint16_t> bits(x.size());
  convert_f32_to_bf16(x, bits);
  convert_bf16_to_f32(bits, x);
  return bits;
}

TEST(GemmBf16, MatchesReferenceOnBf16RoundedInputs) {
  std::uint32_t seed = 100;
  for (Transpose ta : kTrans)
    for (Transpose tb : kTrans)
      for (const Shape& shape : kShapes)
        for (const auto& [alpha, beta] : kAlphaBeta) {
          const auto [m, n, k] = shape;
          Operands ops = make_operands(ta, tb, shape, seed++);
          const std::vector<std::uint16_t> a16 = to_bf16(ops.a), b16 = to_bf16(ops.b);
          std::vector<float> got = ops.c, ref = ops.c;
          gemm_bf16(ta, tb, m, n, k, alpha, a16.data(), ops.lda, b16.data(), ops.ldb, beta,
                    got.data(), ops.ldc);
          gemm_reference(ta, tb, m, n, k, alpha, ops.a.data(), ops.lda, ops.b.data(), ops.ldb, beta,
                         ref.data(), ops.ldc);
          const double err =
              worst_error(shape, ops, got, ref, magnitude(ta, tb, shape, alpha, ops, beta));
          EXPECT_LT(err, 1e-5) << "ta=" << (ta == Transpose::kYes)
                               << " tb=" << (tb == Transpose::kYes) << " m=" << m << " n=" << n
                               << " k=" << k << " beta=" << beta;
        }
}

TEST(Gemm, BetaZeroIgnoresNanInC) {
  const std::int64_t m = 5, n = 6, k = 7;
  std::vector<float> a(m * k, 0.25f), b(k * n, 2.0f);
  std::vector<float> c(m * n, std::numeric_limits<float>::quiet_NaN());
  gemm_f32(Transpose::kNo, Transpose::kNo, m, n, k, 1.0f, a.data(), k, b.data(), n, 0.0f, c.data(),
           n);
  for (float x : c) EXPECT_EQ(x, 3.5f);
  std::vector<std::uint16_t> a16(a.size()), b16(b.size());
  convert_f32_to_bf16(a, a16);
  convert_f32_to_bf16(b, b16);
  std::fill(c.begin(), c.end(), std::numeric_limits<float>::quiet_NaN());
  gemm_bf16(Transpose::kNo, Transpose::kNo, m, n, k, 1.0f, a16.data(), k, b16.data(), n, 0.0f,
            c.data(), n);
  for (float x : c) EXPECT_EQ(x, 3.5f);
}

TEST(Gemm, EmptyInnerDimensionScalesC) {
  std::vector<float> c = {1.0f, -2.0f, 3.0f, 4.0f};
  gemm_f32(Transpose::kNo, Transpose::kNo, 2, 2, 0, 1.0f, nullptr, 1, nullptr, 2, 0.5f, c.data(),
           2);
  EXPECT_EQ(c, (std::vector<float>{0.5f, -1.0f, 1.5f, 2.0f}));
  gemm_bf16(Transpose::kNo, Transpose::kNo, 2, 2, 0, 1.0f, nullptr, 1, nullptr, 2, 0.0f, c.data(),
            2);
  EXPECT_EQ(c, (std::vector<float>(4, 0.0f)));
}

// The primitive cache and the per-thread scratchpads must let threads multiply concurrently,
// including two threads creating the same shape's primitive at once.
TEST(Gemm, ConcurrentCallsFromSeveralThreadsAreCorrect) {
  const std::int64_t m = 19, n = 23, k = 29;
  std::vector<std::thread> threads;
  std::vector<double> errors(4, 1.0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      double worst = 0;
      for (int round = 0; round < 20; ++round) {
        const Shape shape{m + round % 3, n, k};  // threads share shapes and add new ones
        Operands ops =
            make_operands(Transpose::kNo, Transpose::kYes, shape, 1000 + t * 100 + round);
        const std::vector<std::uint16_t> a16 = to_bf16(ops.a), b16 = to_bf16(ops.b);
        const auto [mm, nn, kk] = shape;
        std::vector<float> got = ops.c, got32 = ops.c, ref = ops.c;
        gemm_bf16(Transpose::kNo, Transpose::kYes, mm, nn, kk, 1.0f, a16.data(), ops.lda,
                  b16.data(), ops.ldb, 0.0f, got.data(), ops.ldc);
        gemm_f32(Transpose::kNo, Transpose::kYes, mm, nn, kk, 1.0f, ops.a.data(), ops.lda,
                 ops.b.data(), ops.ldb, 0.0f, got32.data(), ops.ldc);
        gemm_reference(Transpose::kNo, Transpose::kYes, mm, nn, kk, 1.0f, ops.a.data(), ops.lda,
                       ops.b.data(), ops.ldb, 0.0f, ref.data(), ops.ldc);
        const auto mag = magnitude(Transpose::kNo, Transpose::kYes, shape, 1.0f, ops, 0.0f);
        worst = std::max({worst, worst_error(shape, ops, got, ref, mag),
                          worst_error(shape, ops, got32, ref, mag)});
      }
      errors[t] = worst;
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (double e : errors) EXPECT_LT(e, 1e-5);
}

TEST(Gemm, RejectsTooSmallLeadingDimension) {
  std::vector<float> a(16), b(16), c(16);
  EXPECT_THROW(gemm_f32(Transpose::kNo, Transpose::kNo, 4, 4, 4, 1.0f, a.data(), 3, b.data(), 4,
                        0.0f, c.data(), 4),
               pq::Error);
}

// Independent oracle: the nearer of the two bf16 neighbours of x (ties to even), by exact double
// arithmetic; NaN maps to a quiet NaN with the same sign.
std::uint16_t bf16_oracle(float x) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(x);
  if (std::isnan(x)) return static_cast<std::uint16_t>((bits >> 16) | 0x40u);
  const std::uint32_t down = bits & 0xffff0000u;
  if (down == bits) return static_cast<std::uint16_t>(bits >> 16);
  const std::uint32_t up = down + 0x10000u;  // next bf16 away from zero (may be infinity)
  const double lo_gap = std::abs(static_cast<double>(x) - std::bit_cast<float>(down));
  const double up_value = (up & 0x7fffffffu) == 0x7f800000u
                              ? std::copysign(std::ldexp(1.0, 128), x)  // overflow boundary 2^128
                              : static_cast<double>(std::bit_cast<float>(up));
  const double hi_gap = std::abs(up_value - x);
  if (lo_gap < hi_gap) return static_cast<std::uint16_t>(down >> 16);
  if (hi_gap < lo_gap) return static_cast<std::uint16_t>(up >> 16);
  return static_cast<std::uint16_t>(((down >> 16) & 1u) ? up >> 16 : down >> 16);
}

TEST(ConvertBf16, RoundsToNearestEvenLikeAnExactOracle) {
  std::vector<float> values;
  std::mt19937 rng(7);
  for (int i = 0; i < 200000; ++i)
    values.push_back(std::bit_cast<float>(static_cast<std::uint32_t>(rng())));
  // Exact halfway points (odd and even kept halves), their neighbours, and special values.
  for (std::uint32_t hi : {0x3f80u, 0x3f81u, 0x7f7fu, 0x0001u, 0x8001u, 0xff7fu, 0x0080u}) {
    const std::uint32_t base = hi << 16;
    for (std::uint32_t low : {0x7fffu, 0x8000u, 0x8001u, 0xffffu, 0x0001u})
      values.push_back(std::bit_cast<float>(base | low));
  }
  for (float x : {0.0f, -0.0f, std::numeric_limits<float>::infinity(),
                  -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::max(),
                  std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::quiet_NaN(),
                  std::bit_cast<float>(0x7f800001u), std::bit_cast<float>(0xffffffffu)})
    values.push_back(x);
  // Odd lengths exercise the vector tails; the full set crosses the parallel threshold.
  for (std::size_t n :
       {values.size(), std::size_t{1}, std::size_t{15}, std::size_t{17}, std::size_t{33}}) {
    std::vector<std::uint16_t> got(n);
    convert_f32_to_bf16(std::span(values.data(), n), got);
    for (std::size_t i = 0; i < n; ++i) {
      ASSERT_EQ(got[i], bf16_oracle(values[i]))
          << std::hex << std::bit_cast<std::uint32_t>(values[i]);
    }
  }
}

TEST(ConvertBf16, WidensEveryPatternExactly) {
  std::vector<std::uint16_t> all(1 << 16);
  for (std::size_t i = 0; i < all.size(); ++i) all[i] = static_cast<std::uint16_t>(i);
  for (std::size_t n : {all.size(), std::size_t{1}, std::size_t{31}}) {
    std::vector<float> wide(n);
    convert_bf16_to_f32(std::span(all.data(), n), wide);
    for (std::size_t i = 0; i < n; ++i)
      ASSERT_EQ(std::bit_cast<std::uint32_t>(wide[i]), static_cast<std::uint32_t>(all[i]) << 16);
  }
}

TEST(ConvertBf16, RejectsSizeMismatch) {
  std::vector<float> in(4);
  std::vector<std::uint16_t> out(3);
  EXPECT_THROW(convert_f32_to_bf16(in, out), pq::Error);
}

}  // namespace
}  // namespace pq::runtime
