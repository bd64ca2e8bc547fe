#include "scout/scout_stage.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <set>

#include "alloc/assignment.h"
#include "alloc/budget.h"
#include "common/error.h"
#include "common/file_util.h"
#include "cost/cost_stage.h"
#include "probe/probe_stage.h"
#include "support/test_support.h"

namespace pq::scout {
namespace {

namespace fs = std::filesystem;

// A whole scout run on qwen3-dense-tiny with a tiny probe, tiny held-out split and small caps.
class ScoutStageTest : public ::testing::Test {
 protected:
  void SetUp() override {
    PQ_REQUIRE_SHARED();
    model_ = test::shared_dir() / "models" / "qwen3-dense-tiny";
    data_ = test::shared_dir() / "data" / "wikitext-2-test.txt";
  }

  void probe_and_cost(const fs::path& work) {
    probe::ProbeJob probe_job;
    probe_job.model = model_;
    probe_job.data = data_;
    probe_job.out = work / "probe";
    probe_job.nsamples = 4;
    probe_job.seqlen = 64;
    ASSERT_TRUE(probe::run_probe(probe_job).complete);
    cost::CostJob cost_job;
    cost_job.model = model_;
    cost_job.probe = work / "probe";
    cost_job.out = work / "cost";
    cost_job.formats = {"NVFP4", "MXFP4", "MXFP8", "BF16"};
    cost::run_cost(cost_job);
  }

  ScoutJob small_job(const fs::path& work) const {
    ScoutJob job;
    job.model = model_;
    job.data = data_;
    job.work = work;
    job.budgets = {"4.5", "5.5"};
    job.target = "4.75";
    job.heldout_windows = 2;
    job.heldout_seqlen = 64;
    job.l2_max_passes = 1;
    job.l2_nsamples = 2;
    job.l2_seqlen = 64;
    job.l3_items = 2;
    job.max_bisections = 1;
    job.polish_max_evaluations = 4;
    return job;
  }

  fs::path model_, data_;
};

TEST_F(ScoutStageTest, EndToEndOnQwen3DenseTiny) {
  test::TempDir work;
  probe_and_cost(work.path());
  const ScoutJob job = small_job(work.path());
  const ScoutOutcome outcome = run_scout(job);

  // Every step left a measured candidate; the anchors include the target.
  std::set<std::string> ids;
  for (const Candidate& c : outcome.candidates) {
    ids.insert(c.id);
    EXPECT_GE(c.measured.kl, 0.0) << c.id;
    EXPECT_GT(c.measured.predictions, 0);
  }
  for (const char* id : {"L1@4.5", "L1@4.75", "L1@5.5", "L2@4.75/1", "L3@4.75", "polish"}) {
    EXPECT_TRUE(ids.count(id)) << id;
  }

  // The shipped choice fits the target and is never worse than the pick it was polished from.
  const Candidate& picked = outcome.candidates[outcome.picked];
  const Candidate& chosen = outcome.candidates[outcome.chosen];
  const std::uint64_t budget = alloc::parse_bits_target(job.target)
                                   .budget_bytes(outcome.assignment.totals.quantizable_params);
  EXPECT_LE(chosen.bytes, budget);
  EXPECT_LE(chosen.measured.kl, picked.measured.kl);
  // Plain NVFP4 everywhere is far worse than the measured choice at about the same size.
  ASSERT_TRUE(outcome.uniform.has_value());
  EXPECT_GT(outcome.uniform->kl, chosen.measured.kl);

  // assignment.json round-trips in alloc's schema and is the chosen candidate.
  const alloc::AssignmentFile written = alloc::read_assignment(work / "scout" / "assignment.json");
  EXPECT_EQ(written.totals.quantizable_bytes, chosen.bytes);
  ASSERT_EQ(written.linears.size(), chosen.format_of_linear.size());

  // scout.json records every candidate, the L3 flips and the selection.
  const nlohmann::json report =
      nlohmann::json::parse(read_text_file(work / "scout" / "scout.json"));
  EXPECT_EQ(report.at("schema"), "prismaquant.scout/1");
  EXPECT_EQ(report.at("candidates").size(), outcome.candidates.size());
  EXPECT_FALSE(report.at("l3").at("flips").empty());
  EXPECT_TRUE(report.at("selection").contains("pick"));
  EXPECT_TRUE(fs::exists(work / "scout" / "scout.svg"));

  // L2 probed the quantized model: a probe of its own fingerprint beside the clean one.
  const fs::path l2_probe = work / "scout" / "l2" / "4.75" / "pass1" / "probe";
  EXPECT_NE(probe::ProbeResult::read(l2_probe).fingerprint(),
            probe::ProbeResult::read(work / "probe").fingerprint());
}

TEST_F(ScoutStageTest, MissingCostTableIsAnError) {
  test::TempDir work;
  EXPECT_THROW(run_scout(small_job(work.path())), Error);
}

// cost.json's meta.objective of another type escaped as nlohmann's type_error (the CLI's
// "internal error") instead of a pq::Error naming the file.
TEST_F(ScoutStageTest, CostTableWithANonStringObjectiveIsAnError) {
  test::TempDir work;
  probe_and_cost(work.path());
  const fs::path cost_json = work / "cost" / "cost.json";
  nlohmann::json doc = nlohmann::json::parse(read_text_file(cost_json));
  doc["meta"]["objective"] = 5;
  write_text_file_atomic(cost_json, doc.dump());
  EXPECT_THAT([&] { run_scout(small_job(work.path())); },
              ::testing::ThrowsMessage<Error>(
                  ::testing::HasSubstr(cost_json.string() + ": meta.objective is not a string")));
}

}  // namespace
}  // namespace pq::scout
