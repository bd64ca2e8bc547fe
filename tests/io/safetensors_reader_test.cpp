#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "common/file_util.h"
#include "io/safetensors.h"
#include "support/test_support.h"

namespace pq::io {
namespace {

TEST(SafetensorsReader, ReadsStories260KShapesAndValues) {
  PQ_REQUIRE_SHARED();
  const auto f32 = Checkpoint::open(test::shared_dir() / "models/stories260K-f32");
  const auto bf16 = Checkpoint::open(test::shared_dir() / "models/stories260K");
  EXPECT_EQ(f32.tensor_names(), bf16.tensor_names());
  const auto& embed = f32.info("model.embed_tokens.weight");
  EXPECT_EQ(embed.dtype, DType::F32);
  EXPECT_EQ(embed.shape, (std::vector<std::int64_t>{512, 64}));
  EXPECT_EQ(bf16.info("model.embed_tokens.weight").dtype, DType::BF16);
  // The BF16 checkpoint was made from the F32 one by round-to-nearest-even, so each value
  // differs by at most half a BF16 ulp (2^-8 relative).
  const auto a = f32.to_f32("model.embed_tokens.weight");
  const auto b = bf16.to_f32("model.embed_tokens.weight");
  ASSERT_EQ(a.size(), b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    EXPECT_LE(std::abs(a[i] - b[i]), std::abs(a[i]) * (1.0f / 256.0f)) << i;
  }
}

// Every shared checkpoint opens, its tensors tile each file exactly, the embedding matches
// config.json, and every stored float decodes to a finite value.
TEST(SafetensorsReader, ReadsEverySharedCheckpoint) {
  PQ_REQUIRE_SHARED();
  for (const char* model :
       {"stories260K", "stories260K-f32", "qwen3-dense-tiny", "qwen3-moe-tiny"}) {
    SCOPED_TRACE(model);
    const auto dir = test::shared_dir() / "models" / model;
    const auto ckpt = Checkpoint::open(dir);
    ASSERT_EQ(ckpt.files().size(), 1u);
    const auto& file = *ckpt.files().front();
    EXPECT_EQ(file.metadata().at("format"), "pt");
    const auto raw = MappedFile(file.path());
    const auto header = parse_safetensors_header(raw.bytes(), file.path().string());
    EXPECT_EQ(header.data_offset + ckpt.total_tensor_bytes(), raw.size());

    const auto config = nlohmann::json::parse(read_text_file(dir / "config.json"));
    const std::vector<std::int64_t> embed_shape = {config["vocab_size"].get<std::int64_t>(),
                                                   config["hidden_size"].get<std::int64_t>()};
    EXPECT_EQ(ckpt.info("model.embed_tokens.weight").shape, embed_shape);
    for (const auto& name : ckpt.tensor_names()) {
      if (!dtype_is_float(ckpt.info(name).dtype)) continue;
      const auto values = ckpt.to_f32(name);
      ASSERT_EQ(static_cast<std::int64_t>(values.size()), ckpt.info(name).numel()) << name;
      for (const float v : values) ASSERT_TRUE(std::isfinite(v)) << name;
    }
  }
}

}  // namespace
}  // namespace pq::io
