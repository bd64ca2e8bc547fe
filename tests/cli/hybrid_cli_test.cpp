// The hybrid checkpoints through the built binary: `inspect` lists the Qwen3.5/3.6 inventory,
// eval and generate run them and Qwen3-Next; text data without a tokenizer is refused in one line.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "cli/cli_runner.h"
#include "support/qwen3_next_checkpoint.h"
#include "support/test_support.h"

namespace pq {
namespace {

namespace fs = std::filesystem;
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

// The hybrid families run: eval scores the dense and the MoE Qwen3.5 tiny checkpoints and the
// MoE one rewritten as Qwen3-Next, and generate decodes with their Gated DeltaNet states.
TEST(HybridCli, EvalAndGenerateRunTheHybridFamilies) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  std::ofstream(dir / "ids.txt") << "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n";
  fs::create_directory(dir / "next");
  test::write_qwen3_next(dir / "next");
  for (const fs::path& model : {shared_model("qwen3_5-tiny-random"),
                                shared_model("qwen3_5-moe-tiny-random"), dir / "next"}) {
    const RunResult eval = run_prismaquant("eval " + quoted(model) + " --token-ids " +
                                           quoted(dir / "ids.txt") + " --seqlen 8");
    EXPECT_EQ(eval.exit_code, 0) << model << ": " << eval.err;
    EXPECT_NE(eval.out.find("perplexity"), std::string::npos) << eval.out;
    const RunResult generate =
        run_prismaquant("generate " + quoted(model) + " --prompt-ids 1,2,3 -n 4 --print-ids");
    EXPECT_EQ(generate.exit_code, 0) << model << ": " << generate.err;
  }
}

// The tiny Qwen3.5 checkpoints have no tokenizer: text data is refused in one line that points at
// --token-ids, before anything is created (tests/pipeline runs quantize on token ids).
TEST(HybridCli, TextDataWithoutATokenizerPointsAtTokenIds) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  const std::string dense = quoted(shared_model("qwen3_5-tiny-random"));
  const std::string lacks = "no tokenizer.json to tokenize";
  test::expect_one_line_error(run_prismaquant("probe " + dense + " --data " + test::data_file() +
                                              " --out " + quoted(dir / "probe")),
                              lacks);
  test::expect_one_line_error(
      run_prismaquant("quantize " + dense + " --out " + quoted(dir / "q") +
                      " --formats NVFP4,BF16 --target-bits 6 --data " + test::data_file()),
      lacks);
  EXPECT_FALSE(fs::exists(dir / "probe" / "probe.json"));
  EXPECT_FALSE(fs::exists(dir / "q"));
}

}  // namespace
}  // namespace pq
