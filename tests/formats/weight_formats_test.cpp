#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "common/error.h"
#include "formats/weight_format.h"
#include "io/safetensors.h"
#include "support/test_support.h"

namespace pq::formats {
namespace {

std::vector<float> random_weights(Shape2D s, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::vector<float> w(s.numel());
  for (float& v : w) v = normal(rng);
  w[s.numel() / 3] = 0.4f;                                                   // an outlier
  std::fill(w.begin(), w.begin() + std::min<std::int64_t>(s.in, 64), 0.0f);  // zero groups
  return w;
}

QuantizeOptions options_for(const WeightFormat& f) {
  QuantizeOptions o;
  if (f.name() == "NVFP4") o.input_global_scale = 448.0f * 6.0f / 10.0f;
  return o;
}

// FP8_SOURCE takes the source checkpoint's bytes instead of f32 weights.
struct Fp8SourceFixture {
  std::vector<std::uint8_t> weight;
  std::vector<std::uint8_t> scale_inv;
  Fp8SourceWeight view;
  explicit Fp8SourceFixture(Shape2D s) {
    std::mt19937 rng(11);
    weight.resize(s.numel());
    for (auto& b : weight) b = static_cast<std::uint8_t>(rng() % 0x7F) | (rng() % 2 ? 0x80 : 0);
    const std::size_t blocks = ((s.out + 127) / 128) * ((s.in + 127) / 128);
    std::vector<float> scales(blocks);
    for (std::size_t i = 0; i < blocks; ++i) scales[i] = 0.001f * static_cast<float>(i + 1);
    scale_inv.resize(blocks * 4);
    std::memcpy(scale_inv.data(), scales.data(), scale_inv.size());
    view = {weight, io::DType::F32, scale_inv};
  }
};

EncodedWeight quantize_any(const WeightFormat& f, std::span<const float> w, Shape2D s,
                           Fp8SourceFixture& src) {
  QuantizeOptions o = options_for(f);
  o.fp8_source = &src.view;
  return f.quantize(w, s, o);
}

TEST(WeightFormats, RegistryListsEveryFormatOnceAndFindsByName) {
  const auto& formats = all_formats();
  EXPECT_EQ(formats.size(), 18u);
  for (const WeightFormat* f : formats) EXPECT_EQ(&format_by_name(f->name()), f);
  EXPECT_EQ(&format_by_name("MXFP8_E4M3"), &format_by_name("MXFP8"));
  EXPECT_THROW(format_by_name("NVFP5"), Error);
}

TEST(WeightFormats, BytesEqualWhatQuantizeWritesForEveryFormatAndShape) {
  // Every shape fits every format's layout (in % 128 == 0); some break serving constraints
  // (MXFP8 out % 128, Marlin out % 64), which quantize() does not need.
  for (const WeightFormat* f : all_formats()) {
    for (Shape2D s : {Shape2D{128, 256}, Shape2D{256, 512}, Shape2D{130, 384}, Shape2D{64, 1024}}) {
      const auto w = random_weights(s, 1);
      Fp8SourceFixture src(s);
      const EncodedWeight e = quantize_any(*f, w, s, src);
      EXPECT_EQ(f->bytes(s), e.byte_size()) << f->name() << " [" << s.out << ", " << s.in << "]";
      const auto specs = f->tensors(s);
      ASSERT_EQ(specs.size(), e.tensors.size()) << f->name();
      for (std::size_t i = 0; i < specs.size(); ++i) {
        EXPECT_EQ(e.tensors[i].spec.suffix, specs[i].suffix) << f->name();
        EXPECT_EQ(e.tensors[i].spec.dtype, specs[i].dtype) << f->name();
        EXPECT_EQ(e.tensors[i].spec.shape, specs[i].shape) << f->name();
        EXPECT_EQ(e.tensors[i].bytes.size(), specs[i].byte_size()) << f->name();
      }
    }
  }
}

TEST(WeightFormats, BitsPerParameterOn4096Square) {
  const Shape2D s{4096, 4096};
  const double n = static_cast<double>(s.numel());
  auto bpp = [&](std::string_view name) { return format_by_name(name).bits_per_param(s); };
  // Payload + scales (method-facts.md §4) + the per-tensor extras each format writes.
  EXPECT_DOUBLE_EQ(bpp("NVFP4"), 4.5 + 64 / n);     // + weight_global_scale + input_global_scale
  EXPECT_DOUBLE_EQ(bpp("NVFP4A16"), 4.5 + 32 / n);  // + weight_global_scale
  EXPECT_DOUBLE_EQ(bpp("MXFP4"), 4.25);
  EXPECT_DOUBLE_EQ(bpp("MXFP6_E2M3"), 6.25);
  EXPECT_DOUBLE_EQ(bpp("MXFP6_E3M2A16"), 6.25);
  EXPECT_DOUBLE_EQ(bpp("MXFP8"), 8.25);
  EXPECT_DOUBLE_EQ(bpp("INT4_W4A16"), 4.125 + 128 / n);  // BF16 scale per 128 + weight_shape
  EXPECT_DOUBLE_EQ(bpp("INT8_W8A16"), 8 + 16.0 / 4096 + 128 / n);
  EXPECT_DOUBLE_EQ(bpp("FP8_E4M3"), 8 + 32.0 / 4096);
  EXPECT_DOUBLE_EQ(bpp("FP8_E4M3_TENSOR"), 8 + 32 / n);
  EXPECT_DOUBLE_EQ(bpp("FP8_BLOCK"), 8.001953125);
  EXPECT_DOUBLE_EQ(bpp("FP8_SOURCE"), 8.001953125);
  EXPECT_DOUBLE_EQ(bpp("BF16"), 16.0);
}

TEST(WeightFormats, FakeQuantizeIsDequantizeOfQuantizeBitForBit) {
  const Shape2D s{128, 512};
  const auto w = random_weights(s, 2);
  for (const WeightFormat* f : all_formats()) {
    Fp8SourceFixture src(s);
    QuantizeOptions o = options_for(*f);
    o.fp8_source = &src.view;
    const std::vector<float> via_bytes = f->dequantize(f->quantize(w, s, o));
    std::vector<float> fused(w.size());
    f->fake_quantize(w, s, fused, o);
    for (std::size_t i = 0; i < w.size(); ++i) {
      ASSERT_EQ(std::bit_cast<std::uint32_t>(fused[i]), std::bit_cast<std::uint32_t>(via_bytes[i]))
          << f->name() << " element " << i;
    }
  }
}

TEST(WeightFormats, FakeQuantizeIsIdempotentWhereScalesReproduce) {
  // MXFP4 scales and NVFP4 scales under a fixed global scale are recovered from the dequantized
  // values, so a second pass changes nothing. Not so for symmetric INT and amax/448 FP8 scales
  // (the dequantized amax is a code value, not the original amax), nor for MX elements with a
  // code whose mantissa is >= 1.75 (E2M3 7, E3M2 28, E4M3 448): under round_to_power_2 a group
  // whose largest value rounds to such a code moves up a binade on the second pass.
  const Shape2D s{64, 256};
  const auto w = random_weights(s, 3);
  for (std::string_view name : {"NVFP4A16", "MXFP4", "MXFP4A16", "BF16"}) {
    const WeightFormat& f = format_by_name(name);
    QuantizeOptions o;
    o.weight_global_scale = 448.0f * 6.0f / 0.4f;
    std::vector<float> once(w.size()), twice(w.size());
    f.fake_quantize(w, s, once, o);
    f.fake_quantize(once, s, twice, o);
    EXPECT_EQ(once, twice) << name;
  }
}

// ---- Golden tensors worked out by hand from the compressed-tensors rules ----------------------

std::vector<std::uint8_t> f32_le(float v) {
  std::vector<std::uint8_t> b(4);
  std::memcpy(b.data(), &v, 4);
  return b;
}

TEST(WeightFormatsGolden, Nvfp4) {
  // Row 0 has amax 6, so weight_global_scale = 448*6/6 = 448, row 0's scale is 448*6/6 = 448
  // (E4M3 0x7E) and its step 448/448 = 1: codes are the E2M1 codes of the values themselves.
  // Row 1 has amax 1.5: scale 448*1.5/6 = 112 = 1.75*2^6 (E4M3 0x6E), step 112/448 = 0.25.
  const std::vector<float> w = {
      0,    0.5f,  1,       1.5f,   2, 3, 4, 6, -0.5f, -1, -1.5f, -2, -3, -4, -6, 0.25f,
      1.5f, 0.75f, -0.375f, 0.125f, 0, 0, 0, 0, 0,     0,  0,     0,  0,  0,  0,  -1.0f};
  const Shape2D s{2, 16};
  const WeightFormat& f = format_by_name("NVFP4A16");
  const EncodedWeight e = f.quantize(w, s);
  // Even column in the low nibble; 0.25 is the 0|0.5 tie -> 0; 0.125/0.25 = 0.5 -> code 1;
  // -1/0.25 = -4 -> code 0xE.
  EXPECT_EQ(e.tensor("weight_packed").bytes,
            (std::vector<std::uint8_t>{0x10, 0x32, 0x54, 0x76, 0xA9, 0xCB, 0xED, 0x0F, 0x57, 0x1B,
                                       0x00, 0x00, 0x00, 0x00, 0x00, 0xE0}));
  EXPECT_EQ(e.tensor("weight_scale").bytes, (std::vector<std::uint8_t>{0x7E, 0x6E}));
  EXPECT_EQ(e.tensor("weight_global_scale").bytes, f32_le(448.0f));
  std::vector<float> expected = w;
  expected[15] = 0.0f;
  EXPECT_EQ(f.dequantize(e), expected);
}

TEST(WeightFormatsGolden, Nvfp4UnderMarlinHasAPowerOfTwoGlobalAndNormalScales) {
  // amax 5: compressed-tensors' global is 448*6/5 = 537.6; Marlin's the power of two below it,
  // 512, exact in BF16 like its inverse. A group 2^-20 below the largest keeps scale 2^-6.
  EXPECT_EQ(nvfp4_weight_global_scale(5.0f, Nvfp4Scales::kCompressedTensors), 537.6f);
  EXPECT_EQ(nvfp4_weight_global_scale(5.0f, Nvfp4Scales::kMarlin), 512.0f);
  EXPECT_EQ(nvfp4_weight_global_scale(6.0f, Nvfp4Scales::kMarlin), 256.0f);  // 448 -> 256
  EXPECT_EQ(nvfp4_weight_global_scale(0.0f, Nvfp4Scales::kMarlin), 1.0f);
  std::vector<float> w(32, 0.0f);
  for (int i = 0; i < 16; ++i) {
    w[i] = 5.0f * static_cast<float>(i - 8) / 8.0f;
    w[16 + i] = std::ldexp(5.0f, -20) * static_cast<float>(i % 2);
  }
  const Shape2D s{2, 16};
  const WeightFormat& f = format_by_name("NVFP4A16");
  const EncodedWeight plain = f.quantize(w, s);
  const EncodedWeight marlin = f.quantize(w, s, {.nvfp4_scales = Nvfp4Scales::kMarlin});
  EXPECT_EQ(plain.tensor("weight_global_scale").bytes, f32_le(537.6f));
  EXPECT_EQ(marlin.tensor("weight_global_scale").bytes, f32_le(512.0f));
  EXPECT_LT(plain.tensor("weight_scale").bytes[1], 0x08);
  EXPECT_EQ(marlin.tensor("weight_scale").bytes[1], 0x08);
  // The largest group: 512 * 5/6 = 426.7 rounds to E4M3 416; its values keep their codes.
  EXPECT_EQ(decode_element(ElementType::E4M3, marlin.tensor("weight_scale").bytes[0]), 416.0f);
  std::vector<float> fake(w.size());
  f.fake_quantize(w, s, fake, {.nvfp4_scales = Nvfp4Scales::kMarlin});
  EXPECT_EQ(fake, f.dequantize(marlin));
}

TEST(WeightFormatsGolden, Nvfp4W4A4WritesInputGlobalScaleAndNeedsIt) {
  const WeightFormat& f = format_by_name("NVFP4");
  const std::vector<float> w(16, 1.0f);
  EXPECT_THROW(f.quantize(w, {1, 16}), Error);
  QuantizeOptions o;
  o.input_global_scale = 268.8f;
  const EncodedWeight e = f.quantize(w, {1, 16}, o);
  EXPECT_EQ(e.tensor("input_global_scale").bytes, f32_le(268.8f));
  // The global scale is overridable (fused siblings share the max-based one).
  o.weight_global_scale = 100.0f;
  EXPECT_EQ(f.quantize(w, {1, 16}, o).tensor("weight_global_scale").bytes, f32_le(100.0f));
}

TEST(WeightFormatsGolden, Mxfp4) {
  // amax 3: floor(log2 3) - 2 = -1 -> E8M0 126, step 0.5. 3/0.5 = 6 (code 7); 1.25/0.5 = 2.5,
  // the 2|3 tie -> 2 (code 4); -0.75/0.5 = -1.5 (code 0xB).
  std::vector<float> w(32, 0.0f);
  w[0] = 3.0f;
  w[1] = 1.25f;
  w[2] = -0.75f;
  const WeightFormat& f = format_by_name("MXFP4A16");
  const EncodedWeight e = f.quantize(w, {1, 32});
  std::vector<std::uint8_t> packed(16, 0);
  packed[0] = 0x47;
  packed[1] = 0x0B;
  EXPECT_EQ(e.tensor("weight_packed").bytes, packed);
  EXPECT_EQ(e.tensor("weight_scale").bytes, std::vector<std::uint8_t>{126});
  std::vector<float> expected(32, 0.0f);
  expected[0] = 3.0f;
  expected[1] = 1.0f;
  expected[2] = -0.75f;
  EXPECT_EQ(f.dequantize(e), expected);
}

TEST(WeightFormatsGolden, Mxfp8) {
  // amax 56 = 1.75*2^5: round_to_power_2 moves it up to 2^6, so the exponent is 6 - 8 = -2
  // (E8M0 125) and the step 1/4. 56*4 = 224 = 1.75*2^7 (0x76); 1*4 = 4 (0x48);
  // -0.01*4 = -0.04 -> 1.25*2^-5 (0x92) = -0.0390625, /4 = -0.009765625.
  std::vector<float> w(32, 0.0f);
  w[0] = 56.0f;
  w[1] = 1.0f;
  w[2] = -0.01f;
  const WeightFormat& f = format_by_name("MXFP8A16");
  const EncodedWeight e = f.quantize(w, {1, 32});
  std::vector<std::uint8_t> codes(32, 0);
  codes[0] = 0x76;
  codes[1] = 0x48;
  codes[2] = 0x92;
  EXPECT_EQ(e.tensor("weight").bytes, codes);
  EXPECT_EQ(e.tensor("weight_scale").bytes, std::vector<std::uint8_t>{125});
  const auto d = f.dequantize(e);
  EXPECT_EQ(d[0], 56.0f);
  EXPECT_EQ(d[1], 1.0f);
  EXPECT_EQ(d[2], -0.009765625f);
}

TEST(WeightFormatsGolden, Fp8PerChannel) {
  // Row 0: amax 448 -> scale 1; row 1 all zero -> scale stored as 1, codes 0.
  const std::vector<float> w = {448, 1, -2, 0, 0, 0, 0, 0};
  const WeightFormat& f = format_by_name("FP8_E4M3");
  const EncodedWeight e = f.quantize(w, {2, 4});
  EXPECT_EQ(e.tensor("weight").bytes,
            (std::vector<std::uint8_t>{0x7E, 0x38, 0xC0, 0x00, 0, 0, 0, 0}));
  std::vector<std::uint8_t> scales = f32_le(1.0f);
  scales.insert(scales.end(), scales.begin(), scales.end());
  EXPECT_EQ(e.tensor("weight_scale").bytes, scales);
  EXPECT_EQ(e.tensor("weight_scale").spec.shape, (std::vector<std::int64_t>{2, 1}));
  EXPECT_EQ(f.dequantize(e), w);
}

TEST(WeightFormatsGolden, Fp8PerTensor) {
  // amax 896 -> one scale 896/448 = 2. 2/2 = 1 (0x38), -1/2 = -0.5 (0xB0), 0.5/2 = 0.25 (0x28),
  // 896/2 = 448 (0x7E).
  const std::vector<float> w = {2, -1, 0.5f, 896};
  const WeightFormat& f = format_by_name("FP8_E4M3_TENSOR");
  const EncodedWeight e = f.quantize(w, {2, 2});
  EXPECT_EQ(e.tensor("weight").bytes, (std::vector<std::uint8_t>{0x38, 0xB0, 0x28, 0x7E}));
  EXPECT_EQ(e.tensor("weight_scale").bytes, f32_le(2.0f));
  EXPECT_EQ(e.tensor("weight_scale").spec.shape, (std::vector<std::int64_t>{1}));
  EXPECT_EQ(f.dequantize(e), w);
}

TEST(WeightFormatsGolden, Int4PackQuantized) {
  // amax 7.5 -> scale 7.5/7.5 = 1 (BF16 0x3F80). 7.5 -> 7 (clamped), -7.5 -> -8 (ties to even),
  // 2.5 -> 2, -0.4 -> 0; stored offset-binary (+8), eight per int32, element 0 in bits 0-3.
  std::vector<float> w(128, 0.0f);
  w[0] = 7.5f;
  w[1] = -7.5f;
  w[2] = 2.5f;
  w[3] = -0.4f;
  const WeightFormat& f = format_by_name("INT4_W4A16");
  const EncodedWeight e = f.quantize(w, {1, 128});
  std::vector<std::uint8_t> packed;
  for (int word = 0; word < 16; ++word) {
    const std::uint32_t v = word == 0 ? 0x88888A0Fu : 0x88888888u;
    for (int b = 0; b < 4; ++b) packed.push_back(static_cast<std::uint8_t>(v >> (8 * b)));
  }
  EXPECT_EQ(e.tensor("weight_packed").bytes, packed);
  EXPECT_EQ(e.tensor("weight_scale").bytes, (std::vector<std::uint8_t>{0x80, 0x3F}));
  std::vector<std::uint8_t> shape(16, 0);
  shape[0] = 1;
  shape[8] = 128;
  EXPECT_EQ(e.tensor("weight_shape").bytes, shape);
  const auto d = f.dequantize(e);
  EXPECT_EQ(d[0], 7.0f);
  EXPECT_EQ(d[1], -8.0f);
  EXPECT_EQ(d[2], 2.0f);
  EXPECT_EQ(d[3], 0.0f);
}

TEST(WeightFormatsGolden, Int8PackQuantized) {
  // amax 127.5 -> scale 1; 127.5 -> 127 (u 255), -127.5 -> -128 (u 0), 3.5 -> 4 (u 132), 0 -> u
  // 128.
  const std::vector<float> w = {127.5f, -127.5f, 3.5f, 0.0f};
  const WeightFormat& f = format_by_name("INT8_W8A16");
  const EncodedWeight e = f.quantize(w, {1, 4});
  EXPECT_EQ(e.tensor("weight_packed").bytes, (std::vector<std::uint8_t>{0xFF, 0x00, 0x84, 0x80}));
  EXPECT_EQ(f.dequantize(e), (std::vector<float>{127, -128, 4, 0}));
}

TEST(WeightFormatsGolden, Bf16AndFp8Source) {
  const WeightFormat& bf16 = format_by_name("BF16");
  const std::vector<float> w = {1.0f, -2.0f};
  EXPECT_EQ(bf16.quantize(w, {1, 2}).tensor("weight").bytes,
            (std::vector<std::uint8_t>{0x80, 0x3F, 0x00, 0xC0}));

  const WeightFormat& src_format = format_by_name("FP8_SOURCE");
  const std::vector<std::uint8_t> weight = {0x38, 0xC0};
  const std::vector<std::uint8_t> scale_bf16 = {0x00, 0x3F};  // 0.5
  const Fp8SourceWeight src{weight, io::DType::BF16, scale_bf16};
  QuantizeOptions o;
  o.fp8_source = &src;
  const EncodedWeight e = src_format.quantize({}, {1, 2}, o);
  EXPECT_EQ(e.tensor("weight").bytes, weight);
  EXPECT_EQ(e.tensor("weight_scale").bytes, f32_le(0.5f));
  EXPECT_EQ(src_format.dequantize(e), (std::vector<float>{0.5f, -1.0f}));
  EXPECT_THROW(src_format.quantize({}, {1, 2}), Error);
}

TEST(WeightFormats, Fp8BlockScalesCoverBlocksOf128) {
  const Shape2D s{130, 256};
  auto w = random_weights(s, 4);
  w[129 * 256 + 200] = 9.0f;  // in row block 1, column block 1
  const WeightFormat& f = format_by_name("FP8_BLOCK");
  const EncodedWeight e = f.quantize(w, s);
  std::vector<float> scales(4);
  std::memcpy(scales.data(), e.tensor("weight_scale").bytes.data(), 16);
  for (int rb = 0; rb < 2; ++rb) {
    for (int cb = 0; cb < 2; ++cb) {
      float amax = 0;
      for (std::int64_t r = rb * 128; r < std::min<std::int64_t>(s.out, rb * 128 + 128); ++r) {
        for (std::int64_t c = cb * 128; c < cb * 128 + 128; ++c)
          amax = std::max(amax, std::abs(w[r * s.in + c]));
      }
      EXPECT_EQ(scales[rb * 2 + cb], amax / 448.0f) << rb << "," << cb;
    }
  }
  EXPECT_EQ(scales[3], 9.0f / 448.0f);
}

// ---- Errors and metadata ------------------------------------------------------------------------

TEST(WeightFormats, BadInputsAreOneLineErrors) {
  const WeightFormat& nvfp4 = format_by_name("NVFP4A16");
  std::vector<float> w(24, 1.0f);
  EXPECT_THROW(nvfp4.quantize(w, {1, 24}), Error);  // 24 % 16
  EXPECT_THROW(nvfp4.quantize(w, {2, 16}), Error);  // size mismatch
  std::vector<float> bad(32, 1.0f);
  bad[7] = std::numeric_limits<float>::infinity();
  for (const WeightFormat* f : all_formats()) {
    if (f->name() == "FP8_SOURCE" || f->name() == "BF16") continue;
    EXPECT_THROW(f->quantize(bad, {1, 32}, options_for(*f)), Error) << f->name();
  }
  try {
    format_by_name("MXFP6_E2M3").config_group();
    FAIL() << "MXFP6 must refuse to export";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("research only"), std::string::npos);
  }
  EXPECT_FALSE(format_by_name("MXFP6_E3M2A16").exportable());
  EXPECT_TRUE(format_by_name("MXFP4").exportable());
}

TEST(WeightFormats, ShapeConstraints) {
  EXPECT_FALSE(format_by_name("NVFP4").rejects({4096, 4096}));
  EXPECT_TRUE(format_by_name("NVFP4").rejects({4096, 4104}));
  EXPECT_TRUE(format_by_name("MXFP4").rejects({64, 48}));
  EXPECT_TRUE(format_by_name("MXFP8").rejects({64, 4096}));  // out % 128
  EXPECT_FALSE(format_by_name("MXFP8").rejects({256, 4096}));
  EXPECT_TRUE(format_by_name("INT4_W4A16").rejects({96, 4096}));   // Marlin out % 64
  EXPECT_TRUE(format_by_name("INT4_W4A16").rejects({128, 4160}));  // in % 128
  EXPECT_FALSE(format_by_name("INT4_W4A16").rejects({128, 4096}));
  EXPECT_TRUE(format_by_name("FP8_BLOCK").rejects({128, 100}));
  // Served as FP8_BLOCK: activations in groups of 128 along the input; partial row blocks are fine.
  EXPECT_TRUE(format_by_name("FP8_SOURCE").rejects({192, 64}));
  EXPECT_FALSE(format_by_name("FP8_SOURCE").rejects({576, 7168}));
  EXPECT_FALSE(format_by_name("FP8_E4M3").rejects({3, 7}));
}

// The few-row Linears of the hybrid families (in_proj_b and in_proj_a have one row per value
// head: 4 and 6 in the tiny checkpoints, 32 and 48 in Qwen3.6-35B-A3B and -27B, twice that in
// Qwen3-Next's fused in_proj_ba; qwen3_5-architecture-facts.md §4.1), and a single row: every
// format refuses the shape up front, which keeps the cost stage from offering it, or holds it
// exactly as it promises.
TEST(WeightFormats, FewRowShapesAreRefusedOrHeld) {
  for (const Shape2D s : {Shape2D{1, 64}, Shape2D{4, 64}, Shape2D{6, 64}, Shape2D{32, 2048},
                          Shape2D{48, 5120}, Shape2D{64, 2048}}) {
    const auto w = random_weights(s, 5);
    for (const WeightFormat* f : all_formats()) {
      SCOPED_TRACE(fmt::format("{} [{}, {}]", f->name(), s.out, s.in));
      if (const auto why = f->rejects(s)) {
        EXPECT_FALSE(why->empty());
        continue;
      }
      Fp8SourceFixture src(s);
      const EncodedWeight e = quantize_any(*f, w, s, src);
      EXPECT_EQ(f->bytes(s), e.byte_size());
      const std::vector<float> back = f->dequantize(e);
      ASSERT_EQ(back.size(), w.size());
      EXPECT_TRUE(std::all_of(back.begin(), back.end(), [](float v) { return std::isfinite(v); }));
      QuantizeOptions o = options_for(*f);
      o.fp8_source = &src.view;
      std::vector<float> fused(w.size());
      f->fake_quantize(w, s, fused, o);
      for (std::size_t i = 0; i < w.size(); ++i) {
        ASSERT_EQ(std::bit_cast<std::uint32_t>(fused[i]), std::bit_cast<std::uint32_t>(back[i]))
            << i;
      }
    }
  }
  // Kernels that want whole row tiles refuse them (MXFP8 out % 128, Marlin out % 64), and the
  // tiny checkpoints' 64 input columns fill no 128-column block or group.
  EXPECT_TRUE(format_by_name("MXFP8").rejects({48, 5120}));
  EXPECT_TRUE(format_by_name("INT4_W4A16").rejects({48, 5120}));
  EXPECT_TRUE(format_by_name("INT8_W8A16").rejects({32, 2048}));
  EXPECT_TRUE(format_by_name("FP8_BLOCK").rejects({6, 64}));
  EXPECT_FALSE(format_by_name("NVFP4").rejects({6, 64}));
}

TEST(WeightFormats, ConfigGroupsFollowTheCompressedTensorsPresets) {
  const auto nv = format_by_name("NVFP4").config_group();
  EXPECT_EQ(nv["format"], "nvfp4-pack-quantized");
  EXPECT_EQ(nv["weights"]["strategy"], "tensor_group");
  EXPECT_EQ(nv["weights"]["group_size"], 16);
  EXPECT_EQ(nv["weights"]["scale_dtype"], "torch.float8_e4m3fn");
  EXPECT_EQ(nv["input_activations"]["dynamic"], "local");
  EXPECT_TRUE(format_by_name("NVFP4A16").config_group()["input_activations"].is_null());
  const auto mx4 = format_by_name("MXFP4A16").config_group();
  EXPECT_EQ(mx4["format"], "mxfp4-pack-quantized");
  EXPECT_EQ(mx4["weights"]["group_size"], 32);
  EXPECT_EQ(mx4["weights"]["scale_dtype"], "torch.uint8");
  EXPECT_EQ(format_by_name("MXFP8").config_group()["format"], "mxfp8-quantized");
  EXPECT_EQ(format_by_name("MXFP8").config_group()["input_activations"]["dynamic"], true);
  const auto fp8 = format_by_name("FP8_E4M3").config_group();
  EXPECT_EQ(fp8["format"], "float-quantized");
  EXPECT_EQ(fp8["weights"]["strategy"], "channel");
  EXPECT_EQ(fp8["input_activations"]["strategy"], "token");
  EXPECT_EQ(format_by_name("FP8_E4M3A16").config_group()["format"], "naive-quantized");
  EXPECT_EQ(format_by_name("FP8_BLOCK").config_group()["weights"]["block_structure"],
            nlohmann::json({128, 128}));
  const auto int4 = format_by_name("INT4_W4A16").config_group();
  EXPECT_EQ(int4["format"], "pack-quantized");
  EXPECT_EQ(int4["weights"]["type"], "int");
  EXPECT_EQ(int4["weights"]["group_size"], 128);
  EXPECT_EQ(format_by_name("INT8_W8A16").config_group()["weights"]["strategy"], "channel");
  EXPECT_TRUE(format_by_name("BF16").config_group().is_null());
}

TEST(WeightFormats, ActivationQuantizers) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(4 * 256);
  for (float& v : x) v = normal(rng);
  std::vector<float> out(x.size());
  // NVFP4: per-16 E4M3 scales under the static input global scale.
  QuantizeOptions o;
  o.input_global_scale = 448.0f * 6.0f / 5.0f;
  format_by_name("NVFP4").activation_quantizer(o)->fake_quantize(x, 256, out);
  const GroupCodec nv({ElementType::E2M1, 0},
                      {.kind = ScaleKind::kE4M3OverGlobal, .global_scale = *o.input_global_scale});
  for (std::size_t g = 0; g < x.size() / 16; ++g) {
    float amax = 0;
    for (int i = 0; i < 16; ++i) amax = std::max(amax, std::abs(x[g * 16 + i]));
    const GroupScale s = nv.scale_for_amax(amax);
    for (int i = 0; i < 16; ++i) {
      ASSERT_EQ(out[g * 16 + i], nv.dequantize(nv.quantize(x[g * 16 + i], s), s));
    }
  }
  EXPECT_THROW(format_by_name("NVFP4").activation_quantizer(), Error);
  // FP8 dynamic per token: each row's largest magnitude is exact (it maps to 448).
  format_by_name("FP8_E4M3").activation_quantizer()->fake_quantize(x, 256, out);
  for (int r = 0; r < 4; ++r) {
    float amax = 0, qmax = 0;
    for (int i = 0; i < 256; ++i) {
      amax = std::max(amax, std::abs(x[r * 256 + i]));
      qmax = std::max(qmax, std::abs(out[r * 256 + i]));
    }
    EXPECT_NEAR(qmax, amax, amax * 1e-6);
  }
  EXPECT_EQ(format_by_name("NVFP4A16").activation_quantizer(), nullptr);
  EXPECT_EQ(format_by_name("INT4_W4A16").activation_quantizer(), nullptr);
  EXPECT_NE(format_by_name("MXFP8").activation_quantizer(), nullptr);
}

// ---- Real weights -------------------------------------------------------------------------------

TEST(WeightFormatsRealData, QwenTinyLayerQuantizesWithTheExpectedErrorOrder) {
  PQ_REQUIRE_SHARED();
  const auto ckpt = io::Checkpoint::open(test::shared_dir() / "models/qwen3-dense-tiny");
  for (const char* name :
       {"model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.self_attn.q_proj.weight"}) {
    const auto& info = ckpt.info(name);
    const Shape2D s{info.shape[0], info.shape[1]};
    const std::vector<float> w = ckpt.to_f32(name);
    double energy = 0;
    for (float v : w) energy += static_cast<double>(v) * v;
    auto rel_mse = [&](std::string_view format) {
      const WeightFormat& f = format_by_name(format);
      QuantizeOptions o = options_for(f);
      const EncodedWeight e = f.quantize(w, s, o);
      EXPECT_EQ(e.byte_size(), f.bytes(s)) << format;
      const auto d = f.dequantize(e);
      double err = 0;
      for (std::size_t i = 0; i < w.size(); ++i)
        err += (static_cast<double>(d[i]) - w[i]) * (d[i] - w[i]);
      return err / energy;
    };
    // The source is BF16, so BF16 is lossless.
    EXPECT_EQ(rel_mse("BF16"), 0.0) << name;
    const double mxfp4 = rel_mse("MXFP4"), nvfp4 = rel_mse("NVFP4"), int4 = rel_mse("INT4_W4A16");
    const double e2m3 = rel_mse("MXFP6_E2M3"), mxfp8 = rel_mse("MXFP8"), fp8 = rel_mse("FP8_E4M3");
    const double int8 = rel_mse("INT8_W8A16");
    const double e3m2 = rel_mse("MXFP6_E3M2");
    // NVFP4's finer groups and FP8 scales beat MXFP4 (about 30% less error here).
    EXPECT_LT(nvfp4, mxfp4) << name;
    // Mantissa bits decide: 3-bit-mantissa formats (E2M3, E4M3) are ~10x better than 4-bit
    // ones, E2M3 beats E3M2 (2 mantissa bits), and INT8's uniform 8-bit grid beats FP8.
    EXPECT_LT(5 * e2m3, std::min({nvfp4, mxfp4, int4})) << name;
    EXPECT_LT(e2m3, e3m2) << name;
    EXPECT_LT(5 * mxfp8, nvfp4) << name;
    EXPECT_LT(5 * fp8, nvfp4) << name;
    EXPECT_LT(5 * int8, fp8) << name;
    // 4-bit formats lose on the order of 1% of the weight energy, not 10x more or less.
    EXPECT_GT(mxfp4, 1e-3) << name;
    EXPECT_LT(mxfp4, 5e-2) << name;
  }
}

}  // namespace
}  // namespace pq::formats
