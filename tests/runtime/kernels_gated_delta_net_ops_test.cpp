// The short convolution and the two norms of a Gated DeltaNet block: forwards against plain
// double-precision loops, backwards against central finite differences of those loops.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "common/error.h"
#include "runtime/kernels/causal_conv1d.h"
#include "runtime/kernels/gated_delta_net_norms.h"

namespace pq::runtime {
namespace {

std::vector<float> random_floats(std::size_t n, std::uint32_t seed, float stddev = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<float> x(n);
  for (float& e : x) e = normal(rng);
  return x;
}

std::vector<double> widen(const std::vector<float>& x) {
  return {x.begin(), x.end()};
}

double silu(double z) {
  return z / (1.0 + std::exp(-z));
}

double weighted_sum(const std::vector<double>& y, const std::vector<float>& weights) {
  double sum = 0;
  for (std::size_t i = 0; i < y.size(); ++i) sum += y[i] * weights[i];
  return sum;
}

// Every element of `grad` against (f(x + eps e_i) - f(x - eps e_i)) / 2 eps.
void expect_matches_finite_differences(const std::function<double(const std::vector<double>&)>& f,
                                       std::vector<double> x, const std::vector<float>& grad,
                                       double tolerance, const std::string& what) {
  ASSERT_EQ(x.size(), grad.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double saved = x[i], eps = 1e-6;
    x[i] = saved + eps;
    const double up = f(x);
    x[i] = saved - eps;
    const double down = f(x);
    x[i] = saved;
    const double want = (up - down) / (2 * eps);
    ASSERT_NEAR(grad[i], want, tolerance * std::max(1.0, std::abs(want)))
        << what << "[" << i << "]";
  }
}

// ---- causal conv1d + SiLU ----------------------------------------------------------------------

struct ConvShape {
  std::int64_t seq_len, channels, kernel_size;
};

std::vector<double> conv_reference(const ConvShape& s, const std::vector<double>& x,
                                   const std::vector<float>& weight) {
  std::vector<double> y(x.size());
  for (std::int64_t t = 0; t < s.seq_len; ++t) {
    for (std::int64_t c = 0; c < s.channels; ++c) {
      double pre = 0;
      for (std::int64_t j = 0; j < s.kernel_size; ++j) {
        const std::int64_t source = t - (s.kernel_size - 1) + j;
        if (source >= 0) pre += weight[c * s.kernel_size + j] * x[source * s.channels + c];
      }
      y[t * s.channels + c] = silu(pre);
    }
  }
  return y;
}

class CausalConv1dSilu : public ::testing::TestWithParam<ConvShape> {};

TEST_P(CausalConv1dSilu, ForwardMatchesLoopAndBackwardMatchesFiniteDifferences) {
  const ConvShape s = GetParam();
  const std::size_t n = s.seq_len * s.channels;
  const std::vector<float> x = random_floats(n, 1), dy = random_floats(n, 2);
  const std::vector<float> weight = random_floats(s.channels * s.kernel_size, 3, 0.5f);
  std::vector<float> y(n, NAN), dx(n, NAN);
  causal_conv1d_silu_forward(x.data(), weight.data(), s.seq_len, s.channels, s.kernel_size,
                             y.data());
  const std::vector<double> want = conv_reference(s, widen(x), weight);
  for (std::size_t i = 0; i < n; ++i) ASSERT_NEAR(y[i], want[i], 1e-6 * (1 + std::abs(want[i])));

  causal_conv1d_silu_backward(x.data(), weight.data(), dy.data(), s.seq_len, s.channels,
                              s.kernel_size, dx.data());
  expect_matches_finite_differences(
      [&](const std::vector<double>& xs) {
        return weighted_sum(conv_reference(s, xs, weight), dy);
      },
      widen(x), dx, 1e-6, "dx");
}

INSTANTIATE_TEST_SUITE_P(Shapes, CausalConv1dSilu,
                         ::testing::Values(ConvShape{1, 3, 4},   // shorter than the kernel
                                           ConvShape{3, 5, 4},   // shorter than the kernel
                                           ConvShape{40, 7, 4},  // crosses a row block
                                           ConvShape{70, 9, 2},  // a partial last block
                                           ConvShape{33, 4, 1}   // pointwise
                                           ));

// A problem large enough for the parallel path, against the loop and against the backward's
// formula summed per channel: the backward's row blocks recompute K - 1 rows of the next block,
// and must agree at every block boundary.
TEST(CausalConv1dSilu, ParallelPathMatchesLoops) {
  const ConvShape s{100, 700, 4};
  const std::size_t n = s.seq_len * s.channels;
  const std::vector<float> x = random_floats(n, 4), dy = random_floats(n, 5);
  const std::vector<float> weight = random_floats(s.channels * s.kernel_size, 6, 0.5f);
  std::vector<float> y(n, NAN), dx(n, NAN);
  causal_conv1d_silu_forward(x.data(), weight.data(), s.seq_len, s.channels, s.kernel_size,
                             y.data());
  const std::vector<double> want_y = conv_reference(s, widen(x), weight);
  for (std::size_t i = 0; i < n; ++i)
    ASSERT_NEAR(y[i], want_y[i], 1e-6 * (1 + std::abs(want_y[i])));
  causal_conv1d_silu_backward(x.data(), weight.data(), dy.data(), s.seq_len, s.channels,
                              s.kernel_size, dx.data());
  for (std::int64_t c = 0; c < s.channels; ++c) {
    std::vector<double> dpre(s.seq_len);
    for (std::int64_t t = 0; t < s.seq_len; ++t) {
      double pre = 0;
      for (std::int64_t j = 0; j < s.kernel_size; ++j) {
        const std::int64_t source = t - (s.kernel_size - 1) + j;
        if (source >= 0) pre += double(weight[c * s.kernel_size + j]) * x[source * s.channels + c];
      }
      const double sig = 1 / (1 + std::exp(-pre));
      dpre[t] = dy[t * s.channels + c] * sig * (1 + pre * (1 - sig));
    }
    for (std::int64_t t = 0; t < s.seq_len; ++t) {
      double want = 0;
      for (std::int64_t j = 0; j < s.kernel_size; ++j) {
        const std::int64_t later = t + (s.kernel_size - 1) - j;
        if (later < s.seq_len) want += weight[c * s.kernel_size + j] * dpre[later];
      }
      ASSERT_NEAR(dx[t * s.channels + c], want, 1e-5 * (1 + std::abs(want))) << t << "," << c;
    }
  }
}

// ---- L2 norm of q and k ------------------------------------------------------------------------

constexpr float kEps = 1e-6f;

std::vector<double> l2_reference(const std::vector<double>& x, std::int64_t width, double scale) {
  std::vector<double> y(x.size());
  for (std::size_t row = 0; row < x.size(); row += width) {
    double sum_sq = 0;
    for (std::int64_t i = 0; i < width; ++i) sum_sq += x[row + i] * x[row + i];
    for (std::int64_t i = 0; i < width; ++i)
      y[row + i] = scale * x[row + i] / std::sqrt(sum_sq + kEps);
  }
  return y;
}

TEST(L2Normalize, ForwardMatchesLoopAndBackwardMatchesFiniteDifferences) {
  const std::int64_t rows = 12, width = 16;
  const float scale = 0.25f;  // dk^-1/2 for dk = 16
  std::vector<float> x = random_floats(rows * width, 7);
  std::fill_n(x.begin(), width, 0.0f);  // an all-zero row: eps keeps it finite
  x[width] = 1e-4f;                     // a tiny row, where eps matters
  const std::vector<float> dy = random_floats(x.size(), 8);
  std::vector<float> y(x.size(), NAN), dx(x.size(), NAN);
  l2_normalize_forward(x.data(), rows, width, kEps, scale, y.data());
  const std::vector<double> want = l2_reference(widen(x), width, scale);
  for (std::size_t i = 0; i < x.size(); ++i)
    ASSERT_NEAR(y[i], want[i], 1e-6 * (1 + std::abs(want[i])));

  l2_normalize_backward(x.data(), dy.data(), rows, width, kEps, scale, dx.data());
  expect_matches_finite_differences(
      [&](const std::vector<double>& xs) {
        return weighted_sum(l2_reference(xs, width, scale), dy);
      },
      widen(x), dx, 1e-5, "dx");
}

TEST(L2Normalize, LargeInputTakesTheParallelPath) {
  const std::int64_t rows = 1024, width = 128;
  const std::vector<float> x = random_floats(rows * width, 9);
  std::vector<float> y(x.size());
  l2_normalize_forward(x.data(), rows, width, kEps, 1.0f, y.data());
  for (std::int64_t r = 0; r < rows; ++r) {
    double sum_sq = 0;
    for (std::int64_t i = 0; i < width; ++i) sum_sq += double(y[r * width + i]) * y[r * width + i];
    ASSERT_NEAR(sum_sq, 1.0, 1e-5) << r;
  }
}

// ---- gated RMSNorm -----------------------------------------------------------------------------

std::vector<double> gated_norm_reference(const std::vector<double>& x, const std::vector<double>& z,
                                         const std::vector<float>& weight, std::int64_t width) {
  std::vector<double> y(x.size());
  for (std::size_t row = 0; row < x.size(); row += width) {
    double sum_sq = 0;
    for (std::int64_t i = 0; i < width; ++i) sum_sq += x[row + i] * x[row + i];
    const double inv = 1 / std::sqrt(sum_sq / width + kEps);
    for (std::int64_t i = 0; i < width; ++i)
      y[row + i] = weight[i] * x[row + i] * inv * silu(z[row + i]);
  }
  return y;
}

TEST(GatedRmsNorm, ForwardMatchesLoopAndBackwardMatchesFiniteDifferences) {
  const std::int64_t rows = 10, width = 24;
  const std::vector<float> x = random_floats(rows * width, 10);
  const std::vector<float> gate = random_floats(x.size(), 11, 2.0f);
  std::vector<float> weight = random_floats(width, 12, 0.2f);
  for (float& w : weight) w += 1.0f;  // around the initial ones
  const std::vector<float> dy = random_floats(x.size(), 13);
  std::vector<float> y(x.size(), NAN), rstd(rows, NAN), dx(x.size(), NAN), dgate(x.size(), NAN);
  gated_rms_norm_forward(x.data(), gate.data(), weight.data(), rows, width, kEps, y.data(),
                         rstd.data());
  const std::vector<double> want = gated_norm_reference(widen(x), widen(gate), weight, width);
  for (std::size_t i = 0; i < x.size(); ++i)
    ASSERT_NEAR(y[i], want[i], 1e-6 * (1 + std::abs(want[i])));

  gated_rms_norm_backward(x.data(), gate.data(), weight.data(), rstd.data(), dy.data(), rows, width,
                          dx.data(), dgate.data());
  const std::vector<double> z = widen(gate), xs = widen(x);
  expect_matches_finite_differences(
      [&](const std::vector<double>& v) {
        return weighted_sum(gated_norm_reference(v, z, weight, width), dy);
      },
      xs, dx, 1e-5, "dx");
  expect_matches_finite_differences(
      [&](const std::vector<double>& v) {
        return weighted_sum(gated_norm_reference(xs, v, weight, width), dy);
      },
      z, dgate, 1e-5, "dgate");
}

TEST(GatedDeltaNetOps, RejectEmptyRows) {
  std::vector<float> x(4);
  EXPECT_THROW(l2_normalize_forward(x.data(), 1, 0, kEps, 1.0f, x.data()), pq::Error);
  EXPECT_THROW(causal_conv1d_silu_forward(x.data(), x.data(), 4, 1, 0, x.data()), pq::Error);
}

}  // namespace
}  // namespace pq::runtime
