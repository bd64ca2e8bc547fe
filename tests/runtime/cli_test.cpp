#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "support/test_support.h"

namespace pq::runtime {
namespace {

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr
};

CommandResult run_cli(const std::string& arguments) {
  const std::string command = fmt::format("'{}' {} 2>&1", PQ_CLI_PATH, arguments);
  CommandResult result;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return result;
  char buffer[4096];
  std::size_t n;
  while ((n = std::fread(buffer, 1, sizeof buffer, pipe)) > 0) result.output.append(buffer, n);
  const int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

nlohmann::json dense_fixture() {
  std::ifstream in(test::shared_dir() / "fixtures" / "qwen3-dense-tiny-logits.json");
  return nlohmann::json::parse(in);
}

TEST(Cli, GenerateWithPromptIdsReproducesFixtureGreedyIds) {
  PQ_REQUIRE_SHARED();
  const auto fixture = dense_fixture();
  const auto prompt = fixture["greedy_prompt"].get<std::vector<std::int32_t>>();
  const auto expected = fixture["greedy_ids"].get<std::vector<std::int32_t>>();
  const CommandResult r =
      run_cli(fmt::format("generate '{}' --prompt-ids '{}' -n {} --print-ids",
                          (test::shared_dir() / "models" / "qwen3-dense-tiny").string(),
                          fmt::join(prompt, ","), expected.size()));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output, fmt::format("{}\n", fmt::join(expected, " ")));
}

TEST(Cli, EvalWithTokenIdsReproducesFixturePerplexity) {
  PQ_REQUIRE_SHARED();
  const auto fixture = dense_fixture();
  test::TempDir tmp;
  std::ofstream(tmp / "ids.txt") << fmt::format(
      "{}\n", fmt::join(fixture["ppl_token_ids"].get<std::vector<std::int32_t>>(), " "));
  const CommandResult r = run_cli(fmt::format(
      "eval '{}' --token-ids '{}' --seqlen 128 --max-seqs 8",
      (test::shared_dir() / "models" / "qwen3-dense-tiny").string(), (tmp / "ids.txt").string()));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto at = r.output.find("perplexity: ");
  ASSERT_NE(at, std::string::npos) << r.output;
  const double perplexity = std::stod(r.output.substr(at + 12));
  EXPECT_NEAR(perplexity / fixture["perplexity"].get<double>(), 1.0, 1e-3);
  EXPECT_NE(r.output.find("windows: 8 x 128 tokens (1016 predictions)"), std::string::npos);
}

TEST(Cli, UserErrorsAreOneLineAndExitOne) {
  test::TempDir tmp;
  for (const std::string& args :
       {fmt::format("eval '{}' --token-ids '{}'", (tmp / "missing").string(),
                    (tmp / "ids.txt").string()),
        fmt::format("eval '{}'", tmp.path().string()),
        fmt::format("generate '{}' --prompt-ids 1,x,3", tmp.path().string())}) {
    SCOPED_TRACE(args);
    const CommandResult r = run_cli(args);
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_EQ(r.output.rfind("prismaquant: error: ", 0), 0u) << r.output;
    EXPECT_EQ(r.output.find('\n'), r.output.size() - 1) << r.output;
  }
}

}  // namespace
}  // namespace pq::runtime
