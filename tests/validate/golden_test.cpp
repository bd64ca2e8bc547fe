// The consumer-side decoder on tensors whose bytes were worked out by hand from the
// compressed-tensors rules (format-facts.md A.1, A.2, Part B). Every scheme the exporter writes
// has a case; each byte is derived in the comment beside it.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <map>

#include "common/error.h"
#include "formats/weight_format.h"
#include "validate/ct_checkpoint.h"
#include "validate/ct_decode.h"

namespace pq::validate {
namespace {

using io::DType;

// The scheme the exporter writes for a prismaquant format: its config group as JSON, parsed by
// the reader.
Scheme scheme_of(const std::string& format) {
  nlohmann::json body = formats::format_by_name(format).config_group();
  body["targets"] = {"Linear"};
  return parse_scheme("group_0", body, "mixed-precision");
}

struct Tensor {
  DType dtype;
  std::vector<std::int64_t> shape;
  std::vector<std::uint8_t> bytes;
};

std::vector<float> decode(const std::string& format, std::int64_t out, std::int64_t in,
                          const std::map<std::string, Tensor>& tensors) {
  return decode_weight(scheme_of(format), out, in, [&](std::string_view suffix) {
    const Tensor& t = tensors.at(std::string(suffix));
    return StoredTensor{t.dtype, t.shape, t.bytes};
  });
}

// Little-endian bytes of an f32.
std::vector<std::uint8_t> f32_bytes(float v) {
  const auto bits = std::bit_cast<std::uint32_t>(v);
  return {static_cast<std::uint8_t>(bits), static_cast<std::uint8_t>(bits >> 8),
          static_cast<std::uint8_t>(bits >> 16), static_cast<std::uint8_t>(bits >> 24)};
}

template <typename T>
std::vector<T> repeat(const std::vector<T>& pattern, std::size_t times) {
  std::vector<T> out;
  for (std::size_t i = 0; i < times; ++i) out.insert(out.end(), pattern.begin(), pattern.end());
  return out;
}

void expect_bits_eq(const std::vector<float>& actual, const std::vector<float>& expected) {
  ASSERT_EQ(actual.size(), expected.size());
  for (std::size_t i = 0; i < actual.size(); ++i) {
    EXPECT_EQ(std::bit_cast<std::uint32_t>(actual[i]), std::bit_cast<std::uint32_t>(expected[i]))
        << "element " << i << ": " << actual[i] << " vs " << expected[i];
  }
}

// E2M1 codes 0..15 in column order, two per byte, even column in the low nibble:
// byte j = code(2j) | code(2j+1) << 4 = (2j) | (2j+1) << 4.
const std::vector<std::uint8_t> kCodes0To15 = {0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE};
// Their values: sign << 3 | index, index -> 0, 0.5, 1, 1.5, 2, 3, 4, 6.
const std::vector<float> kE2M1Values = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                        -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

std::vector<float> scaled(const std::vector<float>& values, float by) {
  std::vector<float> out;
  for (const float v : values) out.push_back(v * by);
  return out;
}

TEST(GoldenDecode, Nvfp4A16TwoRows) {
  // Row 0: codes 0..15, E4M3 scale 0x38 = 0|0111|000 = 2^(7-7) = 1, global 2: step 1/2.
  // Row 1: every byte 0x21 -> even columns code 1 (0.5), odd columns code 2 (1.0); scale
  // 0x40 = 0|1000|000 = 2, step 2/2 = 1.
  std::vector<std::uint8_t> packed = kCodes0To15;
  for (int j = 0; j < 8; ++j) packed.push_back(0x21);
  const auto w = decode("NVFP4A16", 2, 16,
                        {{"weight_packed", {DType::U8, {2, 8}, packed}},
                         {"weight_scale", {DType::F8_E4M3, {2, 1}, {0x38, 0x40}}},
                         {"weight_global_scale", {DType::F32, {1}, {0x00, 0x00, 0x00, 0x40}}}});
  std::vector<float> expected = scaled(kE2M1Values, 0.5f);
  for (int j = 0; j < 8; ++j) {
    expected.push_back(0.5f);
    expected.push_back(1.0f);
  }
  expect_bits_eq(w, expected);
}

TEST(GoldenDecode, Nvfp4W4A4) {
  // 0xF7: low nibble 7 (+6) for even columns, high nibble 0xF (-6) for odd ones. Scale
  // 0x3C = 0|0111|100 = 1.5, global 1.0 (0x3F800000): values +-9. input_global_scale (100.0 =
  // 0x42C80000) is required by the scheme but does not enter the weight.
  const auto w = decode("NVFP4", 1, 16,
                        {{"weight_packed", {DType::U8, {1, 8}, repeat<std::uint8_t>({0xF7}, 8)}},
                         {"weight_scale", {DType::F8_E4M3, {1, 1}, {0x3C}}},
                         {"weight_global_scale", {DType::F32, {1}, {0x00, 0x00, 0x80, 0x3F}}},
                         {"input_global_scale", {DType::F32, {1}, {0x00, 0x00, 0xC8, 0x42}}}});
  expect_bits_eq(w, repeat<float>({9.0f, -9.0f}, 8));
}

TEST(GoldenDecode, Mxfp4A16) {
  // Codes 0..15 twice along 32 columns; E8M0 126 = 2^(126-127) = 0.5.
  const auto w = decode("MXFP4A16", 1, 32,
                        {{"weight_packed", {DType::U8, {1, 16}, repeat(kCodes0To15, 2)}},
                         {"weight_scale", {DType::U8, {1, 1}, {126}}}});
  expect_bits_eq(w, repeat(scaled(kE2M1Values, 0.5f), 2));
}

TEST(GoldenDecode, Mxfp4) {
  // The same codes with E8M0 129 = 2^2 = 4.
  const auto w = decode("MXFP4", 1, 32,
                        {{"weight_packed", {DType::U8, {1, 16}, repeat(kCodes0To15, 2)}},
                         {"weight_scale", {DType::U8, {1, 1}, {129}}}});
  expect_bits_eq(w, repeat(scaled(kE2M1Values, 4.0f), 2));
}

// E4M3 bytes and their values (bias 7): 0x00 = 0; 0x01 = subnormal 2^-6 * 1/8 = 2^-9;
// 0x08 = 0|0001|000 = 2^-6; 0x38 = 0|0111|000 = 1; 0x3C = 0|0111|100 = 1.5;
// 0x7E = 0|1111|110 = 2^8 * 1.75 = 448; 0xB8 = 1|0111|000 = -1; 0xFE = -448.
const std::vector<std::uint8_t> kE4M3Bytes = {0x00, 0x01, 0x08, 0x38, 0x3C, 0x7E, 0xB8, 0xFE};
const std::vector<float> kE4M3Values = {0.0f, 0x1p-9f, 0x1p-6f, 1.0f, 1.5f, 448.0f, -1.0f, -448.0f};

TEST(GoldenDecode, Mxfp8A16) {
  // E8M0 130 = 2^3 = 8.
  const auto w = decode("MXFP8A16", 1, 32,
                        {{"weight", {DType::F8_E4M3, {1, 32}, repeat(kE4M3Bytes, 4)}},
                         {"weight_scale", {DType::U8, {1, 1}, {130}}}});
  expect_bits_eq(w, repeat(scaled(kE4M3Values, 8.0f), 4));
}

TEST(GoldenDecode, Mxfp8TwoGroups) {
  // Columns 0..31 under E8M0 127 = 1, columns 32..63 under E8M0 0 = 2^-127.
  const auto w = decode("MXFP8", 1, 64,
                        {{"weight", {DType::F8_E4M3, {1, 64}, repeat(kE4M3Bytes, 8)}},
                         {"weight_scale", {DType::U8, {1, 2}, {127, 0}}}});
  std::vector<float> expected = repeat(kE4M3Values, 4);
  const auto tiny = repeat(scaled(kE4M3Values, 0x1p-127f), 4);
  expected.insert(expected.end(), tiny.begin(), tiny.end());
  expect_bits_eq(w, expected);
}

// FP8 per-channel and weight-only: rows {0x38, 0x40, 0x44, 0xB0} = {1, 2, 3, -0.5}
// (0x40 = 0|1000|000 = 2, 0x44 = 0|1000|100 = 3, 0xB0 = 1|0110|000 = -0.5) and
// {0x30, 0x00, 0x7E, 0xC0} = {0.5, 0, 448, -2}; F32 scales [2, 1]: 0.5 (0x3F000000) and
// 4 (0x40800000).
const std::vector<std::uint8_t> kFp8Weight = {0x38, 0x40, 0x44, 0xB0, 0x30, 0x00, 0x7E, 0xC0};
const std::vector<std::uint8_t> kChannelScales = {0x00, 0x00, 0x00, 0x3F, 0x00, 0x00, 0x80, 0x40};
const std::vector<float> kChannelExpected = {0.5f, 1.0f, 1.5f, -0.25f, 2.0f, 0.0f, 1792.0f, -8.0f};

TEST(GoldenDecode, Fp8Channel) {
  const auto w = decode("FP8_E4M3", 2, 4,
                        {{"weight", {DType::F8_E4M3, {2, 4}, kFp8Weight}},
                         {"weight_scale", {DType::F32, {2, 1}, kChannelScales}}});
  expect_bits_eq(w, kChannelExpected);
}

TEST(GoldenDecode, Fp8WeightOnly) {
  EXPECT_EQ(scheme_of("FP8_E4M3A16").format, "naive-quantized");
  const auto w = decode("FP8_E4M3A16", 2, 4,
                        {{"weight", {DType::F8_E4M3, {2, 4}, kFp8Weight}},
                         {"weight_scale", {DType::F32, {2, 1}, kChannelScales}}});
  expect_bits_eq(w, kChannelExpected);
}

TEST(GoldenDecode, Fp8Tensor) {
  // One F32 scale 0.25 = 0x3E800000 for the whole tensor.
  const auto w = decode("FP8_E4M3_TENSOR", 2, 4,
                        {{"weight", {DType::F8_E4M3, {2, 4}, kFp8Weight}},
                         {"weight_scale", {DType::F32, {1}, {0x00, 0x00, 0x80, 0x3E}}}});
  expect_bits_eq(w, {0.25f, 0.5f, 0.75f, -0.125f, 0.125f, 0.0f, 112.0f, -0.5f});
}

TEST(GoldenDecode, Fp8Block) {
  // [129, 256] in 128x128 blocks: scales [ceil(129/128), 256/128] = [2, 2], F32 1, 2, 4, 8
  // (0x3F800000, 0x40000000, 0x40800000, 0x41000000). Every code 0x38 (= 1) except the last
  // element, 0xC0 (= -2).
  std::vector<std::uint8_t> weight(129 * 256, 0x38);
  weight.back() = 0xC0;
  const auto w = decode("FP8_BLOCK", 129, 256,
                        {{"weight", {DType::F8_E4M3, {129, 256}, weight}},
                         {"weight_scale",
                          {DType::F32,
                           {2, 2},
                           {0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x80, 0x40,
                            0x00, 0x00, 0x00, 0x41}}}});
  ASSERT_EQ(w.size(), 129u * 256u);
  EXPECT_EQ(w[0], 1.0f);                // block (0, 0)
  EXPECT_EQ(w[127 * 256 + 127], 1.0f);  // last element of block (0, 0)
  EXPECT_EQ(w[128], 2.0f);              // row 0, column 128: block (0, 1)
  EXPECT_EQ(w[127 * 256 + 255], 2.0f);
  EXPECT_EQ(w[128 * 256], 4.0f);  // row 128: block (1, 0), the partial row block
  EXPECT_EQ(w[128 * 256 + 254], 8.0f);
  EXPECT_EQ(w[128 * 256 + 255], -16.0f);  // -2 * 8
}

TEST(GoldenDecode, Int8W8A16Channel) {
  // q = {-128, -1, 0, 127} stored as q + 128 = {0x00, 0x7F, 0x80, 0xFF}, element i in bits
  // [8i, 8i + 8) of one little-endian int32: 0xFF807F00 -> bytes 00 7F 80 FF. BF16 scale 0.5 =
  // 0x3F00 -> bytes 00 3F. weight_shape I64 [1, 4].
  const auto w = decode(
      "INT8_W8A16", 1, 4,
      {{"weight_packed", {DType::I32, {1, 1}, {0x00, 0x7F, 0x80, 0xFF}}},
       {"weight_scale", {DType::BF16, {1, 1}, {0x00, 0x3F}}},
       {"weight_shape", {DType::I64, {2}, {1, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0}}}});
  expect_bits_eq(w, {-64.0f, -0.5f, 0.0f, 63.5f});
}

TEST(GoldenDecode, Int4W4A16Group128) {
  // q = {-8, -7, -1, 0, 1, 2, 6, 7} stored as q + 8 = {0, 1, 7, 8, 9, 10, 14, 15}, element i in
  // bits [4i, 4i + 4): word 0xFEA98710 -> bytes 10 87 A9 FE, repeated for all 256 / 8 = 32 words.
  // BF16 group scales [1, 2]: 1.0 = 0x3F80 (bytes 80 3F) and 0.25 = 0x3E80 (bytes 80 3E).
  const auto w = decode(
      "INT4_W4A16", 1, 256,
      {{"weight_packed", {DType::I32, {1, 32}, repeat<std::uint8_t>({0x10, 0x87, 0xA9, 0xFE}, 32)}},
       {"weight_scale", {DType::BF16, {1, 2}, {0x80, 0x3F, 0x80, 0x3E}}},
       {"weight_shape", {DType::I64, {2}, {1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0}}}});
  const std::vector<float> q = {-8, -7, -1, 0, 1, 2, 6, 7};
  std::vector<float> expected = repeat(q, 16);
  const auto second = repeat(scaled(q, 0.25f), 16);
  expected.insert(expected.end(), second.begin(), second.end());
  expect_bits_eq(w, expected);
}

TEST(GoldenDecode, RejectsNanScales) {
  // E8M0 0xFF is NaN; E4M3 0x7F is NaN and 0xB8 a negative NVFP4 scale.
  EXPECT_THROW(decode("MXFP4A16", 1, 32,
                      {{"weight_packed", {DType::U8, {1, 16}, repeat(kCodes0To15, 2)}},
                       {"weight_scale", {DType::U8, {1, 1}, {0xFF}}}}),
               Error);
  for (const std::uint8_t bad : {0x7F, 0xB8}) {
    EXPECT_THROW(decode("NVFP4A16", 1, 16,
                        {{"weight_packed", {DType::U8, {1, 8}, kCodes0To15}},
                         {"weight_scale", {DType::F8_E4M3, {1, 1}, {bad}}},
                         {"weight_global_scale", {DType::F32, {1}, f32_bytes(1.0f)}}}),
                 Error);
  }
}

TEST(GoldenDecode, RejectsNanWeights) {
  // E4M3 0x7F = 0|1111|111 is NaN (OCP "fn": the only NaN pattern, no infinities).
  std::vector<std::uint8_t> weight = repeat(kE4M3Bytes, 4);
  weight[5] = 0x7F;
  EXPECT_THROW(decode("MXFP8A16", 1, 32,
                      {{"weight", {DType::F8_E4M3, {1, 32}, weight}},
                       {"weight_scale", {DType::U8, {1, 1}, {127}}}}),
               Error);
  std::vector<std::uint8_t> fp8 = kFp8Weight;
  fp8[2] = 0xFF;
  EXPECT_THROW(decode("FP8_E4M3", 2, 4,
                      {{"weight", {DType::F8_E4M3, {2, 4}, fp8}},
                       {"weight_scale", {DType::F32, {2, 1}, kChannelScales}}}),
               Error);
}

TEST(GoldenDecode, RejectsMisshapenTensors) {
  EXPECT_THROW(decode("MXFP8A16", 1, 32,
                      {{"weight", {DType::F8_E4M3, {1, 16}, repeat(kE4M3Bytes, 2)}},
                       {"weight_scale", {DType::U8, {1, 1}, {127}}}}),
               Error);
  EXPECT_THROW(decode("INT8_W8A16", 1, 4,
                      {{"weight_packed", {DType::I32, {1, 1}, {0, 0, 0, 0}}},
                       {"weight_scale", {DType::BF16, {1, 1}, {0x00, 0x3F}}},
                       {"weight_shape",
                        {DType::I64, {2}, {1, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0}}}}),
               Error);
}

TEST(SchemeParsing, EveryExportableFormatHasTheLayoutItsCompressorWrites) {
  const std::map<std::string, std::pair<Layout, ActivationKind>> expected = {
      {"NVFP4", {Layout::kNvfp4, ActivationKind::kNvfp4}},
      {"NVFP4A16", {Layout::kNvfp4, ActivationKind::kNone}},
      {"MXFP4", {Layout::kMxfp4, ActivationKind::kMxfp4}},
      {"MXFP4A16", {Layout::kMxfp4, ActivationKind::kNone}},
      {"MXFP8", {Layout::kMxfp8, ActivationKind::kMxfp8}},
      {"MXFP8A16", {Layout::kMxfp8, ActivationKind::kNone}},
      {"FP8_E4M3", {Layout::kFp8, ActivationKind::kFp8PerToken}},
      {"FP8_E4M3A16", {Layout::kFp8, ActivationKind::kNone}},
      {"FP8_E4M3_TENSOR", {Layout::kFp8, ActivationKind::kFp8PerToken}},
      {"FP8_BLOCK", {Layout::kFp8, ActivationKind::kFp8PerGroup}},
      {"INT8_W8A16", {Layout::kPackedInt, ActivationKind::kNone}},
      {"INT4_W4A16", {Layout::kPackedInt, ActivationKind::kNone}}};
  for (const auto& [format, kinds] : expected) {
    const Scheme scheme = scheme_of(format);
    EXPECT_EQ(scheme.layout, kinds.first) << format;
    EXPECT_EQ(scheme.activations, kinds.second) << format;
  }
}

TEST(SchemeParsing, RejectsWhatItCannotDecode) {
  nlohmann::json body = formats::format_by_name("INT4_W4A16").config_group();
  body["targets"] = {"Linear"};
  body["weights"]["symmetric"] = false;
  EXPECT_THROW(parse_scheme("g", body, "pack-quantized"), Error);
  body = formats::format_by_name("NVFP4A16").config_group();
  body["targets"] = {"Linear"};
  body["weights"]["group_size"] = 32;
  EXPECT_THROW(parse_scheme("g", body, "nvfp4-pack-quantized"), Error);
  body.erase("format");
  body["weights"]["group_size"] = 16;
  EXPECT_THROW(parse_scheme("g", body, "mixed-precision"), Error);
  EXPECT_EQ(parse_scheme("g", body, "nvfp4-pack-quantized").layout, Layout::kNvfp4);
  // MX scales are E8M0 bytes (torch.uint8), never E4M3.
  body = formats::format_by_name("MXFP8A16").config_group();
  body["targets"] = {"Linear"};
  body["weights"]["scale_dtype"] = "torch.float8_e4m3fn";
  EXPECT_THROW(parse_scheme("g", body, "mxfp8-quantized"), Error);
}

TEST(TargetMatching, FollowsCompressedTensorsRules) {
  const std::string q = "model.layers.0.self_attn.q_proj";
  EXPECT_EQ(match_target(q, q), MatchKind::kExact);
  EXPECT_EQ(match_target(q, "model.layers.0.self_attn"), MatchKind::kNone);
  // re.match: anchored at the start, free at the end.
  EXPECT_EQ(match_target(q, "re:model\\.layers\\.0\\."), MatchKind::kRegex);
  EXPECT_EQ(match_target(q, "re:.*q_proj$"), MatchKind::kRegex);
  EXPECT_EQ(match_target(q, "re:self_attn"), MatchKind::kNone);
  EXPECT_EQ(match_target(q, "re:.*self_attn"), MatchKind::kRegex);
  EXPECT_EQ(match_target(q, "Linear"), MatchKind::kClass);
  EXPECT_EQ(match_target(q, "Qwen3Attention"), MatchKind::kNone);
  EXPECT_THROW(match_target(q, "re:(unclosed"), Error);
}

}  // namespace
}  // namespace pq::validate
