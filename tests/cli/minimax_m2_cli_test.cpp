// MiniMax-M2 (native FP8) through the built binary: inspect reports the Linears stored as FP8,
// eval and generate run the model from its FP8 weights.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "cli/cli_runner.h"
#include "support/test_support.h"

namespace pq {
namespace {

using test::quoted;
using test::run_prismaquant;
using test::RunResult;

std::filesystem::path checkpoint() {
  return test::shared_dir() / "models" / "minimax_m2-tiny-random";
}

// 4 layers x (q, k, v, o + 8 experts x 3) FP8 Linears (model_spec_minimax_m2_test.cpp).
TEST(MiniMaxM2Cli, InspectReportsTheFp8SourceLinears) {
  PQ_REQUIRE_SHARED();
  const RunResult text = run_prismaquant("inspect " + quoted(checkpoint()));
  ASSERT_EQ(text.exit_code, 0) << text.err;
  for (const char* line :
       {"MiniMaxM2ForCausalLM (profile minimax_m2), untied",
        "fp8 source    112 Linears stored as 128x128 block-scaled FP8", "F8_E4M3"}) {
    EXPECT_NE(text.out.find(line), std::string::npos) << line << "\n" << text.out;
  }
  const RunResult json = run_prismaquant("inspect " + quoted(checkpoint()) + " --json");
  ASSERT_EQ(json.exit_code, 0) << json.err;
  std::size_t fp8 = 0;
  const nlohmann::json inventory = nlohmann::json::parse(json.out);
  for (const auto& linear : inventory.at("linears")) {
    if (linear.at("fp8_source_scale").is_null()) continue;
    ++fp8;
    EXPECT_EQ(linear.at("dtype"), "F8_E4M3") << linear.at("name");
  }
  EXPECT_EQ(fp8, 112u);
}

TEST(MiniMaxM2Cli, EvalAndGenerateRunFromTheFp8Weights) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  std::ofstream(dir / "ids.txt") << "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n";
  const RunResult eval = run_prismaquant("eval " + quoted(checkpoint()) + " --token-ids " +
                                         quoted(dir / "ids.txt") + " --seqlen 8");
  EXPECT_EQ(eval.exit_code, 0) << eval.err;
  EXPECT_NE(eval.out.find("perplexity"), std::string::npos) << eval.out;
  const RunResult generate =
      run_prismaquant("generate " + quoted(checkpoint()) + " --prompt-ids 1,2,3 -n 4 --print-ids");
  EXPECT_EQ(generate.exit_code, 0) << generate.err;
}

}  // namespace
}  // namespace pq
