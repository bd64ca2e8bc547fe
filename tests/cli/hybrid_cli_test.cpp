// The hybrid Qwen3.5/3.6 checkpoints through the built binary: `inspect` lists their inventory;
// the commands that run the model stop at once with one line naming what the runtime lacks, and
// leave nothing behind.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "cli/cli_runner.h"
#include "support/test_support.h"

namespace pq {
namespace {

namespace fs = std::filesystem;
using test::data_file;
using test::expect_one_line_error;
using test::quoted;
using test::run_prismaquant;
using test::RunResult;

fs::path shared_model(const char* name) {
  return test::shared_dir() / "models" / name;
}

TEST(HybridCli, InspectPrintsTheQwen3_5Inventory) {
  PQ_REQUIRE_SHARED();
  const RunResult result =
      run_prismaquant("inspect " + quoted(shared_model("qwen3_5-tiny-random")));
  ASSERT_EQ(result.exit_code, 0) << result.err;
  EXPECT_TRUE(result.err.empty()) << result.err;
  // Figures derived in tests/model/model_spec_hybrid_test.cpp.
  for (const char* line :
       {"Qwen3_5ForConditionalGeneration (profile qwen3_5), untied", "943,080 in 157 tensors",
        "components    text 726,600, mtp 123,328, vision 93,152", "70 Linears in 24 sibling groups",
        "in_proj_qkv", "mtp fc", "vision attn_qkv", "87 tensors kept as stored"}) {
    EXPECT_NE(result.out.find(line), std::string::npos) << line << "\n" << result.out;
  }
}

TEST(HybridCli, InspectJsonListsPackedExpertSlices) {
  PQ_REQUIRE_SHARED();
  const RunResult result =
      run_prismaquant("inspect " + quoted(shared_model("qwen3_5-moe-tiny-random")) + " --json");
  ASSERT_EQ(result.exit_code, 0) << result.err;
  const auto json = nlohmann::json::parse(result.out);
  EXPECT_EQ(json.at("family"), "qwen3_5_moe");
  EXPECT_EQ(json.at("num_params"), 957'976);
  EXPECT_EQ(json.at("num_tensors"), 146);
  EXPECT_EQ(json.at("num_linears"), 180);
  EXPECT_EQ(json.at("num_candidate_linears"), 159);
  EXPECT_EQ(json.at("num_sibling_groups"), 18);
  EXPECT_EQ(json.at("params_by_dtype").at("F32"), 108);
  std::size_t sliced = 0;
  std::size_t vision = 0;
  for (const auto& linear : json.at("linears")) {
    if (!linear.at("slice").is_null()) ++sliced;
    if (linear.at("component") == "vision") {
      ++vision;
      EXPECT_FALSE(linear.at("candidate").get<bool>()) << linear.at("name");
    }
  }
  EXPECT_EQ(sliced, 4u * 8 * 3);  // every body expert projection of the 4 layers
  EXPECT_EQ(vision, 10u);
}

TEST(HybridCli, RuntimeCommandsNameWhatTheRuntimeLacks) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  std::ofstream(dir / "ids.txt") << "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n";
  const std::string dense = quoted(shared_model("qwen3_5-tiny-random"));
  const std::string moe = quoted(shared_model("qwen3_5-moe-tiny-random"));
  const std::string lacks =
      "the runtime does not support the linear_attention layers and gated attention of "
      "\"Qwen3_5ForConditionalGeneration\" yet";
  expect_one_line_error(
      run_prismaquant("eval " + dense + " --token-ids " + quoted(dir / "ids.txt") + " --seqlen 8"),
      lacks);
  expect_one_line_error(
      run_prismaquant("eval " + moe + " --token-ids " + quoted(dir / "ids.txt") + " --seqlen 8"),
      "the runtime does not support the linear_attention layers, gated attention and shared "
      "experts of \"Qwen3_5MoeForConditionalGeneration\" yet");
  expect_one_line_error(run_prismaquant("generate " + dense + " --prompt-ids 1,2,3 -n 2"), lacks);
  // The stages that write refuse before creating anything.
  expect_one_line_error(run_prismaquant("probe " + dense + " --data " + data_file() + " --out " +
                                        quoted(dir / "probe")),
                        lacks);
  expect_one_line_error(run_prismaquant("cost " + dense + " --probe " + quoted(dir / "probe") +
                                        " --formats NVFP4,BF16 --out " + quoted(dir / "cost")),
                        lacks);
  expect_one_line_error(
      run_prismaquant("quantize " + dense + " --out " + quoted(dir / "q") +
                      " --formats NVFP4,BF16 --target-bits 6 --data " + data_file()),
      lacks);
  for (const char* name : {"probe", "cost", "q", "q.work"}) {
    EXPECT_FALSE(fs::exists(dir / name)) << name;
  }
}

}  // namespace
}  // namespace pq
