// Block-scaled FP8 weights (io/fp8_block.h) written here with partial edge blocks, which the
// shared checkpoints (all dimensions multiples of 128) do not have: every element is its E4M3
// value times the scale of the 128x128 block that holds it.
#include "io/fp8_block.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/error.h"
#include "io/dtype.h"
#include "io/safetensors_writer.h"
#include "support/test_support.h"

namespace pq::io {
namespace {

using ::testing::HasSubstr;

constexpr std::int64_t kRows = 300;     // blocks of 128, 128 and 44 rows
constexpr std::int64_t kColumns = 130;  // blocks of 128 and 2 columns

struct Written {
  std::vector<std::uint8_t> codes;
  std::vector<float> scales;  // [3, 2]
};

std::vector<std::uint8_t> bytes_of(const std::vector<float>& values) {
  std::vector<std::uint8_t> bytes(values.size() * 4);
  std::memcpy(bytes.data(), values.data(), bytes.size());
  return bytes;
}

// A checkpoint with "w.weight" (F8_E4M3 [300, 130]) and its scale in `scale_dtype`, and a
// plain BF16 "e.weight" [4, 130]; returns what was written.
Written write_checkpoint(const std::filesystem::path& dir, DType scale_dtype,
                         std::vector<std::int64_t> scale_shape = {3, 2}) {
  Written w;
  std::mt19937 rng(7);
  w.codes.resize(kRows * kColumns);
  for (std::uint8_t& code : w.codes) {
    do {
      code = static_cast<std::uint8_t>(rng());
    } while ((code & 0x7f) == 0x7f);  // E4M3's NaN codes
  }
  // Powers of two times small odd numbers: exact in BF16 as well as F32.
  w.scales = {0.5f, 0.25f, 0.375f, 1.5f, 0.0625f, 3.0f};
  SafetensorsWriter writer(dir / "model.safetensors");
  const std::vector<std::int64_t> shape = {kRows, kColumns};
  writer.add("w.weight", DType::F8_E4M3, shape, w.codes);
  std::vector<std::uint8_t> scale_bytes = bytes_of(w.scales);
  if (scale_dtype == DType::BF16) {
    std::vector<std::uint8_t> bf16;
    for (const float s : w.scales) {
      std::uint32_t bits;
      std::memcpy(&bits, &s, 4);
      bf16.push_back(static_cast<std::uint8_t>(bits >> 16));
      bf16.push_back(static_cast<std::uint8_t>(bits >> 24));
    }
    scale_bytes = bf16;
  }
  scale_bytes.resize(static_cast<std::size_t>(scale_shape[0] * scale_shape[1]) *
                     dtype_size(scale_dtype));
  writer.add("w.weight_scale_inv", scale_dtype, scale_shape, scale_bytes);
  const std::vector<std::uint16_t> ones(4 * kColumns, 0x3f80);
  std::vector<std::uint8_t> e(ones.size() * 2);
  std::memcpy(e.data(), ones.data(), e.size());
  writer.add("e.weight", DType::BF16, std::vector<std::int64_t>{4, kColumns}, e);
  writer.commit();
  return w;
}

float expected_at(const Written& w, std::int64_t r, std::int64_t c) {
  return f8e4m3_bits_to_f32(w.codes[r * kColumns + c]) * w.scales[(r / 128) * 2 + c / 128];
}

TEST(Fp8Block, DequantizesEveryBlockIncludingPartialEdges) {
  for (const DType scale_dtype : {DType::F32, DType::BF16}) {
    SCOPED_TRACE(dtype_name(scale_dtype));
    test::TempDir dir;
    const Written w = write_checkpoint(dir.path(), scale_dtype);
    const Checkpoint checkpoint = Checkpoint::open(dir.path());
    EXPECT_TRUE(is_fp8_block_weight(checkpoint, "w.weight"));
    EXPECT_FALSE(is_fp8_block_weight(checkpoint, "e.weight"));
    const std::vector<float> all = decode_weight(checkpoint, "w.weight");
    ASSERT_EQ(std::ssize(all), kRows * kColumns);
    for (std::int64_t r = 0; r < kRows; ++r) {
      for (std::int64_t c = 0; c < kColumns; ++c) {
        ASSERT_EQ(all[r * kColumns + c], expected_at(w, r, c)) << r << ", " << c;
      }
    }
    // Rows looked up one by one (an expert's slice, an embedding lookup) carry their block row.
    const std::vector<std::int64_t> rows = {299, 0, 128, 255, 256};
    const std::vector<float> picked = decode_weight_rows(checkpoint, "w.weight", rows);
    for (std::size_t i = 0; i < rows.size(); ++i) {
      for (std::int64_t c = 0; c < kColumns; ++c) {
        EXPECT_EQ(picked[i * kColumns + c], expected_at(w, rows[i], c));
      }
    }
    EXPECT_EQ(decode_weight(checkpoint, "e.weight"), std::vector<float>(4 * kColumns, 1.0f));
  }
}

TEST(Fp8Block, MissingOrMisshapenScalesAreOneLineErrors) {
  const auto error_of = [](auto f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  {
    test::TempDir dir;
    write_checkpoint(dir.path(), DType::F32, {2, 2});
    const Checkpoint checkpoint = Checkpoint::open(dir.path());
    EXPECT_THAT(error_of([&] { decode_weight(checkpoint, "w.weight"); }),
                HasSubstr("block scale w.weight_scale_inv has shape [2, 2], expected [3, 2]"));
  }
  {
    test::TempDir dir;
    write_checkpoint(dir.path(), DType::F16);
    const Checkpoint checkpoint = Checkpoint::open(dir.path());
    EXPECT_THAT(error_of([&] { decode_weight(checkpoint, "w.weight"); }),
                HasSubstr("has dtype F16, expected F32 or BF16"));
  }
  {
    test::TempDir dir;
    SafetensorsWriter writer(dir.path() / "model.safetensors");
    writer.add("lonely.weight", DType::F8_E4M3, std::vector<std::int64_t>{2, 2},
               std::vector<std::uint8_t>(4, 0x38));
    writer.commit();
    const Checkpoint checkpoint = Checkpoint::open(dir.path());
    EXPECT_THAT(error_of([&] { decode_weight(checkpoint, "lonely.weight"); }),
                HasSubstr("tensor lonely.weight is F8_E4M3 without its block scale "
                          "lonely.weight_scale_inv"));
  }
}

}  // namespace
}  // namespace pq::io
