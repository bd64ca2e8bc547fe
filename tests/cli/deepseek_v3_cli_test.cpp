// DeepSeek-V3 (MLA, native FP8, MTP layer) through the built binary: inspect reports the Linears
// stored as FP8, eval and generate (cached decoding of the latent attention) run the model from
// its FP8 weights.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "cli/cli_runner.h"
#include "support/test_support.h"

namespace pq {
namespace {

using test::quoted;
using test::run_prismaquant;
using test::RunResult;

std::filesystem::path checkpoint() {
  return test::shared_dir() / "models" / "deepseek_v3-tiny-random";
}

// Every decoder-layer Linear of the 4 body layers and the MTP layer (model_spec_deepseek_v3_test).
TEST(DeepSeekV3Cli, InspectReportsTheFp8SourceLinears) {
  PQ_REQUIRE_SHARED();
  const RunResult text = run_prismaquant("inspect " + quoted(checkpoint()));
  ASSERT_EQ(text.exit_code, 0) << text.err;
  for (const char* line : {"DeepseekV3ForCausalLM (profile deepseek_v3), untied",
                           "fp8 source    232 Linears stored as 128x128 block-scaled FP8"}) {
    EXPECT_NE(text.out.find(line), std::string::npos) << line << "\n" << text.out;
  }
}

TEST(DeepSeekV3Cli, EvalAndGenerateRunFromTheFp8Weights) {
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

// The FP8 KV cache calibrates per-head keys and values; MLA caches a latent: refused in one line
// before anything is written.
TEST(DeepSeekV3Cli, Fp8KvCacheIsRefusedForLatentAttention) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  std::ofstream(dir / "ids.txt") << "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n";
  const RunResult probe = run_prismaquant(
      "probe " + quoted(checkpoint()) + " --token-ids " + quoted(dir / "ids.txt") + " --out " +
      quoted(dir / "probe") + " --nsamples 1 --seqlen 8 --kv-cache fp8");
  EXPECT_NE(probe.exit_code, 0);
  EXPECT_NE(probe.err.find("multi-head latent attention, whose cached latent is not supported"),
            std::string::npos)
      << probe.err;
  EXPECT_FALSE(std::filesystem::exists(dir / "probe"));
}

}  // namespace
}  // namespace pq
