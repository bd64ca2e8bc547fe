// quantize end to end on the MiniMax-M2 tiny checkpoint (native FP8 128x128 block weights, no
// tokenizer): calibration and held-out data as token ids, FP8_SOURCE on the menu for the Linears
// stored as FP8 (and only those), the exported FP8_SOURCE tensors byte-identical to the source,
// bits charged equal to bytes on disk, and validate reproducing the KL measured before export.
#include <gtest/gtest.h>

#include <cstdint>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "common/file_util.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "model/model_spec.h"
#include "pipeline/quantize_pipeline.h"
#include "support/sha256.h"
#include "support/test_support.h"

namespace pq::pipeline {
namespace {

namespace fs = std::filesystem;

TEST(MiniMaxM2Quantize, TokenIdsEndToEndWithFp8SourceKeptByteForByte) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  QuantizeJob job;
  job.model = test::shared_dir() / "models" / "minimax_m2-tiny-random";
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

  // The menu gained FP8_SOURCE, and the cost stage offered it to the FP8 Linears alone.
  const auto cost = nlohmann::json::parse(read_text_file(dir / "out.work/cost/cost.json"));
  const model::ModelSpec spec = model::load_model_spec(job.model);
  bool menu_has_fp8_source = false;
  for (const auto& name : cost.at("formats")) menu_has_fp8_source |= name == "FP8_SOURCE";
  EXPECT_TRUE(menu_has_fp8_source);
  for (const auto& row : cost.at("linears")) {
    const model::Linear* linear = spec.find_linear(row.at("name").get<std::string>());
    ASSERT_NE(linear, nullptr);
    const auto& costs = row.at("costs");
    EXPECT_EQ(costs.contains("FP8_SOURCE"), linear->is_fp8_source()) << linear->name;
    // Its bytes are the source's: no error against the source.
    if (costs.contains("FP8_SOURCE")) {
      EXPECT_EQ(costs.at("FP8_SOURCE").at("weight_mse").get<double>(), 0.0) << linear->name;
    }
  }

  std::ifstream in(test::shared_dir() / "fixtures" / "minimax_m2-tiny-random-logits.json");
  const nlohmann::json digests = nlohmann::json::parse(in).at("fp8_source_sha256");
  const io::Checkpoint exported = io::Checkpoint::open(job.out);
  std::map<std::string, int> formats;
  for (const auto& linear : assignment.at("linears")) {
    const std::string name = linear.at("name");
    const std::string format = linear.at("format");
    ++formats[format];
    if (format != "FP8_SOURCE") continue;
    EXPECT_EQ(test::sha256_hex(exported.view(name + ".weight").bytes), digests.at(name + ".weight"))
        << name;
    EXPECT_EQ(test::sha256_hex(exported.view(name + ".weight_scale").bytes),
              digests.at(name + ".weight_scale_inv"))
        << name;
  }
  EXPECT_GT(formats["FP8_SOURCE"], 0);
  EXPECT_LT(formats["FP8_SOURCE"], std::ssize(assignment.at("linears")));
}

}  // namespace
}  // namespace pq::pipeline
