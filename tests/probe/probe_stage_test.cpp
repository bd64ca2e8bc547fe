#include "probe/probe_stage.h"

#include <gtest/gtest.h>

#include "common/error.h"
#include "common/file_util.h"
#include "probe/wikitext_excerpt.h"
#include "support/test_support.h"

namespace pq::probe {
namespace {

ProbeJob small_job(const test::TempDir& dir, const std::string& out) {
  ProbeJob job;
  job.model = test::shared_dir() / "models/qwen3-dense-tiny";
  job.data = test::wikitext_excerpt(dir);
  job.out = dir / out;
  job.nsamples = 3;
  job.seqlen = 64;
  job.batch_size = 1;
  return job;
}

std::string file_bytes(const std::filesystem::path& path) {
  return read_text_file(path);
}

// A probe killed after k batches and restarted gives exactly the uninterrupted result; a
// finished probe is reused, and a changed option invalidates both checkpoint and artifacts.
TEST(ProbeStage, ResumesAfterAStopWithTheSameResult) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  const ProbeOutcome whole = run_probe(small_job(dir, "whole"));
  ASSERT_TRUE(whole.complete);
  EXPECT_EQ(whole.batches_done, 3u);

  ProbeJob interrupted = small_job(dir, "resumed");
  interrupted.stop_after_batches = 1;
  const ProbeOutcome first = run_probe(interrupted);
  EXPECT_FALSE(first.complete);
  EXPECT_EQ(first.batches_done, 1u);
  EXPECT_FALSE(std::filesystem::exists(dir / "resumed/probe.json"));
  EXPECT_TRUE(std::filesystem::exists(dir / "resumed/probe.state.safetensors"));

  interrupted.stop_after_batches.reset();
  const ProbeOutcome second = run_probe(interrupted);
  EXPECT_TRUE(second.complete);
  EXPECT_EQ(second.resumed_from, 1u);
  EXPECT_FALSE(std::filesystem::exists(dir / "resumed/probe.state.safetensors"));
  EXPECT_EQ(file_bytes(dir / "resumed/probe.safetensors"),
            file_bytes(dir / "whole/probe.safetensors"));
  EXPECT_EQ(file_bytes(dir / "resumed/probe.json"), file_bytes(dir / "whole/probe.json"));

  const ProbeOutcome again = run_probe(interrupted);
  EXPECT_TRUE(again.reused);

  ProbeJob changed = interrupted;
  changed.seed = 7;
  changed.stop_after_batches = 1;
  EXPECT_NE(probe_fingerprint(changed), second.fingerprint);
  const ProbeOutcome rerun = run_probe(changed);
  EXPECT_FALSE(rerun.reused);
  EXPECT_EQ(rerun.resumed_from, 0u);
}

// A damaged checkpoint is ignored. probe.json reads back: every candidate Linear with a positive
// Fisher trace, its input's Hessian and second moments of the right width, second moments equal to
// diag(H) / tokens.
TEST(ProbeStage, ArtifactsReadBack) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  ProbeJob job = small_job(dir, "probe");
  job.nsamples = 2;
  job.batch_size = 2;
  // A damaged checkpoint left in the directory is discarded, not trusted.
  std::filesystem::create_directories(job.out);
  write_text_file_atomic(job.out / "probe.state.safetensors", "not a safetensors file");
  const ProbeOutcome outcome = run_probe(job);
  ASSERT_TRUE(outcome.complete);
  EXPECT_EQ(outcome.resumed_from, 0u);
  const ProbeResult probe = ProbeResult::read(dir / "probe");
  EXPECT_EQ(probe.model(), "qwen3-dense-tiny");
  EXPECT_EQ(probe.sequences(), 2);
  // 8 layers x 7 Linears; lm_head is tied.
  ASSERT_EQ(probe.linears().size(), 56u);
  for (const ProbedLinear& linear : probe.linears()) {
    EXPECT_GT(linear.fisher_trace, 0.0) << linear.name;
    EXPECT_EQ(linear.tokens, 128) << linear.name;
    const auto h = probe.hessian(linear.input_key);
    const auto m = probe.act_second_moment(linear.input_key);
    ASSERT_EQ(m.size(), static_cast<std::size_t>(linear.in_features));
    for (std::int64_t j = 0; j < linear.in_features; j += 37) {
      EXPECT_FLOAT_EQ(m[j], h[j * linear.in_features + j] / 128.0f) << linear.name;
    }
  }
  EXPECT_THROW(probe.linear("model.layers.0.mlp.nothing"), Error);
  EXPECT_THROW(ProbeResult::read(dir / "missing"), Error);
}

}  // namespace
}  // namespace pq::probe
