#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "common/error.h"
#include "runtime/kernels/vector_math.h"

namespace pq::runtime {
namespace {

// Values spread over the range softmax and SwiGLU see, in lengths that exercise vector tails and
// (for sigmoid) the parallel path.
std::vector<float> spread(std::size_t n, float lo, float hi, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> x(n);
  for (float& v : x) v = dist(rng);
  return x;
}

TEST(VectorMath, ExpShiftedSumMatchesLibm) {
  for (std::size_t n : {std::size_t{1}, std::size_t{15}, std::size_t{17}, std::size_t{32000}}) {
    const std::vector<float> x = spread(n, -80.0f, 8.0f, static_cast<std::uint32_t>(n));
    std::vector<float> got = x;
    const float shift = 7.25f;
    const double sum = exp_shifted_sum(got, shift);
    double want_sum = 0, got_sum = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const double want = std::exp(static_cast<double>(x[i] - shift));
      ASSERT_NEAR(got[i] / want, 1.0, 4e-7) << "x=" << x[i];
      want_sum += want;
      got_sum += got[i];
    }
    EXPECT_NEAR(sum / want_sum, 1.0, 4e-7);
    // The returned sum is the double-precision sum of exactly the values written.
    EXPECT_NEAR(sum, got_sum, 1e-12 * got_sum);
  }
}

TEST(VectorMath, ExpShiftedSumOfMinusInfinityIsZero) {
  std::vector<float> x = {-INFINITY, 0.0f, -INFINITY};
  EXPECT_EQ(exp_shifted_sum(x, 0.0f), 1.0);
  EXPECT_EQ(x, (std::vector<float>{0.0f, 1.0f, 0.0f}));
}

TEST(VectorMath, SigmoidMatchesLibmAndWorksInPlace) {
  for (std::size_t n : {std::size_t{3}, std::size_t{33}, std::size_t{300000}}) {
    const std::vector<float> x = spread(n, -60.0f, 60.0f, static_cast<std::uint32_t>(n));
    std::vector<float> got(n), in_place = x;
    sigmoid(x, got);
    sigmoid(in_place, in_place);
    for (std::size_t i = 0; i < n; ++i) {
      const double want = 1.0 / (1.0 + std::exp(-static_cast<double>(x[i])));
      ASSERT_NEAR(got[i] / want, 1.0, 5e-7) << "x=" << x[i];
      ASSERT_EQ(got[i], in_place[i]);
    }
  }
}

TEST(VectorMath, SigmoidRejectsSizeMismatch) {
  std::vector<float> x(4), y(5);
  EXPECT_THROW(sigmoid(x, y), pq::Error);
}

}  // namespace
}  // namespace pq::runtime
