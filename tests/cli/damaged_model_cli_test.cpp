// A checkpoint whose weights hold NaN or overflow float32 inside a layer: every command that
// computes with it stops with one line naming the tensor or the layer, and writes nothing
// (issue 13: no NaN may reach a report with exit 0).
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "cli/cli_runner.h"
#include "support/test_support.h"

namespace pq {
namespace {

namespace fs = std::filesystem;
using test::data_file;
using test::expect_one_line_error;
using test::quoted;
using test::run_prismaquant;

// A copy of qwen3-dense-tiny (BF16) in `dir` with elements [first, first + count) of `tensor`
// set to the BF16 bit pattern `bits`.
void write_damaged_copy(const fs::path& dir, const std::string& tensor, std::int64_t first,
                        std::int64_t count, std::uint16_t bits) {
  const fs::path source = test::shared_dir() / "models" / "qwen3-dense-tiny";
  for (const char* name : {"config.json", "tokenizer.json", "model.safetensors"}) {
    fs::copy_file(source / name, dir / name);
  }
  std::fstream file(dir / "model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
  std::uint64_t header_size = 0;
  file.read(reinterpret_cast<char*>(&header_size), 8);
  std::string header(header_size, '\0');
  file.read(header.data(), static_cast<std::streamsize>(header_size));
  const nlohmann::json entry = nlohmann::json::parse(header).at(tensor);
  ASSERT_EQ(entry.at("dtype"), "BF16");
  const std::int64_t begin = entry.at("data_offsets")[0].get<std::int64_t>();
  for (std::int64_t i = first; i < first + count; ++i) {
    file.seekp(static_cast<std::streamoff>(8 + header_size + begin + 2 * i));
    file.write(reinterpret_cast<const char*>(&bits), 2);
  }
  ASSERT_TRUE(file.good());
}

constexpr std::uint16_t kBf16Nan = 0x7fc0;
constexpr std::uint16_t kBf16Max = 0x7f7f;  // 3.39e38, the largest finite BF16

TEST(DamagedModelCli, NanWeightIsNamedByEvalGenerateAndQuantize) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  fs::create_directories(dir / "model");
  write_damaged_copy(dir / "model", "model.layers.0.mlp.down_proj.weight", 7, 1, kBf16Nan);
  const std::string named =
      "tensor model.layers.0.mlp.down_proj.weight holds a non-finite value (nan at element 7";

  expect_one_line_error(run_prismaquant("eval " + quoted(dir / "model") + " --data " + data_file() +
                                        " --seqlen 64 --max-seqs 2"),
                        named);
  expect_one_line_error(
      run_prismaquant("generate " + quoted(dir / "model") + " --prompt 'Once upon' -n 4"), named);
  expect_one_line_error(
      run_prismaquant("quantize " + quoted(dir / "model") + " --data " + data_file() + " --out " +
                      quoted(dir / "ckpt") + " --nsamples 2 --seqlen 64"),
      named);
  // Nothing of the failed run is left: no checkpoint, no work directory, no lock.
  EXPECT_FALSE(fs::exists(dir / "ckpt"));
  EXPECT_FALSE(fs::exists(dir / "ckpt.work"));
  EXPECT_FALSE(fs::exists(dir / "ckpt.lock"));
}

TEST(DamagedModelCli, OverflowInsideALayerIsNamed) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  fs::create_directories(dir / "model");
  // Finite weights, but a norm scale of 3.4e38 makes layer 2's MLP overflow float32.
  write_damaged_copy(dir / "model", "model.layers.2.post_attention_layernorm.weight", 0, 256,
                     kBf16Max);
  expect_one_line_error(run_prismaquant("eval " + quoted(dir / "model") + " --data " + data_file() +
                                        " --seqlen 64 --max-seqs 2"),
                        "decoder layer 2 produced a non-finite output");
}

}  // namespace
}  // namespace pq
