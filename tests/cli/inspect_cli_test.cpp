// Runs the built `prismaquant inspect` binary as a user would and checks its output and exit
// status. PQ_PRISMAQUANT_PATH is the binary's path, set by CMake.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/cli_runner.h"
#include "support/test_support.h"

namespace pq {
namespace {

using test::expect_one_line_error;
using test::quoted;
using test::read_file;
using test::run_prismaquant;
using test::RunResult;

TEST(InspectCli, JsonOnQwen3MoeTiny) {
  PQ_REQUIRE_SHARED();
  const RunResult result = run_prismaquant(
      "inspect " + quoted(test::shared_dir() / "models/qwen3-moe-tiny") + " --json");
  ASSERT_EQ(result.exit_code, 0) << result.err;
  EXPECT_TRUE(result.err.empty()) << result.err;
  const auto json = nlohmann::json::parse(result.out);
  EXPECT_EQ(json.at("architecture"), "Qwen3MoeForCausalLM");
  // Figures derived in tests/model/model_spec_shared_test.cpp.
  EXPECT_EQ(json.at("num_params"), 18'825'216);
  EXPECT_EQ(json.at("num_linears"), 174);
  EXPECT_EQ(json.at("num_candidate_linears"), 168);
  EXPECT_EQ(json.at("num_sibling_groups"), 12);
  ASSERT_EQ(json.at("linears").size(), 174u);
  for (const auto& linear : json.at("linears")) {
    for (const char* key : {"name", "shape", "role", "layer", "group"}) {
      EXPECT_TRUE(linear.contains(key)) << key;
    }
  }
  const auto& router = json.at("linears").at(4);
  EXPECT_EQ(router.at("name"), "model.layers.0.mlp.gate");
  EXPECT_EQ(router.at("role"), "router");
  EXPECT_EQ(router.at("candidate"), false);
  EXPECT_TRUE(router.at("group").is_null());
}

TEST(InspectCli, TextOnStories260K) {
  PQ_REQUIRE_SHARED();
  const RunResult result =
      run_prismaquant("inspect " + quoted(test::shared_dir() / "models/stories260K"));
  ASSERT_EQ(result.exit_code, 0) << result.err;
  EXPECT_NE(result.out.find("LlamaForCausalLM"), std::string::npos) << result.out;
  EXPECT_NE(result.out.find("260,032"), std::string::npos) << result.out;
  EXPECT_NE(result.out.find("35 Linears in 10 sibling groups"), std::string::npos) << result.out;
}

TEST(InspectCli, MissingDirectoryIsOneLineError) {
  test::TempDir dir;
  expect_one_line_error(run_prismaquant("inspect " + quoted(dir / "no-such-model")),
                        "no-such-model: no such model directory");
}

TEST(InspectCli, CorruptedSafetensorsIsOneLineError) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  const auto source = test::shared_dir() / "models/stories260K";
  std::filesystem::copy_file(source / "config.json", dir / "config.json");
  // The first 4 KiB of the real file: the header claims tensors the truncated file lacks.
  const std::string bytes = read_file(source / "model.safetensors").substr(0, 4096);
  std::ofstream(dir / "model.safetensors", std::ios::binary) << bytes;
  expect_one_line_error(run_prismaquant("inspect " + quoted(dir.path())), "model.safetensors");
}

TEST(InspectCli, UnsupportedArchitectureIsOneLineError) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  const auto source = test::shared_dir() / "models/stories260K";
  auto config = nlohmann::json::parse(read_file(source / "config.json"));
  config["architectures"] = {"GPT2LMHeadModel"};
  std::ofstream(dir / "config.json") << config.dump();
  std::filesystem::copy_file(source / "model.safetensors", dir / "model.safetensors");
  expect_one_line_error(run_prismaquant("inspect " + quoted(dir.path())),
                        "unsupported architecture \"GPT2LMHeadModel\"; supported: ");
}

}  // namespace
}  // namespace pq
