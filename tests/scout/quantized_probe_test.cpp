// probe::ProbeJob::quantized, which scout's L2 relies on: the probe runs the model with the given
// weight transform, and its fingerprint tells quantized probes apart.
#include <gtest/gtest.h>

#include <cmath>

#include "probe/probe_stage.h"
#include "support/test_support.h"

namespace pq::probe {
namespace {

// Leaves every weight as it is: a quantized run that must reproduce the clean probe.
class Unchanged final : public runtime::WeightTransform {
 public:
  void apply(std::string_view, std::int64_t, std::int64_t, std::span<float>) const override {}
};

// Rounds every Linear weight to multiples of 1/16: a visible perturbation.
class CoarseGrid final : public runtime::WeightTransform {
 public:
  void apply(std::string_view, std::int64_t, std::int64_t, std::span<float> weight) const override {
    for (float& w : weight) w = std::round(w * 16.0f) / 16.0f;
  }
};

class QuantizedProbeTest : public ::testing::Test {
 protected:
  void SetUp() override { PQ_REQUIRE_SHARED(); }

  ProbeJob job(const std::filesystem::path& out) const {
    ProbeJob j;
    j.model = test::shared_dir() / "models" / "qwen3-dense-tiny";
    j.data = test::shared_dir() / "data" / "wikitext-2-test.txt";
    j.out = out;
    j.nsamples = 2;
    j.seqlen = 32;
    j.batch_size = 2;
    return j;
  }
};

TEST_F(QuantizedProbeTest, RunsTheTransformedModelUnderItsOwnFingerprint) {
  test::TempDir dir;
  const Unchanged unchanged;
  const CoarseGrid grid;
  ASSERT_TRUE(run_probe(job(dir / "clean")).complete);
  ProbeJob same = job(dir / "same");
  same.quantized = QuantizedRun{&unchanged, nullptr, "unchanged"};
  ASSERT_TRUE(run_probe(same).complete);
  ProbeJob coarse = job(dir / "coarse");
  coarse.quantized = QuantizedRun{&grid, nullptr, "grid"};
  ASSERT_TRUE(run_probe(coarse).complete);

  const ProbeResult clean = ProbeResult::read(dir / "clean");
  const ProbeResult unchanged_result = ProbeResult::read(dir / "same");
  const ProbeResult coarse_result = ProbeResult::read(dir / "coarse");
  EXPECT_NE(clean.fingerprint(), unchanged_result.fingerprint());
  EXPECT_NE(unchanged_result.fingerprint(), coarse_result.fingerprint());

  // The identity transform reproduces the clean statistics exactly; the grid changes them.
  const std::string layer = "model.layers.3.mlp.down_proj";
  EXPECT_EQ(clean.linear(layer).fisher_trace, unchanged_result.linear(layer).fisher_trace);
  EXPECT_NE(clean.linear(layer).fisher_trace, coarse_result.linear(layer).fisher_trace);
  const std::string key = clean.linear(layer).input_key;
  const auto h_clean = clean.hessian(key);
  const auto h_same = unchanged_result.hessian(key);
  const auto h_coarse = coarse_result.hessian(key);
  ASSERT_EQ(h_clean.size(), h_coarse.size());
  EXPECT_TRUE(std::equal(h_clean.begin(), h_clean.end(), h_same.begin()));
  EXPECT_FALSE(std::equal(h_clean.begin(), h_clean.end(), h_coarse.begin()));
}

}  // namespace
}  // namespace pq::probe
