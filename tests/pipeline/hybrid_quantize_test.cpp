// quantize on the tiny Qwen3.5 checkpoints, which have an MTP head and no tokenizer: calibration
// and held-out data given as token ids, the MTP head probed from its own loss, and the exported
// checkpoint scored by validate exactly as measured before export.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "common/file_util.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "pipeline/quantize_pipeline.h"
#include "support/qwen3_next_checkpoint.h"
#include "support/test_support.h"

namespace pq::pipeline {
namespace {

namespace fs = std::filesystem;

// Tensors the exporter keeps as stored: the vision tower, the DeltaNet's A_log and conv1d, norms.
bool passthrough(const std::string& name) {
  return name.find("visual") != std::string::npos || name.find("A_log") != std::string::npos ||
         name.find("conv1d") != std::string::npos || name.find("norm") != std::string::npos;
}

// A parameter "qwen3_next-from-<model>" is the shared <model> rewritten in Qwen3-Next's layout
// (tests/support/qwen3_next_checkpoint.h).
constexpr std::string_view kDerivedQwen3Next = "qwen3_next-from-";

class HybridQuantize : public ::testing::TestWithParam<std::string> {};

TEST_P(HybridQuantize, TokenIdsEndToEndWithTheMtpHead) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  QuantizeJob job;
  if (GetParam().starts_with(kDerivedQwen3Next)) {
    job.model = dir / "qwen3_next";
    fs::create_directory(job.model);
    test::write_qwen3_next(job.model, GetParam().substr(kDerivedQwen3Next.size()));
  } else {
    job.model = test::shared_dir() / "models" / GetParam();
  }
  const model::ModelConfig config = model::ModelConfig::load(job.model);
  ASSERT_GT(config.mtp_num_hidden_layers, 0);
  job.data = test::write_token_ids(dir / "ids.txt", config.vocab_size, 4000);
  job.token_ids = true;
  job.out = dir / "out";
  job.nsamples = 4;
  job.seqlen = 64;
  job.eval_windows = 2;
  job.eval_seqlen = 64;
  const QuantizeOutcome outcome = run_quantize(job);

  // Before a kl-fisher cost the probe is the forward pass: the MTP head's Linears get their
  // Hessians from the MTP head's forward, and no Fisher trace is taken.
  const auto probe = nlohmann::json::parse(read_text_file(dir / "out.work/probe/probe.json"));
  EXPECT_FALSE(probe.at("calibration").at("fisher").get<bool>());
  bool mtp_measured = false;
  for (const auto& linear : probe.at("linears")) {
    if (!linear.at("name").get<std::string>().starts_with("mtp.")) continue;
    mtp_measured = true;
    EXPECT_GT(linear.at("tokens").get<std::int64_t>(), 0) << linear.at("name");
    EXPECT_FALSE(linear.contains("fisher_trace")) << linear.at("name");
  }
  EXPECT_TRUE(mtp_measured);
  EXPECT_TRUE(fs::exists(dir / "out.work/probe/probe.mtp.safetensors"));
  // The default kl-fisher cost measures the MTP head's Linears by the KL of its own logits: a
  // positive predicted change for every quantized format offered to them.
  const auto cost = nlohmann::json::parse(read_text_file(dir / "out.work/cost/cost.json"));
  EXPECT_EQ(cost.at("meta").at("objective"), "kl-fisher");
  std::size_t mtp_costs = 0;
  for (const auto& linear : cost.at("linears")) {
    if (!linear.at("name").get<std::string>().starts_with("mtp.")) continue;
    for (const auto& [format, entry] : linear.at("costs").items()) {
      if (format == "BF16") continue;
      EXPECT_GT(entry.at("predicted_dloss").get<double>(), 0.0) << linear.at("name") << format;
      ++mtp_costs;
    }
  }
  EXPECT_GT(mtp_costs, 0u);

  EXPECT_GT(outcome.measured.mean_kl, 0.0);
  EXPECT_EQ(outcome.validated.mean_kl, outcome.measured.mean_kl);
  // Bits charged == bytes on disk, the vision tower and the MTP head included.
  const auto assignment =
      nlohmann::json::parse(read_text_file(dir / "out.work/alloc/assignment.json"));
  EXPECT_EQ(outcome.exported.tensor_bytes,
            assignment.at("totals").at("checkpoint_bytes").get<std::uint64_t>());

  const io::Checkpoint source = io::Checkpoint::open(job.model);
  const io::Checkpoint exported = io::Checkpoint::open(job.out);
  std::size_t compared = 0;
  for (const std::string& name : source.tensor_names()) {
    if (!passthrough(name)) continue;
    ASSERT_TRUE(exported.contains(name)) << name;
    const auto a = source.view(name).bytes;
    const auto b = exported.view(name).bytes;
    EXPECT_TRUE(std::equal(a.begin(), a.end(), b.begin(), b.end())) << name;
    ++compared;
  }
  EXPECT_GT(compared, 0u);
}

INSTANTIATE_TEST_SUITE_P(TinyQwen3_5, HybridQuantize,
                         ::testing::Values("qwen3_5-tiny-random", "qwen3_5-moe-tiny-random",
                                           "qwen3_next-from-qwen3_5-tiny-random",
                                           "qwen3_next-from-qwen3_5-moe-tiny-random"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

}  // namespace
}  // namespace pq::pipeline
