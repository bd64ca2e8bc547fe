#include "scout/polish.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <map>
#include <random>
#include <vector>

#include "common/error.h"

namespace pq::scout {
namespace {

// A KL landscape without structure: every choice gets an independent pseudo-random value, and
// each call is counted, so the test can check that every accepted state was measured.
class RandomLandscape {
 public:
  explicit RandomLandscape(std::uint64_t seed) : seed_(seed) {}
  double operator()(const std::vector<std::size_t>& choice) {
    ++calls_;
    auto [it, added] = values_.try_emplace(choice, 0.0);
    if (added) {
      std::seed_seq seq(choice.begin(), choice.end());
      std::mt19937_64 rng(seed_);
      std::vector<std::uint32_t> mix(1);
      seq.generate(mix.begin(), mix.end());
      rng.discard(mix[0] % 97);
      it->second = std::uniform_real_distribution<double>(0.01, 1.0)(rng);
    }
    return it->second;
  }
  std::size_t calls() const { return calls_; }
  std::size_t distinct() const { return values_.size(); }

 private:
  std::uint64_t seed_;
  std::size_t calls_ = 0;
  std::map<std::vector<std::size_t>, double> values_;
};

PolishProblem three_option_problem(std::size_t items, std::uint64_t budget) {
  PolishProblem problem;
  for (std::size_t i = 0; i < items; ++i) problem.option_bytes.push_back({10, 20, 40});
  problem.budget_bytes = budget;
  return problem;
}

std::uint64_t bytes_of(const PolishProblem& problem, const std::vector<std::size_t>& choice) {
  std::uint64_t bytes = 0;
  for (std::size_t i = 0; i < choice.size(); ++i) bytes += problem.option_bytes[i][choice[i]];
  return bytes;
}

TEST(CoordinateDescent, NeverWorseThanTheStartOnAnyLandscape) {
  for (std::uint64_t seed = 0; seed < 50; ++seed) {
    const PolishProblem problem = three_option_problem(6, 150);
    RandomLandscape landscape(seed);
    const std::vector<std::size_t> start = {1, 1, 1, 1, 1, 1};  // 120 bytes
    const double start_kl = landscape(start);
    PolishOptions options;
    options.max_sweeps = 4;
    options.max_evaluations = 100;
    const PolishResult result = coordinate_descent(
        problem, start, start_kl, [&](const auto& c) { return landscape(c); }, options);
    EXPECT_LE(result.kl, start_kl) << "seed " << seed;
    EXPECT_EQ(result.kl, landscape(result.choice)) << "the result's KL is its measured KL";
    EXPECT_LE(bytes_of(problem, result.choice), problem.budget_bytes);
    EXPECT_EQ(result.bytes, bytes_of(problem, result.choice));
    double kl = start_kl;
    for (const PolishTrial& trial : result.trials) {
      EXPECT_EQ(trial.kl_before, kl);
      if (trial.accepted) {
        EXPECT_LT(trial.kl_after, trial.kl_before);
        kl = trial.kl_after;
      }
    }
    EXPECT_EQ(kl, result.kl);
    // Each choice measured once: the start by the test, every trial once by the polish (the
    // re-measure of the result above is the one extra call).
    EXPECT_EQ(landscape.calls(), landscape.distinct() + 1);
    EXPECT_EQ(result.trials.size() + 1, landscape.distinct());
  }
}

TEST(CoordinateDescent, FindsTheSeparableOptimumWithinBudget) {
  // KL = sum of per-item terms; item i prefers option target[i]; the budget holds them all.
  const std::vector<std::size_t> target = {2, 0, 1, 2};
  const PolishProblem problem = three_option_problem(4, 10 + 40 + 20 + 40 + 10);
  const auto kl = [&](const std::vector<std::size_t>& c) {
    double sum = 0.0;
    for (std::size_t i = 0; i < c.size(); ++i) {
      const double d = static_cast<double>(c[i]) - static_cast<double>(target[i]);
      sum += 0.1 * d * d;
    }
    return sum;
  };
  const std::vector<std::size_t> start = {1, 1, 1, 1};
  PolishOptions options;
  options.max_sweeps = 5;
  options.max_evaluations = 100;
  const PolishResult result = coordinate_descent(problem, start, kl(start), kl, options);
  EXPECT_EQ(result.choice, target);
  EXPECT_DOUBLE_EQ(result.kl, 0.0);
}

TEST(CoordinateDescent, RespectsTheBudgetAndTheEvaluationCap) {
  // Every dearer option would lower KL, but the budget admits only one upgrade.
  const PolishProblem problem = three_option_problem(3, 10 + 10 + 20);
  std::size_t calls = 0;
  const auto kl = [&](const std::vector<std::size_t>& c) {
    ++calls;
    return 1.0 - 0.1 * static_cast<double>(c[0] + c[1] + c[2]);
  };
  const std::vector<std::size_t> start = {0, 0, 0};
  const PolishResult result = coordinate_descent(problem, start, 1.0, kl);
  EXPECT_EQ(bytes_of(problem, result.choice), 40u);
  EXPECT_DOUBLE_EQ(result.kl, 0.9);

  calls = 0;
  PolishOptions capped;
  capped.max_evaluations = 1;
  coordinate_descent(problem, start, 1.0, kl, capped);
  EXPECT_EQ(calls, 1u);
}

TEST(CoordinateDescent, RejectsAStartOverBudget) {
  const PolishProblem problem = three_option_problem(2, 30);
  EXPECT_THROW(coordinate_descent(problem, {2, 2}, 1.0, [](const auto&) { return 0.0; }), Error);
}

}  // namespace
}  // namespace pq::scout
