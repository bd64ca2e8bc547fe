// quantize end to end on the DeepSeek-V3 tiny checkpoint (MLA, group-limited MoE, the MTP layer
// as model.layers.4, native FP8 128x128 block weights, no tokenizer): calibration and held-out
// data as token ids, the probe's MTP loss for the MTP layer's Linears, FP8_SOURCE on the menu for
// the Linears stored as FP8 (every candidate), the exported FP8_SOURCE tensors byte-identical to
// the source, bits charged equal to bytes on disk, and validate reproducing the KL measured
// before export.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "common/file_util.h"
#include "io/fp8_block.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "model/model_spec.h"
#include "pipeline/quantize_pipeline.h"
#include "support/sha256.h"
#include "support/test_support.h"

namespace pq::pipeline {
namespace {

TEST(DeepSeekV3Quantize, TokenIdsEndToEndWithFp8SourceKeptByteForByte) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  QuantizeJob job;
  job.model = test::shared_dir() / "models" / "deepseek_v3-tiny-random";
  const model::ModelConfig config = model::ModelConfig::load(job.model);
  job.data = test::write_token_ids(dir / "ids.txt", config.vocab_size, 4000, 3);
  job.token_ids = true;
  job.out = dir / "out";
  job.nsamples = 4;
  job.seqlen = 64;
  job.eval_windows = 2;
  job.eval_seqlen = 64;
  // Between NVFP4 (4.5) and FP8_SOURCE (8.002) bits per parameter: the knapsack mixes them.
  job.target_bits = "6";
  const QuantizeOutcome outcome = run_quantize(job);

  EXPECT_GT(outcome.measured.mean_kl, 0.0);
  EXPECT_EQ(outcome.validated.mean_kl, outcome.measured.mean_kl);
  const auto assignment =
      nlohmann::json::parse(read_text_file(dir / "out.work/alloc/assignment.json"));
  EXPECT_EQ(outcome.exported.tensor_bytes,
            assignment.at("totals").at("checkpoint_bytes").get<std::uint64_t>());

  // The probe measured the MTP layer's Linears in its own part, from the MTP head's forward
  // (before the kl-fisher cost it takes no Fisher trace).
  const auto probe = nlohmann::json::parse(read_text_file(dir / "out.work/probe/probe.json"));
  EXPECT_FALSE(probe.at("calibration").at("fisher").get<bool>());
  EXPECT_TRUE(std::filesystem::exists(dir / "out.work/probe/probe.mtp.safetensors"));

  // FP8_SOURCE offered to exactly the FP8 Linears whose input is whole 128-blocks (vLLM's block
  // FP8 quantizes activations in groups of 128: not q_b_proj, in 64, nor kv_b_proj, in 32), at
  // zero error.
  const auto cost = nlohmann::json::parse(read_text_file(dir / "out.work/cost/cost.json"));
  const model::ModelSpec spec = model::load_model_spec(job.model);
  bool menu_has_fp8_source = false;
  for (const auto& name : cost.at("formats")) menu_has_fp8_source |= name == "FP8_SOURCE";
  EXPECT_TRUE(menu_has_fp8_source);
  std::int64_t mtp_rows = 0;
  for (const auto& row : cost.at("linears")) {
    const model::Linear* linear = spec.find_linear(row.at("name").get<std::string>());
    ASSERT_NE(linear, nullptr);
    mtp_rows += linear->component == model::Component::kMtp;
    const auto& costs = row.at("costs");
    EXPECT_EQ(costs.contains("FP8_SOURCE"),
              linear->is_fp8_source() && linear->in_features % 128 == 0)
        << linear->name;
    if (costs.contains("FP8_SOURCE")) {
      EXPECT_EQ(costs.at("FP8_SOURCE").at("weight_mse").get<double>(), 0.0) << linear->name;
    }
  }
  EXPECT_EQ(mtp_rows, 56);

  // The fixture has no digests of the source: the source's own bytes are the reference.
  const io::Checkpoint source = io::Checkpoint::open(job.model);
  const io::Checkpoint exported = io::Checkpoint::open(job.out);
  std::map<std::string, int> formats;
  for (const auto& linear : assignment.at("linears")) {
    const std::string name = linear.at("name");
    const std::string format = linear.at("format");
    ++formats[format];
    if (format != "FP8_SOURCE") continue;
    EXPECT_EQ(test::sha256_hex(exported.view(name + ".weight").bytes),
              test::sha256_hex(source.view(name + ".weight").bytes))
        << name;
    EXPECT_EQ(test::sha256_hex(exported.view(name + ".weight_scale").bytes),
              test::sha256_hex(source.view(io::fp8_block_scale_name(name + ".weight")).bytes))
        << name;
  }
  std::printf(
      "[deepseek_v3-tiny-random] mean KL measured %.6g, validated %.6g; %d FP8_SOURCE of "
      "%zu Linears; %llu tensor bytes\n",
      outcome.measured.mean_kl, outcome.validated.mean_kl, formats["FP8_SOURCE"],
      assignment.at("linears").size(),
      static_cast<unsigned long long>(outcome.exported.tensor_bytes));
  EXPECT_GT(formats["FP8_SOURCE"], 0);
  EXPECT_LT(formats["FP8_SOURCE"], std::ssize(assignment.at("linears")));
}

}  // namespace
}  // namespace pq::pipeline
