// The hybrid checkpoints through the built binary: `inspect` lists the Qwen3.5/3.6 inventory,
// eval runs them, and Qwen3-Next, which the runtime lacks, is refused in one line.
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

// Qwen3.5/3.6 run: eval scores the dense and the MoE tiny checkpoints.
TEST(HybridCli, EvalRunsQwen3_5) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  std::ofstream(dir / "ids.txt") << "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n";
  for (const char* name : {"qwen3_5-tiny-random", "qwen3_5-moe-tiny-random"}) {
    const RunResult result =
        run_prismaquant("eval " + quoted(shared_model(name)) + " --token-ids " +
                        quoted(dir / "ids.txt") + " --seqlen 8");
    EXPECT_EQ(result.exit_code, 0) << name << ": " << result.err;
    EXPECT_NE(result.out.find("perplexity"), std::string::npos) << result.out;
  }
}

// Qwen3-Next (a config.json of that architecture beside the MoE tiny weights) is still refused:
// the commands that run the model stop at once with one line naming what the runtime lacks, and
// leave nothing behind.
TEST(HybridCli, RuntimeCommandsNameWhatTheRuntimeLacks) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  std::ofstream(dir / "ids.txt") << "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n";
  const fs::path next_dir = dir / "next";
  fs::create_directory(next_dir);
  nlohmann::json config = nlohmann::json::parse(
      std::ifstream(shared_model("qwen3_5-moe-tiny-random") / "config.json"))["text_config"];
  config.erase("rope_parameters");
  config["architectures"] = {"Qwen3NextForCausalLM"};
  config["model_type"] = "qwen3_next";
  std::ofstream(next_dir / "config.json") << config.dump(2);
  fs::copy_file(shared_model("qwen3_5-moe-tiny-random") / "model.safetensors",
                next_dir / "model.safetensors");
  const std::string next = quoted(next_dir);
  const std::string lacks =
      "the runtime does not support the Gated DeltaNet and gated attention layout of "
      "\"Qwen3NextForCausalLM\" yet (it runs Qwen3_5ForConditionalGeneration and "
      "Qwen3_5MoeForConditionalGeneration)";
  expect_one_line_error(
      run_prismaquant("eval " + next + " --token-ids " + quoted(dir / "ids.txt") + " --seqlen 8"),
      lacks);
  expect_one_line_error(run_prismaquant("generate " + next + " --prompt-ids 1,2,3 -n 2"), lacks);
  // The stages that write refuse before creating anything.
  expect_one_line_error(run_prismaquant("probe " + next + " --data " + data_file() + " --out " +
                                        quoted(dir / "probe")),
                        lacks);
  expect_one_line_error(run_prismaquant("cost " + next + " --probe " + quoted(dir / "probe") +
                                        " --formats NVFP4,BF16 --out " + quoted(dir / "cost")),
                        lacks);
  expect_one_line_error(
      run_prismaquant("quantize " + next + " --out " + quoted(dir / "q") +
                      " --formats NVFP4,BF16 --target-bits 6 --data " + data_file()),
      lacks);
  for (const char* name : {"probe", "cost", "q", "q.work"}) {
    EXPECT_FALSE(fs::exists(dir / name)) << name;
  }
}

}  // namespace
}  // namespace pq
