#include "probe/probe_stage.h"

#include <fmt/format.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>

#include "common/disk_space.h"
#include "common/error.h"
#include "common/file_util.h"
#include "probe/probe_result.h"
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

// A probe of qwen3_5-moe-tiny-random (Gated DeltaNet and full attention, routed experts, an MTP
// head) into dir/out, on 3 x 32 token ids written to dir/ids.txt.
ProbeJob hybrid_moe_job(const test::TempDir& dir, const std::string& out) {
  std::string ids;
  for (int i = 0; i < 512; ++i) ids += std::to_string((i * 37 + 11) % 256) + ' ';
  write_text_file_atomic(dir / "ids.txt", ids);
  ProbeJob job;
  job.model = test::shared_dir() / "models/qwen3_5-moe-tiny-random";
  job.data = dir / "ids.txt";
  job.token_ids = true;
  job.out = dir / out;
  job.nsamples = 3;
  job.seqlen = 32;
  return job;
}

std::string file_bytes(const std::filesystem::path& path) {
  return read_text_file(path);
}

// Every file of a finished probe directory, by name.
std::map<std::string, std::string> directory_bytes(const std::filesystem::path& dir) {
  std::map<std::string, std::string> files;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    files.emplace(entry.path().filename().string(), file_bytes(entry.path()));
  }
  return files;
}

// `job` (into a directory of its own) stopped after 12 steps, in the backward pass where every
// sum is recorded, and rerun: it resumes there and writes exactly `expected`.
void expect_resumes_to(ProbeJob job, const std::map<std::string, std::string>& expected) {
  job.stop_after_steps = 12;
  run_probe(job);
  job.stop_after_steps.reset();
  EXPECT_EQ(run_probe(job).resumed_from, 12u);
  EXPECT_EQ(directory_bytes(job.out), expected);
}

// A probe stopped after any step of its layer-major pass (forward, head, backward) and restarted
// gives exactly the uninterrupted result; a finished probe is reused, and a changed option
// invalidates both the pass and the artifacts.
TEST(ProbeStage, ResumesAfterAStopWithTheSameResult) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  const ProbeOutcome whole = run_probe(small_job(dir, "whole"));
  ASSERT_TRUE(whole.complete);
  // qwen3-dense-tiny has 8 layers: 8 forward steps, the head, 8 backward steps.
  EXPECT_EQ(whole.steps_done, 17u);
  EXPECT_FALSE(std::filesystem::exists(dir / "whole/pass"));
  const auto expected = directory_bytes(dir / "whole");
  // probe.json and one part per layer (the tied lm_head is no candidate).
  EXPECT_EQ(expected.size(), 9u);
  for (const std::size_t stop : {3u, 8u, 9u, 12u}) {
    const std::string name = fmt::format("resumed-{}", stop);
    ProbeJob interrupted = small_job(dir, name);
    interrupted.stop_after_steps = stop;
    const ProbeOutcome first = run_probe(interrupted);
    EXPECT_FALSE(first.complete);
    EXPECT_EQ(first.steps_done, stop);
    EXPECT_FALSE(std::filesystem::exists(dir / name / "probe.json"));
    EXPECT_TRUE(std::filesystem::exists(dir / name / "pass/state.json"));

    interrupted.stop_after_steps.reset();
    const ProbeOutcome second = run_probe(interrupted);
    EXPECT_TRUE(second.complete);
    EXPECT_EQ(second.resumed_from, stop);
    EXPECT_FALSE(std::filesystem::exists(dir / name / "pass"));
    EXPECT_EQ(directory_bytes(dir / name), expected) << "stopped after step " << stop;
  }

  // A pass state with this probe's fingerprint but a count that is no step of it is discarded.
  for (const std::string forged : {"100", "18", "-1"}) {
    ProbeJob job = small_job(dir, "forged" + forged);
    job.stop_after_steps = 3;
    run_probe(job);
    const auto state_path = dir / ("forged" + forged) / "pass/state.json";
    nlohmann::json state = nlohmann::json::parse(read_text_file(state_path));
    state["steps_done"] = nlohmann::json::parse(forged);
    write_text_file_atomic(state_path, state.dump());
    job.stop_after_steps.reset();
    const ProbeOutcome rerun = run_probe(job);
    EXPECT_TRUE(rerun.complete);
    EXPECT_EQ(rerun.resumed_from, 0u) << "steps_done " << forged;
    EXPECT_EQ(directory_bytes(dir / ("forged" + forged)), expected) << "steps_done " << forged;
  }

  ProbeJob interrupted = small_job(dir, "resumed-3");
  const ProbeOutcome again = run_probe(interrupted);
  EXPECT_TRUE(again.reused);

  ProbeJob changed = interrupted;
  changed.seed = 7;
  changed.stop_after_steps = 1;
  EXPECT_NE(probe_fingerprint(changed), again.fingerprint);
  const ProbeOutcome rerun = run_probe(changed);
  EXPECT_FALSE(rerun.reused);
  EXPECT_EQ(rerun.resumed_from, 0u);
}

// --kv-cache fp8 records every attention layer's key/value amax in its part and in probe.json,
// changes the fingerprint (a pass without it is never resumed as one with it) and survives a stop
// in the backward steps, where it is recorded; without it neither file mentions the KV cache.
TEST(ProbeStage, KvCacheAmaxRecordedOnRequestAndResumed) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  ProbeJob plain = small_job(dir, "plain");
  ProbeJob job = small_job(dir, "kv");
  job.kv_cache = true;
  EXPECT_NE(probe_fingerprint(job), probe_fingerprint(plain));
  ASSERT_TRUE(run_probe(job).complete);
  const auto expected = directory_bytes(dir / "kv");
  const auto probe = nlohmann::json::parse(expected.at("probe.json"));
  ASSERT_EQ(probe.at("kv_cache").size(), 8u);  // qwen3-dense-tiny: 8 attention layers
  for (std::size_t layer = 0; layer < 8; ++layer) {
    const auto& kv = probe.at("kv_cache")[layer];
    EXPECT_EQ(kv.at("layer").get<std::size_t>(), layer);
    EXPECT_EQ(kv.at("tokens").get<std::int64_t>(), 3 * 64);
    EXPECT_GT(kv.at("key_amax").get<double>(), 0.0);
    EXPECT_GT(kv.at("value_amax").get<double>(), 0.0);
  }
  const ProbeResult read = ProbeResult::read(dir / "kv");
  ASSERT_TRUE(read.kv_cache().has_value());
  EXPECT_EQ(read.kv_cache()->size(), 8u);

  ProbeJob interrupted = small_job(dir, "kv-resumed");
  interrupted.kv_cache = true;
  expect_resumes_to(interrupted, expected);

  ASSERT_TRUE(run_probe(plain).complete);
  const auto without = directory_bytes(dir / "plain");
  EXPECT_FALSE(nlohmann::json::parse(without.at("probe.json")).contains("kv_cache"));
  for (const auto& [name, bytes] : without) {
    EXPECT_EQ(bytes.find("kv_cache"), std::string::npos) << name;
  }
  EXPECT_FALSE(ProbeResult::read(dir / "plain").kv_cache().has_value());
}

// --holdout-hessian adds each input's Hessian over the last of 3 sequences (64 tokens) to its part
// and probe.json, changes the fingerprint, leaves every other sum bit for bit as a probe without
// it writes them, and resumes like any probe; without it nothing mentions held-out rows.
TEST(ProbeStage, HoldoutHessianRecordedOnRequestAndResumed) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  ProbeJob plain = small_job(dir, "plain");
  ProbeJob job = small_job(dir, "holdout");
  job.holdout_hessian = true;
  EXPECT_EQ(holdout_sequences(3), 1);
  EXPECT_EQ(holdout_sequences(32), 4);
  EXPECT_EQ(holdout_sequences(1), 0);
  EXPECT_NE(probe_fingerprint(job), probe_fingerprint(plain));
  ASSERT_TRUE(run_probe(job).complete);
  ASSERT_TRUE(run_probe(plain).complete);
  const auto expected = directory_bytes(dir / "holdout");
  const auto without = directory_bytes(dir / "plain");
  for (const auto& [name, bytes] : without) {
    EXPECT_EQ(bytes.find("holdout"), std::string::npos) << name;
  }
  const auto doc = nlohmann::json::parse(expected.at("probe.json"));
  EXPECT_EQ(doc.at("calibration").at("holdout_sequences").get<std::int64_t>(), 1);

  const ProbeResult held = ProbeResult::read(dir / "holdout");
  const ProbeResult all = ProbeResult::read(dir / "plain");
  ASSERT_EQ(held.linears().size(), all.linears().size());
  for (std::size_t i = 0; i < held.linears().size(); ++i) {
    const ProbedLinear& linear = held.linears()[i];
    EXPECT_EQ(linear.fisher_trace, all.linears()[i].fisher_trace) << linear.name;
    const std::span<const float> h = held.hessian(linear.input_key);
    const std::span<const float> expected_h = all.hessian(linear.input_key);
    EXPECT_TRUE(std::equal(h.begin(), h.end(), expected_h.begin(), expected_h.end()))
        << linear.name;
    EXPECT_EQ(held.holdout_tokens(linear.input_key), 64) << linear.name;
    EXPECT_EQ(all.holdout_tokens(linear.input_key), 0);
    EXPECT_TRUE(all.holdout_hessian(linear.input_key).empty());
    // One sequence's X^T X: a sum of squares on the diagonal within the whole sum's, and about a
    // third of it (the windows are alike).
    const std::span<const float> hold = held.holdout_hessian(linear.input_key);
    const auto in = static_cast<std::size_t>(linear.in_features);
    ASSERT_EQ(hold.size(), in * in);
    double trace = 0.0, held_trace = 0.0;
    for (std::size_t j = 0; j < in; ++j) {
      EXPECT_GE(hold[j * in + j], 0.0f);
      EXPECT_LE(hold[j * in + j], h[j * in + j] * (1.0f + 1e-6f));
      trace += h[j * in + j];
      held_trace += hold[j * in + j];
    }
    EXPECT_GT(held_trace, 0.1 * trace) << linear.name;
    EXPECT_LT(held_trace, 0.7 * trace) << linear.name;
  }

  ProbeJob interrupted = small_job(dir, "holdout-resumed");
  interrupted.holdout_hessian = true;
  expect_resumes_to(interrupted, expected);

  ProbeJob one = small_job(dir, "one");
  one.nsamples = 1;
  one.holdout_hessian = true;
  EXPECT_THROW(run_probe(one), Error);
}

// A probe of a model with an MTP head, stopped at the head step (where the MTP loss runs and its
// part is written) or around it, resumes to exactly the uninterrupted result.
TEST(ProbeStage, ResumesAroundTheMtpHead) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  const ProbeOutcome whole = run_probe(hybrid_moe_job(dir, "whole"));
  ASSERT_TRUE(whole.complete);
  // 4 layers: 4 forward steps, the head (next-token and MTP losses), 4 backward steps.
  EXPECT_EQ(whole.steps_done, 9u);
  const auto expected = directory_bytes(dir / "whole");
  EXPECT_EQ(expected.count("probe.mtp.safetensors"), 1u);
  for (const std::size_t stop : {4u, 5u, 6u}) {
    const std::string name = fmt::format("resumed-{}", stop);
    ProbeJob interrupted = hybrid_moe_job(dir, name);
    interrupted.stop_after_steps = stop;
    EXPECT_FALSE(run_probe(interrupted).complete);
    interrupted.stop_after_steps.reset();
    const ProbeOutcome second = run_probe(interrupted);
    EXPECT_TRUE(second.complete);
    EXPECT_EQ(second.resumed_from, stop);
    EXPECT_EQ(directory_bytes(dir / name), expected) << "stopped after step " << stop;
  }
}

// Every sum a probe records besides the Fisher traces, from a probe with them (`with`) and one
// without (`without`): the same tokens, routing and KV cache amax, and Hessians within float
// rounding of the order in which micro-batches are summed.
void expect_same_statistics(const std::filesystem::path& with,
                            const std::filesystem::path& without) {
  const ProbeResult a = ProbeResult::read(with);
  const ProbeResult b = ProbeResult::read(without);
  EXPECT_TRUE(a.has_fisher());
  EXPECT_FALSE(b.has_fisher());
  ASSERT_EQ(a.linears().size(), b.linears().size());
  for (std::size_t i = 0; i < a.linears().size(); ++i) {
    const ProbedLinear& linear = a.linears()[i];
    EXPECT_EQ(b.linears()[i].name, linear.name);
    EXPECT_GT(linear.fisher_trace, 0.0) << linear.name;
    EXPECT_EQ(b.linears()[i].fisher_trace, 0.0) << linear.name;
    EXPECT_EQ(b.linears()[i].tokens, linear.tokens) << linear.name;
    const std::string& key = linear.input_key;
    EXPECT_EQ(b.input_tokens(key), a.input_tokens(key)) << key;
    EXPECT_EQ(b.holdout_tokens(key), a.holdout_tokens(key)) << key;
    EXPECT_EQ(b.input_amax(key), a.input_amax(key)) << key;
    for (const bool held : {false, true}) {
      const std::span<const float> ha = held ? a.holdout_hessian(key) : a.hessian(key);
      const std::span<const float> hb = held ? b.holdout_hessian(key) : b.hessian(key);
      ASSERT_EQ(ha.size(), hb.size()) << key;
      float scale = 0.0f;
      for (const float v : ha) scale = std::max(scale, std::abs(v));
      for (std::size_t k = 0; k < ha.size(); ++k) {
        ASSERT_NEAR(hb[k], ha[k], 1e-5f * scale) << key << " element " << k;
      }
    }
  }
  ASSERT_EQ(a.routing().size(), b.routing().size());
  for (std::size_t r = 0; r < a.routing().size(); ++r) {
    EXPECT_EQ(b.routing()[r].route_counts, a.routing()[r].route_counts);
    EXPECT_EQ(b.routing()[r].tokens, a.routing()[r].tokens);
  }
  ASSERT_EQ(a.kv_cache().has_value(), b.kv_cache().has_value());
  if (a.kv_cache()) {
    ASSERT_EQ(a.kv_cache()->size(), b.kv_cache()->size());
    for (std::size_t l = 0; l < a.kv_cache()->size(); ++l) {
      EXPECT_EQ((*b.kv_cache())[l].key_amax, (*a.kv_cache())[l].key_amax);
      EXPECT_EQ((*b.kv_cache())[l].value_amax, (*a.kv_cache())[l].value_amax);
    }
  }
}

// Without the Fisher traces (--no-fisher) the probe is the forward pass and the head's inputs:
// layers + 1 steps, one layer boundary on disk at a time, the statistics of the full probe (the
// KV cache's and the held-out Hessians included), "fisher": false and no fisher_trace in
// probe.json, its own fingerprint, and a stop anywhere resumes to the same files.
TEST(ProbeStage, WithoutFisherTheForwardPassRecordsTheSameStatistics) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  ProbeJob with = small_job(dir, "with");
  with.kv_cache = true;
  with.holdout_hessian = true;
  ProbeJob without = with;
  without.out = dir / "without";
  without.fisher = false;
  EXPECT_NE(probe_fingerprint(with), probe_fingerprint(without));
  ASSERT_TRUE(run_probe(with).complete);
  const ProbeOutcome forward = run_probe(without);
  ASSERT_TRUE(forward.complete);
  EXPECT_EQ(forward.steps_total, 9u);  // 8 layers and the head
  const auto expected = directory_bytes(dir / "without");
  const auto doc = nlohmann::json::parse(expected.at("probe.json"));
  EXPECT_FALSE(doc.at("calibration").at("fisher").get<bool>());
  for (const auto& linear : doc.at("linears")) EXPECT_FALSE(linear.contains("fisher_trace"));
  EXPECT_FALSE(nlohmann::json::parse(read_text_file(dir / "with/probe.json"))
                   .at("calibration")
                   .contains("fisher"));
  expect_same_statistics(dir / "with", dir / "without");

  for (const std::size_t stop : {1u, 5u, 8u}) {
    ProbeJob interrupted = without;
    interrupted.out = dir / fmt::format("resumed-{}", stop);
    interrupted.stop_after_steps = stop;
    EXPECT_FALSE(run_probe(interrupted).complete);
    // The forward keeps only the next layer's input.
    std::size_t boundaries = 0;
    for (const auto& entry : std::filesystem::directory_iterator(interrupted.out / "pass")) {
      boundaries += entry.path().extension() == ".f32" ? 1 : 0;
    }
    EXPECT_EQ(boundaries, 1u) << "stopped after step " << stop;
    interrupted.stop_after_steps.reset();
    EXPECT_EQ(run_probe(interrupted).resumed_from, stop);
    EXPECT_EQ(directory_bytes(interrupted.out), expected) << "stopped after step " << stop;
  }
}

// The same on a hybrid MoE model with an MTP head and an untied lm_head asked for: routing, the
// MTP head's inputs and lm_head's come from the forward pass and the head step.
TEST(ProbeStage, WithoutFisherRecordsRoutingAndTheMtpHead) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  ProbeJob with = hybrid_moe_job(dir, "with");
  with.spec_options.quantize_lm_head = true;
  ProbeJob without = with;
  without.out = dir / "without";
  without.fisher = false;
  ASSERT_TRUE(run_probe(with).complete);
  ASSERT_TRUE(run_probe(without).complete);
  EXPECT_TRUE(std::filesystem::exists(dir / "without/probe.mtp.safetensors"));
  EXPECT_TRUE(std::filesystem::exists(dir / "without/probe.head.safetensors"));
  EXPECT_FALSE(ProbeResult::read(dir / "without").routing().empty());
  expect_same_statistics(dir / "with", dir / "without");
}

// Without Hessians (--no-hessians) the probe stores each input's second moments only: the same
// as the Hessian probe's diagonal over tokens, in files a fraction of the size, with
// "hessians": false in probe.json and a fingerprint of its own; a stop resumes to the same files.
// Held-out Hessians cannot be asked for without Hessians.
TEST(ProbeStage, WithoutHessiansStoresSecondMomentsOnly) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  for (const bool moe : {false, true}) {
    const std::string name = moe ? "moe" : "dense";
    ProbeJob with = moe ? hybrid_moe_job(dir, name + "-with") : small_job(dir, name + "-with");
    with.fisher = false;
    ProbeJob without = with;
    without.out = dir / (name + "-without");
    without.hessians = false;
    EXPECT_NE(probe_fingerprint(with), probe_fingerprint(without));
    ASSERT_TRUE(run_probe(with).complete);
    ASSERT_TRUE(run_probe(without).complete);
    const ProbeResult a = ProbeResult::read(with.out);
    const ProbeResult b = ProbeResult::read(without.out);
    EXPECT_TRUE(a.has_hessians());
    EXPECT_FALSE(b.has_hessians());
    EXPECT_FALSE(nlohmann::json::parse(read_text_file(without.out / "probe.json"))
                     .at("calibration")
                     .at("hessians")
                     .get<bool>());
    ASSERT_EQ(a.linears().size(), b.linears().size());
    for (const ProbedLinear& linear : a.linears()) {
      const std::string& key = linear.input_key;
      EXPECT_TRUE(b.hessian(key).empty()) << key;
      EXPECT_EQ(b.input_tokens(key), a.input_tokens(key)) << key;
      EXPECT_EQ(b.input_amax(key), a.input_amax(key)) << key;
      const std::span<const float> ma = a.act_second_moment(key);
      const std::span<const float> mb = b.act_second_moment(key);
      ASSERT_EQ(ma.size(), mb.size()) << key;
      for (std::size_t j = 0; j < ma.size(); ++j) {
        ASSERT_NEAR(mb[j], ma[j], 1e-5f * std::max(ma[j], 1e-30f)) << key << " feature " << j;
      }
    }
    std::uintmax_t bytes_with = 0;
    std::uintmax_t bytes_without = 0;
    for (const auto& entry : std::filesystem::directory_iterator(with.out)) {
      bytes_with += entry.is_regular_file() ? entry.file_size() : 0;
    }
    for (const auto& entry : std::filesystem::directory_iterator(without.out)) {
      bytes_without += entry.is_regular_file() ? entry.file_size() : 0;
    }
    EXPECT_LT(bytes_without * 10, bytes_with) << name;

    ProbeJob interrupted = without;
    interrupted.out = dir / (name + "-resumed");
    interrupted.stop_after_steps = 2;
    EXPECT_FALSE(run_probe(interrupted).complete);
    interrupted.stop_after_steps.reset();
    EXPECT_EQ(run_probe(interrupted).resumed_from, 2u);
    EXPECT_EQ(directory_bytes(interrupted.out), directory_bytes(without.out)) << name;
  }
  ProbeJob holdout = small_job(dir, "holdout");
  holdout.hessians = false;
  holdout.holdout_hessian = true;
  EXPECT_THAT([&] { run_probe(holdout); },
              testing::ThrowsMessage<Error>(testing::HasSubstr("--no-hessians stores none")));
}

// A damaged pass state is ignored. probe.json reads back: every candidate Linear with a positive
// Fisher trace, its input's Hessian and second moments of the right width, second moments equal to
// diag(H) / tokens.
TEST(ProbeStage, ArtifactsReadBack) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  ProbeJob job = small_job(dir, "probe");
  job.nsamples = 2;
  job.batch_size = 2;
  // A damaged pass state left in the directory is discarded, not trusted.
  std::filesystem::create_directories(job.out / "pass");
  write_text_file_atomic(job.out / "pass/state.json", "{\"steps_done\": \"abc\"}");
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

// bf16 compute (bf16 GEMM inputs, fp32 accumulation) measures what fp32 does on the trained tiny
// model to within bf16 rounding: every Fisher trace and every Hessian (relative Frobenius
// distance), each Hessian exactly symmetric. The worst errors are printed; the bounds are about
// twice those measured (worst Fisher trace 0.0075, worst Hessian 0.0036).
TEST(ProbeStage, Bf16ComputeMatchesF32WithinBf16Rounding) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  ProbeJob f32_job = small_job(dir, "f32");
  f32_job.compute = runtime::ComputeType::kF32;
  ProbeJob bf16_job = small_job(dir, "bf16");
  bf16_job.compute = runtime::ComputeType::kBF16;
  EXPECT_NE(probe_fingerprint(f32_job), probe_fingerprint(bf16_job));
  ASSERT_TRUE(run_probe(f32_job).complete);
  ASSERT_TRUE(run_probe(bf16_job).complete);
  const ProbeResult f32 = ProbeResult::read(f32_job.out);
  const ProbeResult bf16 = ProbeResult::read(bf16_job.out);
  EXPECT_EQ(nlohmann::json::parse(file_bytes(bf16_job.out / "probe.json"))
                .at("calibration")
                .at("compute"),
            "bf16");
  double worst_fisher = 0.0, worst_hessian = 0.0;
  for (const ProbedLinear& linear : f32.linears()) {
    const double expected = linear.fisher_trace;
    const double measured = bf16.linear(linear.name).fisher_trace;
    worst_fisher = std::max(worst_fisher, std::abs(measured - expected) / expected);
    const auto a = f32.hessian(linear.input_key);
    const auto b = bf16.hessian(linear.input_key);
    ASSERT_EQ(a.size(), b.size());
    double diff = 0.0, norm = 0.0;
    for (std::size_t i = 0; i < a.size(); ++i) {
      diff += (static_cast<double>(b[i]) - a[i]) * (static_cast<double>(b[i]) - a[i]);
      norm += static_cast<double>(a[i]) * a[i];
    }
    worst_hessian = std::max(worst_hessian, std::sqrt(diff / norm));
    const std::int64_t in = linear.in_features;
    for (std::int64_t i = 0; i < in; i += 7) {
      for (std::int64_t j = i + 1; j < in; j += 13) {
        ASSERT_EQ(a[i * in + j], a[j * in + i]) << linear.input_key;
        ASSERT_EQ(b[i * in + j], b[j * in + i]) << linear.input_key;
      }
    }
  }
  std::printf("bf16 vs f32 probe: worst Fisher trace %.3g, worst Hessian %.3g (relative)\n",
              worst_fisher, worst_hessian);
  EXPECT_GT(worst_fisher, 0.0);
  EXPECT_LE(worst_fisher, 0.015);
  EXPECT_LE(worst_hessian, 0.0075);
}

// A pass that needs more disk than is free is refused before it starts, naming itself; what a
// resumed pass already wrote in its directory counts as its own.
TEST(ProbeStage, PassDiskCountsWhatAResumedPassWrote) {
  test::TempDir dir;
  const std::filesystem::path pass = dir / "pass";
  std::filesystem::create_directories(pass);
  const auto free_bytes = [&] { return static_cast<std::int64_t>(*available_disk_bytes(pass)); };
  try {
    require_pass_disk(pass, "the test pass", free_bytes() + (std::int64_t{1} << 40));
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("the test pass needs about"));
  }
  const std::int64_t written = std::int64_t{256} << 20;
  write_text_file_atomic(pass / "x.1.f32", std::string(static_cast<std::size_t>(written), 'x'));
  EXPECT_NO_THROW(require_pass_disk(pass, "the test pass", free_bytes() + written / 2));
  EXPECT_THROW(require_pass_disk(pass, "the test pass", free_bytes() + 2 * written), Error);
}

// A memory limit the pass cannot fit is refused before any step runs, with the estimate.
TEST(ProbeStage, RefusesAMemoryLimitItCannotFit) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  ProbeJob job = small_job(dir, "probe");
  job.max_memory = 1 << 20;
  try {
    run_probe(job);
    FAIL() << "a 1 MiB limit was accepted";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("the probe needs about"));
    EXPECT_THAT(e.what(), ::testing::HasSubstr("--max-memory"));
  }
  EXPECT_FALSE(std::filesystem::exists(job.out / "pass/state.json"));
  job.max_memory = std::int64_t{1} << 30;
  EXPECT_TRUE(run_probe(job).complete);
}

}  // namespace
}  // namespace pq::probe
