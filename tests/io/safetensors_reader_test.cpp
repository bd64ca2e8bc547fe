#include <gtest/gtest.h>

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

}  // namespace
}  // namespace pq::io
