#include "scout/kl_evaluator.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "common/error.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "runtime/evaluate.h"
#include "runtime/model.h"
#include "support/test_support.h"

namespace pq::scout {
namespace {

// Rounds every Linear weight to a coarse grid: a crude quantizer whose effect is easy to see.
class CoarseGrid final : public runtime::WeightTransform {
 public:
  void apply(std::string_view, std::int64_t, std::int64_t, std::span<float> weight) const override {
    for (float& w : weight) w = std::round(w * 8.0f) / 8.0f;
  }
};

std::vector<std::vector<std::int32_t>> random_windows(std::int64_t vocab, std::size_t count,
                                                      std::size_t length) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<std::int32_t> token(0, static_cast<std::int32_t>(vocab - 1));
  std::vector<std::vector<std::int32_t>> windows(count, std::vector<std::int32_t>(length));
  for (auto& window : windows) {
    for (auto& t : window) t = token(rng);
  }
  return windows;
}

class KlEvaluatorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    PQ_REQUIRE_SHARED();
    dir_ = test::shared_dir() / "models" / "stories260K-f32";
    config_ = model::ModelConfig::load(dir_);
    checkpoint_ = std::make_unique<io::Checkpoint>(io::Checkpoint::open(dir_));
    source_ = std::make_unique<runtime::CheckpointWeightSource>(*checkpoint_);
    windows_ = random_windows(config_.vocab_size, 3, 40);
  }

  std::filesystem::path dir_;
  model::ModelConfig config_;
  std::unique_ptr<io::Checkpoint> checkpoint_;
  std::unique_ptr<runtime::CheckpointWeightSource> source_;
  std::vector<std::vector<std::int32_t>> windows_;
};

TEST_F(KlEvaluatorTest, TheSourceModelHasZeroKl) {
  const KlEvaluator evaluator(config_, *source_, windows_, 2);
  const KlMeasurement m = evaluator.measure(nullptr, nullptr);
  EXPECT_EQ(m.predictions, 3 * 39);
  EXPECT_NEAR(m.kl, 0.0, 1e-6);
  EXPECT_DOUBLE_EQ(m.top1_agreement, 1.0);
  EXPECT_EQ(m.nll, evaluator.reference_nll());
  EXPECT_EQ(evaluator.reference_bytes(),
            (3u * 40u + config_.vocab_size) * config_.hidden_size * sizeof(float));
}

TEST_F(KlEvaluatorTest, EqualsRuntimeEvaluateAgainstAReferenceModel) {
  const KlEvaluator evaluator(config_, *source_, windows_, 2);
  const CoarseGrid grid;
  const KlMeasurement m = evaluator.measure(&grid, nullptr);

  runtime::RuntimeOptions options;
  options.weight_transform = &grid;
  runtime::Model quantized(config_, *source_, options);
  runtime::Model reference(config_, *source_);
  const runtime::EvalResult expected = runtime::evaluate(quantized, windows_, &reference, 2);

  ASSERT_GT(expected.mean_kl(), 1e-3) << "the grid must perturb the model visibly";
  // The same arithmetic as evaluating beside the reference model: equal bit for bit.
  EXPECT_EQ(m.kl, expected.mean_kl());
  EXPECT_EQ(m.nll, expected.mean_nll());
  EXPECT_EQ(m.top1_agreement, expected.top1_agreement());
  EXPECT_EQ(m.predictions, expected.predictions);
}

TEST_F(KlEvaluatorTest, RejectsWindowsOfDifferentLengths) {
  auto windows = windows_;
  windows.back().pop_back();
  EXPECT_THROW(KlEvaluator(config_, *source_, windows), Error);
  EXPECT_THROW(KlEvaluator(config_, *source_, {}), Error);
}

}  // namespace
}  // namespace pq::scout
