#include "pipeline/uniform_baseline.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <string>

#include "alloc/cost_table.h"
#include "common/error.h"
#include "cost/cost_stage.h"
#include "export/rounding.h"
#include "model/model_spec.h"
#include "pipeline/measure.h"
#include "probe/probe_stage.h"
#include "probe/wikitext_excerpt.h"
#include "runtime/checkpoint_model.h"
#include "support/test_support.h"

namespace pq::pipeline {
namespace {

TEST(UniformBaseline, FormatIsTheMenusFp4) {
  EXPECT_EQ(uniform_baseline_format({"MXFP8", "NVFP4", "BF16"}), "NVFP4");
  EXPECT_EQ(uniform_baseline_format({"NVFP4A16", "BF16"}), "NVFP4A16");
  EXPECT_EQ(uniform_baseline_format({"MXFP4", "BF16"}), std::nullopt);
}

// The paired z score: the mean per-prediction NLL difference over its standard error.
TEST(UniformBaseline, PerplexityZScoreIsPairedByPrediction) {
  exporter::MeasuredQuality a;
  exporter::MeasuredQuality b;
  a.prediction_nll = {1.0, 2.0, 3.0, 4.0};
  b.prediction_nll = a.prediction_nll;
  EXPECT_EQ(perplexity_z_score(a, b), 0.0);
  // Differences 0.1, 0.3, 0.1, 0.3: mean 0.2, sample sd 0.11547, standard error 0.057735.
  b.prediction_nll = {0.9, 1.7, 2.9, 3.7};
  EXPECT_NEAR(perplexity_z_score(a, b), 0.2 / (0.2 / std::sqrt(3.0) / 2.0), 1e-9);
  EXPECT_NEAR(perplexity_z_score(b, a), -perplexity_z_score(a, b), 1e-12);
  // Large per-token noise around a small mean difference is no evidence.
  a.prediction_nll = {1.0, 5.0, 1.0, 5.0};
  b.prediction_nll = {3.1, 2.9, 3.1, 2.9};
  EXPECT_LT(perplexity_z_score(a, b), kPerplexityZLimit);
  b.prediction_nll.pop_back();
  EXPECT_THROW(perplexity_z_score(a, b), Error);
}

// Perplexity is judged as fidelity to the source: per prediction, how far the NLL moved from
// the source's, not the aggregate, which a flatter distribution can lower on text the model fits
// badly.
TEST(UniformBaseline, PerplexityIsJudgedByHowFarEachPredictionMovedFromTheSource) {
  const auto quality = [](double kl, std::vector<double> nll, std::vector<double> source) {
    exporter::MeasuredQuality q;
    q.mean_kl = kl;
    q.prediction_nll = std::move(nll);
    q.source_prediction_nll = std::move(source);
    return q;
  };
  const std::vector<double> source = {2.0, 3.0, 2.0, 3.0, 2.0, 3.0};
  exporter::UniformBaseline baseline;
  // Uniform moves every prediction by 0.3 to 0.5 (its perplexity about the source's); the mix
  // by 0.1 (its perplexity above the source's): shipped.
  baseline.quality = quality(0.04, {1.6, 3.3, 1.7, 3.4, 1.6, 3.3}, source);
  EXPECT_NO_THROW(require_not_worse_than_uniform(
      quality(0.01, {2.1, 3.1, 2.1, 3.1, 2.1, 3.1}, source), baseline));
  // The mix moves them further than uniform: refused, though its KL is lower.
  EXPECT_THAT(
      [&] {
        require_not_worse_than_uniform(quality(0.01, {1.2, 3.9, 1.3, 3.8, 1.2, 3.9}, source),
                                       baseline);
      },
      testing::ThrowsMessage<Error>(testing::HasSubstr("further from the source's")));
  // Predictions not paired with the source's are an error, not a verdict.
  EXPECT_THROW(require_not_worse_than_uniform(quality(0.01, {2.1, 3.1}, source), baseline), Error);
}

// A crafted assignment that must be refused: MXFP4 (E8M0 scales in groups of 32) on most of
// qwen3-dense-tiny, with enough Linears in BF16 to take at least uniform NVFP4's bytes. Measured
// with the same rounding on the same held-out windows it loses to uniform NVFP4, and the guard
// says so in one line; the uniform assignment itself passes.
TEST(UniformBaseline, RefusesAnAssignmentWorseThanUniformNvfp4) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  const std::filesystem::path model = test::shared_dir() / "models" / "qwen3-dense-tiny";
  const std::filesystem::path data = test::wikitext_excerpt(dir);
  probe::ProbeJob probe_job;
  probe_job.model = model;
  probe_job.out = dir / "probe";
  probe_job.data = data;
  probe_job.nsamples = 4;
  probe_job.seqlen = 128;
  probe::run_probe(probe_job);
  cost::CostJob cost_job;
  cost_job.model = model;
  cost_job.probe = probe_job.out;
  cost_job.out = dir / "cost";
  cost_job.formats = {"NVFP4", "MXFP4", "BF16"};
  cost::run_cost(cost_job);
  const alloc::CostTable table = alloc::read_cost_table(cost_job.out);

  // MXFP4 everywhere, then BF16 for Linears in table order until the bytes reach uniform
  // NVFP4's.
  const auto bytes_of = [&](const alloc::LinearCost& row, const std::string& format) {
    return row.costs.at(table.format_index(format))->bytes;
  };
  std::uint64_t nvfp4 = 0;
  std::uint64_t crafted_bytes = 0;
  std::map<std::string, std::string> crafted;
  for (const alloc::LinearCost& row : table.linears) {
    nvfp4 += bytes_of(row, "NVFP4");
    crafted[row.name] = "MXFP4";
    crafted_bytes += bytes_of(row, "MXFP4");
  }
  for (const alloc::LinearCost& row : table.linears) {
    if (crafted_bytes >= nvfp4) break;
    crafted[row.name] = "BF16";
    crafted_bytes += bytes_of(row, "BF16") - bytes_of(row, "MXFP4");
  }
  ASSERT_GE(crafted_bytes, nvfp4);

  const model::ModelSpec spec = model::load_model_spec(model);
  const io::Checkpoint checkpoint = io::Checkpoint::open(model);
  const exporter::NearestRounding rounding;
  const probe::ProbeResult probe = probe::ProbeResult::read(probe_job.out);
  const exporter::LinearEncoder encoder(spec, checkpoint, rounding,
                                        exporter::input_amax_from_probe(spec, probe),
                                        formats::ServingTarget::kBlackwell);
  const model::ModelConfig config = model::ModelConfig::load(model);
  runtime::CheckpointModel source(model);
  const runtime::ReferenceLogits reference(
      source.model(), runtime::ReferenceLogits::Keep::kHeadInputs,
      heldout_windows(model, data, false, 2, 128), runtime::kEvalWindowsPerPass);
  const exporter::MeasuredQuality shipped =
      measure_assignment(config, checkpoint, encoder, crafted, reference);
  // Resumable, the measurement is the same; measured again, each pass resumes from its last
  // layer's output and runs only the head, with the same figures.
  for (int run = 0; run < 2; ++run) {
    const exporter::MeasuredQuality resumable =
        measure_assignment(config, checkpoint, encoder, crafted, reference, nullptr, dir / "m");
    EXPECT_EQ(resumable.mean_kl, shipped.mean_kl);
    EXPECT_EQ(resumable.perplexity, shipped.perplexity);
    EXPECT_EQ(resumable.prediction_nll, shipped.prediction_nll);
  }
  EXPECT_TRUE(std::filesystem::exists(dir / "m" / "bf16-kv-cache" / "state.json"));
  const exporter::UniformBaseline baseline =
      measure_uniform_baseline(config, checkpoint, encoder, table, crafted, reference, "NVFP4");
  EXPECT_EQ(baseline.bytes, nvfp4);
  EXPECT_EQ(baseline.shipped_bytes, crafted_bytes);
  EXPECT_EQ(baseline.linears, static_cast<std::int64_t>(table.linears.size()));
  ASSERT_TRUE(baseline.quality.has_value());
  EXPECT_GT(shipped.mean_kl, baseline.quality->mean_kl);
  try {
    require_not_worse_than_uniform(shipped, baseline);
    FAIL() << "an assignment worse than uniform NVFP4 was let through";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("not exported: the chosen assignment"), std::string::npos) << message;
    EXPECT_NE(message.find("worse than uniform NVFP4"), std::string::npos) << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  }

  // The uniform assignment is its own baseline: equal, so not worse.
  std::map<std::string, std::string> uniform;
  for (const alloc::LinearCost& row : table.linears) uniform[row.name] = "NVFP4";
  const exporter::MeasuredQuality same =
      measure_assignment(config, checkpoint, encoder, uniform, reference);
  EXPECT_EQ(same.mean_kl, baseline.quality->mean_kl);
  EXPECT_NO_THROW(require_not_worse_than_uniform(same, baseline));
  // A baseline that needs more bytes than the assignment is not measured and objects to nothing.
  std::map<std::string, std::string> small;
  for (const alloc::LinearCost& row : table.linears) small[row.name] = "MXFP4";
  const exporter::UniformBaseline larger =
      measure_uniform_baseline(config, checkpoint, encoder, table, small, reference, "NVFP4");
  EXPECT_GT(larger.bytes, larger.shipped_bytes);
  EXPECT_FALSE(larger.quality.has_value());
  EXPECT_NO_THROW(require_not_worse_than_uniform(shipped, larger));
}

}  // namespace
}  // namespace pq::pipeline
