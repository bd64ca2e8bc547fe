// Gemma 4 through the built binary: inspect names the profile and the passthrough vision tower,
// eval and generate run the text model, and an on-device variant's config is refused in one line.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "cli/cli_runner.h"
#include "common/json_reader.h"
#include "support/test_support.h"

namespace pq {
namespace {

using test::quoted;
using test::run_prismaquant;
using test::RunResult;

std::filesystem::path checkpoint(const char* name) {
  return test::shared_dir() / "models" / name;
}

// 12 layers: 10 sliding x 7 + 2 full x 6 candidates; the vision tower's 16 Linears pass through
// (model_spec_gemma4_test.cpp).
TEST(Gemma4Cli, InspectListsTheTextCandidatesAndTheTower) {
  PQ_REQUIRE_SHARED();
  const RunResult json =
      run_prismaquant("inspect " + quoted(checkpoint("gemma4-tiny-random")) + " --json");
  ASSERT_EQ(json.exit_code, 0) << json.err;
  const nlohmann::json inventory = nlohmann::json::parse(json.out);
  std::size_t candidates = 0, vision = 0;
  for (const auto& linear : inventory.at("linears")) {
    candidates += linear.at("candidate").get<bool>() ? 1 : 0;
    vision += linear.at("component") == "vision" ? 1 : 0;
  }
  EXPECT_EQ(candidates, 82u);
  EXPECT_EQ(vision, 16u);
}

TEST(Gemma4Cli, EvalAndGenerateRunTheTextModel) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  std::ofstream(dir / "ids.txt") << "2 17 33 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20\n";
  for (const char* name : {"gemma4-tiny-random", "gemma4-moe-tiny-random"}) {
    const RunResult eval = run_prismaquant("eval " + quoted(checkpoint(name)) + " --token-ids " +
                                           quoted(dir / "ids.txt") + " --seqlen 16");
    EXPECT_EQ(eval.exit_code, 0) << eval.err;
    EXPECT_NE(eval.out.find("perplexity"), std::string::npos) << eval.out;
    const RunResult generate = run_prismaquant("generate " + quoted(checkpoint(name)) +
                                               " --prompt-ids 2,17,33 -n 12 --print-ids");
    EXPECT_EQ(generate.exit_code, 0) << generate.err;
  }
}

TEST(Gemma4Cli, OnDeviceVariantIsRefusedInOneLine) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  const auto source = checkpoint("gemma4-tiny-random");
  nlohmann::json config = read_json_file(source / "config.json");
  config["text_config"]["hidden_size_per_layer_input"] = 256;
  std::ofstream(dir / "config.json") << config.dump(2);
  std::filesystem::copy_file(source / "model.safetensors", dir / "model.safetensors");
  const RunResult inspect = run_prismaquant("inspect " + quoted(dir.path()));
  EXPECT_NE(inspect.exit_code, 0);
  EXPECT_NE(inspect.err.find("hidden_size_per_layer_input"), std::string::npos) << inspect.err;
  EXPECT_EQ(std::count(inspect.err.begin(), inspect.err.end(), '\n'), 1) << inspect.err;
}

}  // namespace
}  // namespace pq
