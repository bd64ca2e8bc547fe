#include "export/gptq.h"

#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <random>

#include "common/error.h"
#include "data/token_dataset.h"
#include "export/linear_encoder.h"
#include "export/local_hessian.h"
#include "formats/weight_format.h"
#include "io/safetensors.h"
#include "model/model_spec.h"
#include "probe/probe_stage.h"
#include "probe/wikitext_excerpt.h"
#include "runtime/checkpoint_model.h"
#include "runtime/kernels/gemm.h"
#include "scout/kl_evaluator.h"
#include "support/test_support.h"
#include "tokenizer/tokenizer.h"

namespace pq::exporter {
namespace {

using formats::GroupLayout;
using formats::GroupScale;
using formats::Shape2D;
using formats::WeightFormat;

// Calibration statistics owned by the test.
struct Calibration {
  std::vector<float> hessian;
  std::vector<float> moment;
  std::int64_t tokens = 0;
  CalibrationStatistics view() const {
    return {.hessian = hessian, .tokens = tokens, .act_second_moment = moment};
  }
};

Calibration from_activations(std::span<const float> x, std::int64_t tokens, std::int64_t in) {
  Calibration c;
  c.tokens = tokens;
  c.hessian.resize(in * in);
  c.moment.resize(in);
  for (std::int64_t a = 0; a < in; ++a) {
    for (std::int64_t b = 0; b < in; ++b) {
      double sum = 0.0;
      for (std::int64_t t = 0; t < tokens; ++t) sum += double{x[t * in + a]} * x[t * in + b];
      c.hessian[a * in + b] = static_cast<float>(sum);
    }
    c.moment[a] = c.hessian[a * in + a] / static_cast<float>(tokens);
  }
  return c;
}

// Inputs with correlated channels of unequal energy: x = z A with A = diag(scale) + low-rank
// mixing, so neighbouring errors can compensate each other (what GPTQ exploits).
std::vector<float> correlated_activations(std::int64_t in, std::int64_t tokens,
                                          std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  constexpr std::int64_t kRank = 8;
  std::vector<float> mixing(kRank * in), scale(in);
  for (float& v : mixing) v = normal(rng);
  for (std::int64_t j = 0; j < in; ++j) scale[j] = 0.3f + static_cast<float>(j % 7) * 0.25f;
  std::vector<float> x(tokens * in);
  for (std::int64_t t = 0; t < tokens; ++t) {
    float latent[kRank];
    for (float& l : latent) l = normal(rng);
    for (std::int64_t j = 0; j < in; ++j) {
      float v = scale[j] * normal(rng);
      for (std::int64_t k = 0; k < kRank; ++k) v += latent[k] * mixing[k * in + j];
      x[t * in + j] = v;
    }
  }
  return x;
}

Calibration correlated_calibration(std::int64_t in, std::int64_t tokens, std::uint32_t seed) {
  return from_activations(correlated_activations(in, tokens, seed), tokens, in);
}

// Gaussian weights with one 8x outlier per row, as real Linears have outliers.
std::vector<float> synthetic_weight(Shape2D shape, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::vector<float> w(shape.numel());
  for (float& v : w) v = normal(rng);
  std::uniform_int_distribution<std::int64_t> column(0, shape.in - 1);
  for (std::int64_t r = 0; r < shape.out; ++r) w[r * shape.in + column(rng)] *= 8.0f;
  return w;
}

formats::QuantizeOptions options_for(const WeightFormat& format, std::span<const float> w) {
  formats::QuantizeOptions options;
  if (format.name() == "NVFP4" || format.name() == "NVFP4A16") {
    options.weight_global_scale =
        formats::nvfp4_global_scale(std::bit_cast<float>(formats::max_abs_bits(w)));
  }
  if (format.name() == "NVFP4") options.input_global_scale = 448.0f * 6.0f / 4.0f;
  return options;
}

GroupLayout layout_for(const WeightFormat& format, Shape2D shape,
                       const formats::QuantizeOptions& options) {
  return *format.group_layout(shape, options);
}

// The per-(row, group) scales quantize() chooses: each unit's amax through scale_for_amax.
std::vector<GroupScale> nearest_scales(const GroupLayout& layout, std::span<const float> w,
                                       Shape2D shape) {
  const std::int64_t groups = shape.in / layout.group_size;
  std::vector<GroupScale> scales(shape.out * groups);
  for (std::int64_t r0 = 0; r0 < shape.out; r0 += layout.scale_rows) {
    const std::int64_t r1 = std::min(shape.out, r0 + layout.scale_rows);
    for (std::int64_t g = 0; g < groups; ++g) {
      float amax = 0.0f;
      for (std::int64_t r = r0; r < r1; ++r) {
        for (std::int64_t c = g * layout.group_size; c < (g + 1) * layout.group_size; ++c) {
          amax = std::max(amax, std::fabs(w[r * shape.in + c]));
        }
      }
      for (std::int64_t r = r0; r < r1; ++r) {
        scales[r * groups + g] = layout.codec.scale_for_amax(amax);
      }
    }
  }
  return scales;
}

std::vector<std::uint8_t> codes_for(const GroupLayout& layout, std::span<const float> w,
                                    std::span<GroupScale> scales, Shape2D shape) {
  std::vector<std::uint8_t> codes(w.size());
  formats::quantize_rows(layout.codec, {.weights = w,
                                        .cols = shape.in,
                                        .group_size = layout.group_size,
                                        .scales_given = true,
                                        .scales = scales,
                                        .codes = codes});
  return codes;
}

bool same_bits(std::span<const float> a, std::span<const float> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

void expect_same_bytes(const formats::EncodedWeight& a, const formats::EncodedWeight& b) {
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (std::size_t t = 0; t < a.tensors.size(); ++t) {
    EXPECT_EQ(a.tensors[t].spec.suffix, b.tensors[t].spec.suffix);
    EXPECT_TRUE(a.tensors[t].bytes == b.tensors[t].bytes)
        << a.format << " tensor " << a.tensors[t].spec.suffix << " differs";
  }
}

// Every format that can take given codes and scales.
std::vector<const WeightFormat*> grouped_formats(Shape2D shape) {
  std::vector<const WeightFormat*> out;
  for (const WeightFormat* f : formats::all_formats()) {
    if (f->group_layout(shape).has_value()) out.push_back(f);
  }
  return out;
}

constexpr Shape2D kShape{192, 256};  // two FP8_BLOCK row blocks, the second one short

TEST(EncodeGroups, NearestCodesAndScalesGiveQuantizeBytes) {
  const std::vector<float> w = synthetic_weight(kShape, 1);
  const auto formats = grouped_formats(kShape);
  ASSERT_GE(formats.size(), 14u);
  for (const WeightFormat* format : formats) {
    SCOPED_TRACE(std::string(format->name()));
    const formats::QuantizeOptions options = options_for(*format, w);
    const GroupLayout layout = layout_for(*format, kShape, options);
    std::vector<GroupScale> scales = nearest_scales(layout, w, kShape);
    const std::vector<std::uint8_t> codes = codes_for(layout, w, scales, kShape);
    expect_same_bytes(format->encode_groups(codes, scales, kShape, options),
                      format->quantize(w, kShape, options));
  }
}

// Codes and scales no nearest rounding would choose (scales 0.5x-1.5x off, saturated codes)
// still dequantize to exactly what the codec gives for them.
TEST(EncodeGroups, DequantizesToTheGivenCodesAndScales) {
  const std::vector<float> w = synthetic_weight(kShape, 2);
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> factor(0.5f, 1.5f);
  for (const WeightFormat* format : grouped_formats(kShape)) {
    SCOPED_TRACE(std::string(format->name()));
    const formats::QuantizeOptions options = options_for(*format, w);
    const GroupLayout layout = layout_for(*format, kShape, options);
    std::vector<GroupScale> scales = nearest_scales(layout, w, kShape);
    // One factor per stored scale, so scales shared across rows stay equal.
    const std::int64_t groups = kShape.in / layout.group_size;
    for (std::int64_t r0 = 0; r0 < kShape.out; r0 += layout.scale_rows) {
      for (std::int64_t g = 0; g < groups; ++g) {
        const GroupScale changed = layout.codec.scale_for_amax(
            factor(rng) * scales[r0 * groups + g].step * layout.codec.amax_divisor());
        for (std::int64_t r = r0; r < std::min(kShape.out, r0 + layout.scale_rows); ++r) {
          scales[r * groups + g] = changed;
        }
      }
    }
    const std::vector<std::uint8_t> codes = codes_for(layout, w, scales, kShape);
    std::vector<float> expected(w.size());
    formats::dequantize_rows(layout.codec, codes, scales, kShape.in, layout.group_size, expected);
    const std::vector<float> got =
        format->dequantize(format->encode_groups(codes, scales, kShape, options));
    EXPECT_TRUE(same_bits(got, expected));
  }
}

TEST(EncodeGroups, RejectsWhatItCannotStore) {
  const std::vector<float> w = synthetic_weight(kShape, 4);
  for (const char* name : {"BF16", "FP8_SOURCE"}) {
    EXPECT_THROW(formats::format_by_name(name).encode_groups({}, {}, kShape), Error) << name;
  }
  // NVFP4 cannot guess the global scale the scales were made under.
  const WeightFormat& nvfp4 = formats::format_by_name("NVFP4A16");
  const formats::QuantizeOptions options = options_for(nvfp4, w);
  const GroupLayout layout = layout_for(nvfp4, kShape, options);
  std::vector<GroupScale> scales = nearest_scales(layout, w, kShape);
  std::vector<std::uint8_t> codes = codes_for(layout, w, scales, kShape);
  EXPECT_THROW(nvfp4.encode_groups(codes, scales, kShape), Error);
  // A code outside E2M1, a missing scale.
  codes[5] = 0x10;
  EXPECT_THROW(nvfp4.encode_groups(codes, scales, kShape, options), Error);
  codes[5] = 0;
  EXPECT_THROW(
      nvfp4.encode_groups(codes, std::span(scales).first(scales.size() - 1), kShape, options),
      Error);
  // Two rows of one FP8 128x128 block with different scales.
  const WeightFormat& block = formats::format_by_name("FP8_BLOCK");
  const GroupLayout block_layout = *block.group_layout(kShape);
  std::vector<GroupScale> block_scales = nearest_scales(block_layout, w, kShape);
  const std::vector<std::uint8_t> block_codes = codes_for(block_layout, w, block_scales, kShape);
  EXPECT_NO_THROW(block.encode_groups(block_codes, block_scales, kShape));
  block_scales[2] = block_layout.codec.scale_for_amax(1.0f);
  EXPECT_THROW(block.encode_groups(block_codes, block_scales, kShape), Error);
}

// GPTQ's output error from its own error terms (GroupedWeight::output_error) is the stored
// weight's, computed directly with an f32 GEMM (relative error about 1e-7).
void expect_output_error_of(const GroupedWeight& grouped, std::span<const float> w,
                            std::span<const float> q, Shape2D shape,
                            const Calibration& calibration) {
  const double direct = output_mse(w, q, shape, calibration.view());
  EXPECT_NEAR(grouped.output_error / static_cast<double>(calibration.tokens * shape.out), direct,
              1e-6 * direct);
}

// The GPTQ result of a format, dequantized, and its output error; with the RTN error beside it.
struct Compared {
  double gptq = 0.0;
  double nearest = 0.0;
  std::int64_t rescaled = 0;
};

Compared compare(const WeightFormat& format, std::span<const float> w, Shape2D shape,
                 const Calibration& calibration, const GptqOptions& gptq) {
  const formats::QuantizeOptions options = options_for(format, w);
  const GroupLayout layout = layout_for(format, shape, options);
  const auto grouped = gptq_round(w, shape, layout, calibration.view(), gptq);
  EXPECT_TRUE(grouped.has_value());
  if (!grouped) return {};
  const std::vector<float> q =
      format.dequantize(format.encode_groups(grouped->codes, grouped->scales, shape, options));
  const std::vector<float> rtn = format.dequantize(format.quantize(w, shape, options));
  expect_output_error_of(*grouped, w, q, shape, calibration);
  return {output_mse(w, q, shape, calibration.view()),
          output_mse(w, rtn, shape, calibration.view()), grouped->groups_rescaled};
}

TEST(Gptq, LowersOutputErrorBelowNearestOnCorrelatedInputs) {
  const std::vector<float> w = synthetic_weight(kShape, 5);
  const Calibration calibration = correlated_calibration(kShape.in, 1024, 6);
  for (const char* name :
       {"NVFP4", "MXFP4", "INT4_W4A16", "FP8_E4M3", "INT8_W8A16", "FP8_BLOCK", "FP8_E4M3_TENSOR"}) {
    SCOPED_TRACE(name);
    const WeightFormat& format = formats::format_by_name(name);
    for (const bool sweep : {false, true}) {
      for (const bool act_order : {false, true}) {
        const Compared c =
            compare(format, w, kShape, calibration, {.act_order = act_order, .scale_sweep = sweep});
        std::printf("%-16s sweep=%d act_order=%d  output MSE ratio GPTQ/RTN %.3f\n", name, sweep,
                    act_order, c.gptq / c.nearest);
        EXPECT_LT(c.gptq, c.nearest) << "sweep " << sweep << " act_order " << act_order;
      }
    }
  }
}

// With H = c I no column's error has anywhere to go: GPTQ is round-to-nearest, byte for byte.
TEST(Gptq, IsNearestRoundingWhenInputsAreUncorrelated) {
  const std::vector<float> w = synthetic_weight(kShape, 7);
  Calibration calibration;
  calibration.tokens = 100;
  calibration.hessian.assign(kShape.in * kShape.in, 0.0f);
  calibration.moment.assign(kShape.in, 2.5f);
  for (std::int64_t j = 0; j < kShape.in; ++j) calibration.hessian[j * kShape.in + j] = 250.0f;
  for (const WeightFormat* format : grouped_formats(kShape)) {
    SCOPED_TRACE(std::string(format->name()));
    const formats::QuantizeOptions options = options_for(*format, w);
    const GroupLayout layout = layout_for(*format, kShape, options);
    for (const bool act_order : {false, true}) {
      const auto grouped = gptq_round(w, kShape, layout, calibration.view(),
                                      {.act_order = act_order, .scale_sweep = false});
      ASSERT_TRUE(grouped.has_value());
      expect_same_bytes(format->encode_groups(grouped->codes, grouped->scales, kShape, options),
                        format->quantize(w, kShape, options));
    }
  }
}

// sum_j E[x_j^2] (v_j - q_j)^2 over one scale unit, q the rounding of v under `scale`.
double swept_objective(const GroupLayout& layout, std::span<const float> v, Shape2D shape,
                       std::span<const float> moment, std::int64_t row_block, std::int64_t group,
                       const GroupScale& scale) {
  double sum = 0.0;
  for (std::int64_t r = row_block * layout.scale_rows;
       r < std::min(shape.out, (row_block + 1) * layout.scale_rows); ++r) {
    for (std::int64_t c = group * layout.group_size; c < (group + 1) * layout.group_size; ++c) {
      const float x = v[r * shape.in + c];
      const double d = double{x} - layout.codec.dequantize(layout.codec.quantize(x, scale), scale);
      sum += moment[c] * d * d;
    }
  }
  return sum;
}

// With act_order every scale is fixed from the original weights before the pass, so the swept
// objective can be checked from outside: each unit's scale is the nearest-rounding one, or a
// candidate around the same amax that strictly lowers the objective; never a worse one. Without
// the sweep the scales are exactly the nearest-rounding ones.
TEST(ScaleSweep, ImprovesOrKeepsEveryScaleUnit) {
  const std::vector<float> w = synthetic_weight(kShape, 8);
  const Calibration calibration = correlated_calibration(kShape.in, 512, 9);
  for (const char* name :
       {"NVFP4A16", "MXFP4A16", "INT4_W4A16", "FP8_BLOCK", "FP8_E4M3", "FP8_E4M3_TENSOR"}) {
    SCOPED_TRACE(name);
    const WeightFormat& format = formats::format_by_name(name);
    const formats::QuantizeOptions options = options_for(format, w);
    const GroupLayout layout = layout_for(format, kShape, options);
    const std::vector<GroupScale> nearest = nearest_scales(layout, w, kShape);
    const auto plain = gptq_round(w, kShape, layout, calibration.view(),
                                  {.act_order = true, .scale_sweep = false});
    const auto swept =
        gptq_round(w, kShape, layout, calibration.view(), {.act_order = true, .scale_sweep = true});
    ASSERT_TRUE(plain && swept);
    EXPECT_TRUE(plain->scales == nearest);
    const std::int64_t groups = kShape.in / layout.group_size;
    const std::int64_t row_blocks = (kShape.out + layout.scale_rows - 1) / layout.scale_rows;
    std::int64_t changed = 0;
    for (std::int64_t rb = 0; rb < row_blocks; ++rb) {
      for (std::int64_t g = 0; g < groups; ++g) {
        const GroupScale& before = nearest[rb * layout.scale_rows * groups + g];
        const GroupScale& after = swept->scales[rb * layout.scale_rows * groups + g];
        if (after == before) continue;
        ++changed;
        EXPECT_LT(swept_objective(layout, w, kShape, calibration.moment, rb, g, after),
                  swept_objective(layout, w, kShape, calibration.moment, rb, g, before))
            << "unit " << rb << ", " << g;
        float amax = 0.0f;
        for (std::int64_t r = rb * layout.scale_rows;
             r < std::min(kShape.out, (rb + 1) * layout.scale_rows); ++r) {
          for (std::int64_t c = g * layout.group_size; c < (g + 1) * layout.group_size; ++c) {
            amax = std::max(amax, std::fabs(w[r * kShape.in + c]));
          }
        }
        const auto candidates = layout.codec.candidate_scales(amax, 32, 0.5f, 1.5f);
        EXPECT_NE(std::find(candidates.begin(), candidates.end(), after), candidates.end());
      }
    }
    EXPECT_EQ(changed, swept->groups_rescaled);
    std::printf("%-16s the sweep changed %lld of %lld scale units\n", name,
                static_cast<long long>(changed), static_cast<long long>(groups * row_blocks));
  }
  // NVFP4's E4M3 scales have room to move: the sweep must find something there.
  const WeightFormat& nvfp4 = formats::format_by_name("NVFP4A16");
  const formats::QuantizeOptions options = options_for(nvfp4, w);
  EXPECT_GT(gptq_round(w, kShape, layout_for(nvfp4, kShape, options), calibration.view(), {})
                ->groups_rescaled,
            0);
}

// An input that is zero in every calibration token (H_jj = 0) neither takes nor gives error
// updates; its weights are rounded to nearest under their group's scale, not zeroed as in the
// reference implementation.
TEST(Gptq, KeepsTheWeightsOfDeadInputs) {
  const std::vector<float> w = synthetic_weight(kShape, 16);
  Calibration calibration = correlated_calibration(kShape.in, 512, 17);
  constexpr std::int64_t kDead = 37;
  for (std::int64_t k = 0; k < kShape.in; ++k) {
    calibration.hessian[kDead * kShape.in + k] = 0.0f;
    calibration.hessian[k * kShape.in + kDead] = 0.0f;
  }
  calibration.moment[kDead] = 0.0f;
  const WeightFormat& format = formats::format_by_name("INT4_W4A16");
  const GroupLayout layout = *format.group_layout(kShape);
  const auto grouped = gptq_round(w, kShape, layout, calibration.view(), {.scale_sweep = false});
  ASSERT_TRUE(grouped.has_value());
  const std::int64_t groups = kShape.in / layout.group_size;
  std::int64_t nonzero = 0;
  for (std::int64_t r = 0; r < kShape.out; ++r) {
    const GroupScale& scale = grouped->scales[r * groups + kDead / layout.group_size];
    const std::uint8_t code = grouped->codes[r * kShape.in + kDead];
    EXPECT_EQ(code, layout.codec.quantize(w[r * kShape.in + kDead], scale)) << "row " << r;
    nonzero += layout.codec.dequantize(code, scale) != 0.0f ? 1 : 0;
  }
  EXPECT_GT(nonzero, kShape.out / 2);
  // The dead input's H_jj = 1 is no part of the calibration Hessian's output error.
  expect_output_error_of(
      *grouped, w, format.dequantize(format.encode_groups(grouped->codes, grouped->scales, kShape)),
      kShape, calibration);
}

// Lazy batches only defer updates: batches of 128 columns round like column-at-a-time updates
// (up to double rounding deciding a rare tie differently).
TEST(Gptq, LazyBatchesMatchColumnAtATimeUpdates) {
  const std::vector<float> w = synthetic_weight(kShape, 18);
  const Calibration calibration = correlated_calibration(kShape.in, 512, 19);
  for (const char* name : {"NVFP4A16", "INT4_W4A16", "FP8_E4M3"}) {
    SCOPED_TRACE(name);
    const WeightFormat& format = formats::format_by_name(name);
    const GroupLayout layout = layout_for(format, kShape, options_for(format, w));
    const auto batched = gptq_round(w, kShape, layout, calibration.view(), {.block_size = 128});
    const auto single = gptq_round(w, kShape, layout, calibration.view(), {.block_size = 1});
    ASSERT_TRUE(batched && single);
    std::size_t differ = 0;
    for (std::size_t i = 0; i < w.size(); ++i) differ += batched->codes[i] != single->codes[i];
    EXPECT_LE(differ, w.size() / 1000) << differ << " codes differ";
  }
}

TEST(Gptq, IsDeterministic) {
  const std::vector<float> w = synthetic_weight(kShape, 10);
  const Calibration calibration = correlated_calibration(kShape.in, 512, 11);
  const WeightFormat& format = formats::format_by_name("NVFP4A16");
  const formats::QuantizeOptions options = options_for(format, w);
  const GroupLayout layout = layout_for(format, kShape, options);
  const auto a = gptq_round(w, kShape, layout, calibration.view(), {});
  const auto b = gptq_round(w, kShape, layout, calibration.view(), {});
  ASSERT_TRUE(a && b);
  EXPECT_EQ(a->codes, b->codes);
  EXPECT_TRUE(a->scales == b->scales);
}

// Blocks of rows run in parallel over a fixed partition: with the Hessian factored once, the
// bytes are the same on one thread as on three.
TEST(Gptq, IsIndependentOfTheThreadCount) {
  const std::vector<float> w = synthetic_weight(kShape, 12);
  const Calibration calibration = correlated_calibration(kShape.in, 512, 13);
  const WeightFormat& format = formats::format_by_name("NVFP4A16");
  const formats::QuantizeOptions options = options_for(format, w);
  const GroupLayout layout = layout_for(format, kShape, options);
  const std::optional<HessianFactor> factor = factor_hessian(calibration.view(), kShape.in, {});
  ASSERT_TRUE(factor.has_value());
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const GroupedWeight one = gptq_round(w, kShape, layout, calibration.view(), *factor, {});
  omp_set_num_threads(3);
  const GroupedWeight three = gptq_round(w, kShape, layout, calibration.view(), *factor, {});
  omp_set_num_threads(threads);
  EXPECT_EQ(one.codes, three.codes);
  EXPECT_TRUE(one.scales == three.scales);
  EXPECT_EQ(one.output_error, three.output_error);
}

// A Linear for GptqRounding jobs.
model::Linear test_linear(const std::string& name, Shape2D shape) {
  model::Linear linear;
  linear.name = name;
  linear.out_features = shape.out;
  linear.in_features = shape.in;
  return linear;
}

TEST(GptqRounding, FallsBackToNearestWithAWarning) {
  const std::vector<float> w = synthetic_weight(kShape, 12);
  Calibration indefinite = correlated_calibration(kShape.in, 256, 13);
  // A negative eigenvalue far beyond the 1% damping: no Cholesky factor exists.
  indefinite.hessian[3 * kShape.in + 3] = -1e6f;
  Calibration not_finite = correlated_calibration(kShape.in, 256, 13);
  not_finite.hessian[5 * kShape.in + 9] = std::nanf("");
  Calibration unrouted = correlated_calibration(kShape.in, 256, 13);
  unrouted.tokens = 0;  // an expert no calibration token reached
  const std::map<std::string, const Calibration*> stats = {
      {"model.layers.0.mlp.down_proj", &indefinite},
      {"model.layers.1.mlp.down_proj", &not_finite},
      {"model.layers.2.mlp.experts.3.down_proj", &unrouted}};
  GptqRounding rounding([&](const model::Linear& linear) -> std::optional<CalibrationStatistics> {
    const auto it = stats.find(linear.name);
    if (it == stats.end()) return std::nullopt;
    return it->second->view();
  });
  const WeightFormat& format = formats::format_by_name("MXFP4A16");
  const formats::EncodedWeight nearest = format.quantize(w, kShape);
  for (const char* name :
       {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
        "model.layers.2.mlp.experts.3.down_proj", "model.layers.3.mlp.down_proj"}) {
    const model::Linear linear = test_linear(name, kShape);
    testing::internal::CaptureStderr();
    const formats::EncodedWeight encoded = rounding.encode({linear, format, kShape, w, {}});
    const std::string warning = testing::internal::GetCapturedStderr();
    expect_same_bytes(encoded, nearest);
    EXPECT_EQ(std::count(warning.begin(), warning.end(), '\n'), 1) << warning;
    EXPECT_NE(warning.find(name), std::string::npos) << warning;
  }
  ASSERT_EQ(rounding.reports().size(), 4u);
  for (const RoundingReport& report : rounding.reports()) {
    EXPECT_EQ(report.method, "nearest");
    EXPECT_FALSE(report.fallback.empty());
  }
  // With a (bad) Hessian the RTN error is still reported; without statistics there is none.
  EXPECT_TRUE(rounding.reports()[0].output_mse.has_value());
  EXPECT_FALSE(rounding.reports()[3].output_mse.has_value());
}

TEST(GptqRounding, EncodesWithTheGivenGlobalScaleAndReports) {
  const std::vector<float> w = synthetic_weight(kShape, 14);
  const Calibration calibration = correlated_calibration(kShape.in, 512, 15);
  GptqRounding rounding([&](const model::Linear&) -> std::optional<CalibrationStatistics> {
    return calibration.view();
  });
  const WeightFormat& format = formats::format_by_name("NVFP4");
  const model::Linear linear = test_linear("model.layers.0.self_attn.k_proj", kShape);
  formats::QuantizeOptions options;
  // A sibling's larger amax set the shared global scale.
  options.weight_global_scale = formats::nvfp4_global_scale(3.0f);
  options.input_global_scale = 100.0f;
  const formats::EncodedWeight encoded = rounding.encode({linear, format, kShape, w, options});
  float stored_global = 0.0f;
  std::memcpy(&stored_global, encoded.tensor("weight_global_scale").bytes.data(), 4);
  EXPECT_EQ(stored_global, *options.weight_global_scale);
  float stored_input = 0.0f;
  std::memcpy(&stored_input, encoded.tensor("input_global_scale").bytes.data(), 4);
  EXPECT_EQ(stored_input, 100.0f);

  ASSERT_EQ(rounding.reports().size(), 1u);
  const RoundingReport& report = rounding.reports()[0];
  EXPECT_EQ(report.method, "gptq+sweep");
  ASSERT_TRUE(report.ratio().has_value());
  EXPECT_LT(*report.ratio(), 1.0);
  // The report's error is the stored weight's (from GPTQ's error terms, so up to the f32 GEMM's
  // rounding of the direct computation).
  const double direct = output_mse(w, format.dequantize(encoded), kShape, calibration.view());
  EXPECT_NEAR(*report.output_mse, direct, 1e-6 * direct);
  const nlohmann::json j = to_json(report);
  EXPECT_EQ(j["linear"], linear.name);
  EXPECT_DOUBLE_EQ(j["ratio"].get<double>(), *report.ratio());

  // Encoding the same Linear and format again (measure, then export) gives the same bytes and
  // keeps one report; another format adds one.
  const formats::EncodedWeight again = rounding.encode({linear, format, kShape, w, options});
  expect_same_bytes(again, encoded);
  EXPECT_EQ(rounding.reports().size(), 1u);
  rounding.encode({linear, formats::format_by_name("MXFP4A16"), kShape, w, {}});
  ASSERT_EQ(rounding.reports().size(), 2u);
  EXPECT_EQ(rounding.reports()[1].format, "MXFP4A16");
}

// X^T X and token counts of every decoder Linear's input over a forward pass.
class HessianCollector final : public runtime::LinearObserver {
 public:
  void on_linear(const runtime::LinearActivity& a) override {
    if (a.layer < 0) return;
    Calibration& c = stats_[std::string(a.name)];
    if (c.hessian.empty()) c.hessian.assign(a.in_features * a.in_features, 0.0f);
    runtime::gemm_f32(runtime::Transpose::kYes, runtime::Transpose::kNo, a.in_features,
                      a.in_features, a.rows, 1.0f, a.input, a.in_features, a.input, a.in_features,
                      1.0f, c.hessian.data(), a.in_features);
    c.tokens += a.rows;
  }

  std::map<std::string, Calibration>& finish() {
    for (auto& [name, c] : stats_) {
      const auto in = static_cast<std::int64_t>(std::sqrt(static_cast<double>(c.hessian.size())));
      c.moment.resize(in);
      for (std::int64_t j = 0; j < in; ++j) {
        c.moment[j] = c.hessian[j * in + j] / static_cast<float>(c.tokens);
      }
    }
    return stats_;
  }

 private:
  std::map<std::string, Calibration> stats_;
};

// The probe's statistics reach a Linear through its input key: q/k/v share the attention
// input's Hessian; a Linear the probe never saw has none.
TEST(StatisticsFromProbe, FindsEachLinearsInput) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  probe::ProbeJob job;
  job.model = test::shared_dir() / "models/qwen3-dense-tiny";
  job.data = test::wikitext_excerpt(dir);
  job.out = dir / "probe";
  job.nsamples = 2;
  job.seqlen = 32;
  job.batch_size = 2;
  ASSERT_TRUE(probe::run_probe(job).complete);
  const probe::ProbeResult probe = probe::ProbeResult::read(job.out);
  const StatisticsProvider provider = statistics_from_probe(probe);
  const model::ModelSpec spec = model::load_model_spec(job.model);
  const auto linear = [&](std::string_view name) -> const model::Linear& {
    return *std::find_if(spec.linears.begin(), spec.linears.end(),
                         [&](const model::Linear& l) { return l.name == name; });
  };
  const auto q = provider(linear("model.layers.2.self_attn.q_proj"));
  const auto v = provider(linear("model.layers.2.self_attn.v_proj"));
  const auto down = provider(linear("model.layers.2.mlp.down_proj"));
  ASSERT_TRUE(q && v && down);
  EXPECT_EQ(q->hessian.data(), v->hessian.data());
  EXPECT_EQ(q->tokens, 64);
  EXPECT_EQ(q->hessian.size(), 256u * 256u);
  EXPECT_EQ(down->act_second_moment.size(), 768u);
  EXPECT_NE(down->hessian.data(), q->hessian.data());
  EXPECT_FALSE(provider(test_linear("model.layers.99.mlp.down_proj", {256, 768})).has_value());
}

// Hessians of every decoder Linear's input over a forward pass of `sequences`.
std::map<std::string, Calibration> collect_statistics(
    runtime::Model& model, std::vector<std::vector<std::int32_t>> sequences) {
  std::vector<runtime::Sequence> batch;
  for (auto& tokens : sequences) batch.push_back({std::move(tokens), {}});
  HessianCollector collector;
  model.forward(
      batch, [](std::int64_t, const float*, std::int64_t) {}, &collector);
  return std::move(collector.finish());
}

double geometric_mean(std::span<const double> values) {
  double log_sum = 0.0;
  for (const double v : values) log_sum += std::log(v);
  return std::exp(log_sum / static_cast<double>(values.size()));
}

// qwen3-dense-tiny with the Hessians of its Linears' inputs over 4 x 128 WikiText calibration
// tokens and over 4 x 128 held-out tokens; computed once for the tests that use it.
struct TinyModel {
  model::ModelSpec spec;
  std::unique_ptr<runtime::CheckpointModel> model;
  std::map<std::string, Calibration> calibration;
  // The last calibration sequence's statistics alone, the held-out rows of a probe with
  // --holdout-hessian over these 4 sequences (probe::holdout_sequences).
  std::map<std::string, Calibration> calibration_holdout;
  std::map<std::string, Calibration> heldout;
};

const TinyModel& tiny_model(const std::string& name) {
  static std::map<std::string, TinyModel> models;
  if (const auto it = models.find(name); it != models.end()) return it->second;
  test::TempDir dir;
  const std::filesystem::path model_dir = test::shared_dir() / "models" / name;
  const tokenizer::Tokenizer tokenizer = tokenizer::Tokenizer::load(model_dir);
  const data::TokenDataset dataset =
      data::TokenDataset::from_text_file(test::wikitext_excerpt(dir), tokenizer);
  TinyModel& t = models[name];
  t.spec = model::load_model_spec(model_dir);
  t.model = std::make_unique<runtime::CheckpointModel>(model_dir);
  const std::vector<std::vector<std::int32_t>> sequences = dataset.calibration(4, 128, 42);
  t.calibration = collect_statistics(t.model->model(), sequences);
  t.calibration_holdout = collect_statistics(t.model->model(), {sequences.back()});
  t.heldout = collect_statistics(t.model->model(), dataset.heldout(4, 128));
  return t;
}

const TinyModel& qwen3_dense_tiny() {
  return tiny_model("qwen3-dense-tiny");
}

// Output MSE of GptqRounding's stored weight over RTN's, per candidate Linear of the tiny model:
// on the calibration tokens (the report's ratio) and on the held-out tokens.
struct Ratios {
  std::vector<std::string> linears;
  std::vector<double> calibration;
  std::vector<double> heldout;
  std::size_t better(std::span<const double> ratios) const {
    return static_cast<std::size_t>(
        std::count_if(ratios.begin(), ratios.end(), [](double r) { return r < 1.0; }));
  }
};

Ratios tiny_model_ratios(const WeightFormat& format, const GptqOptions& options,
                         const TinyModel& tiny = qwen3_dense_tiny()) {
  GptqRounding rounding(
      [&](const model::Linear& linear) -> std::optional<CalibrationStatistics> {
        const auto it = tiny.calibration.find(linear.name);
        if (it == tiny.calibration.end()) return std::nullopt;
        return it->second.view();
      },
      options);
  Ratios ratios;
  for (const model::Linear& linear : tiny.spec.linears) {
    if (!linear.is_candidate) continue;
    const std::vector<float> w = tiny.model->checkpoint().to_f32(linear.weight_tensor);
    const Shape2D shape{linear.out_features, linear.in_features};
    const formats::QuantizeOptions quantize_options = options_for(format, w);
    const std::vector<float> stored =
        format.dequantize(rounding.encode({linear, format, shape, w, quantize_options}));
    const RoundingReport& report = rounding.reports().back();
    if (!report.ratio()) continue;  // no statistics: rounded to nearest
    const std::vector<float> nearest =
        format.dequantize(format.quantize(w, shape, quantize_options));
    const auto heldout = tiny.heldout.find(linear.name);
    if (heldout == tiny.heldout.end() || heldout->second.tokens == 0) continue;
    const CalibrationStatistics unseen = heldout->second.view();
    ratios.linears.push_back(linear.name);
    ratios.calibration.push_back(report.ratio().value_or(1.0));
    ratios.heldout.push_back(output_mse(w, stored, shape, unseen) /
                             output_mse(w, nearest, shape, unseen));
  }
  return ratios;
}

// Real weights and activations. GPTQ + sweep must beat round-to-nearest on the calibration output
// error of at least 90% of the NVFP4 Linears. Printed beside it: the same ratios without the
// sweep, and on held-out tokens (the calibration ratio flatters GPTQ: down_proj has 768 inputs
// and only 512 calibration tokens).
TEST(GptqRounding, BeatsNearestOnQwen3DenseTinyNvfp4) {
  PQ_REQUIRE_SHARED();
  const WeightFormat& format = formats::format_by_name("NVFP4A16");
  const Ratios swept = tiny_model_ratios(format, {});
  const Ratios plain = tiny_model_ratios(format, {.scale_sweep = false});
  ASSERT_EQ(swept.linears.size(), 56u);
  for (std::size_t i = 0; i < swept.linears.size(); ++i) {
    std::printf("  %-36s calibration %.3f (no sweep %.3f)  held-out %.3f\n",
                swept.linears[i].c_str(), swept.calibration[i], plain.calibration[i],
                swept.heldout[i]);
  }
  std::printf(
      "qwen3-dense-tiny NVFP4A16, output MSE GPTQ+sweep / RTN, geometric mean over %zu Linears: "
      "calibration %.3f (better on %zu; without the sweep %.3f), held-out %.3f (better on %zu; "
      "without the sweep %.3f)\n",
      swept.linears.size(), geometric_mean(swept.calibration), swept.better(swept.calibration),
      geometric_mean(plain.calibration), geometric_mean(swept.heldout), swept.better(swept.heldout),
      geometric_mean(plain.heldout));
  EXPECT_GE(swept.better(swept.calibration) * 10, swept.linears.size() * 9);
}

// The same for the other group layouts: MX (E8M0 scales), INT4 g128 and INT8 per channel (BF16
// scales), FP8 per channel and 128 x 128 blocks (F32 scales).
TEST(GptqRounding, BeatsNearestOnQwen3DenseTinyInEveryLayout) {
  PQ_REQUIRE_SHARED();
  for (const char* name : {"MXFP4A16", "INT4_W4A16", "INT8_W8A16", "FP8_E4M3", "FP8_BLOCK"}) {
    SCOPED_TRACE(name);
    const Ratios ratios = tiny_model_ratios(formats::format_by_name(name), {});
    std::printf(
        "qwen3-dense-tiny %-10s output MSE GPTQ+sweep / RTN, geometric mean: calibration %.3f "
        "(better on %zu of %zu), held-out %.3f (better on %zu)\n",
        name, geometric_mean(ratios.calibration), ratios.better(ratios.calibration),
        ratios.linears.size(), geometric_mean(ratios.heldout), ratios.better(ratios.heldout));
    EXPECT_GE(ratios.better(ratios.calibration) * 10, ratios.linears.size() * 9);
  }
}

// qwen3-moe-tiny (8 experts, top-2): experts see from 0 to 512 of the 512 calibration tokens.
// Experts no token reached are rounded to nearest with a warning, those under min_tokens
// silently; everything else gets GPTQ, which beats RTN on the held-out tokens of at least 90% of
// them (with fewer tokens than inputs, the calibration ratio alone would flatter it).
TEST(GptqRounding, HandlesRarelyRoutedExpertsOfQwen3MoeTiny) {
  PQ_REQUIRE_SHARED();
  const TinyModel& moe = tiny_model("qwen3-moe-tiny");
  const WeightFormat& format = formats::format_by_name("NVFP4A16");
  GptqRounding rounding([&](const model::Linear& linear) -> std::optional<CalibrationStatistics> {
    const auto it = moe.calibration.find(linear.name);
    if (it == moe.calibration.end()) return std::nullopt;
    return it->second.view();
  });
  std::size_t unrouted = 0, few = 0, gptq = 0, heldout_better = 0, heldout_measured = 0;
  testing::internal::CaptureStderr();
  for (const model::Linear& linear : moe.spec.linears) {
    if (!linear.is_candidate) continue;
    const std::vector<float> w = moe.model->checkpoint().to_f32(linear.weight_tensor);
    const Shape2D shape{linear.out_features, linear.in_features};
    const formats::QuantizeOptions options = options_for(format, w);
    const std::vector<float> stored =
        format.dequantize(rounding.encode({linear, format, shape, w, options}));
    const auto calibration = moe.calibration.find(linear.name);
    const std::int64_t tokens =
        calibration == moe.calibration.end() ? 0 : calibration->second.tokens;
    const RoundingReport& report = rounding.reports().back();
    if (tokens == 0) {
      ++unrouted;
      EXPECT_EQ(report.method, "nearest") << linear.name;
    } else if (tokens < GptqOptions{}.min_tokens) {
      ++few;
      EXPECT_EQ(report.method, "nearest") << linear.name;
      EXPECT_NE(report.fallback.find("calibration tokens"), std::string::npos) << linear.name;
    } else {
      ++gptq;
      EXPECT_EQ(report.method, "gptq+sweep") << linear.name << ": " << report.fallback;
      const auto heldout = moe.heldout.find(linear.name);
      if (heldout == moe.heldout.end() || heldout->second.tokens == 0) continue;
      const std::vector<float> nearest = format.dequantize(format.quantize(w, shape, options));
      ++heldout_measured;
      heldout_better += output_mse(w, stored, shape, heldout->second.view()) <
                        output_mse(w, nearest, shape, heldout->second.view());
    }
  }
  const std::string warnings = testing::internal::GetCapturedStderr();
  EXPECT_EQ(static_cast<std::size_t>(std::count(warnings.begin(), warnings.end(), '\n')), unrouted);
  std::printf(
      "qwen3-moe-tiny NVFP4A16: %zu Linears GPTQ'd (held-out output MSE below RTN's on %zu of "
      "%zu), %zu under %lld tokens and %zu unrouted rounded to nearest\n",
      gptq, heldout_better, heldout_measured, few, static_cast<long long>(GptqOptions{}.min_tokens),
      unrouted);
  EXPECT_GT(unrouted + few, 0u);
  EXPECT_GE(heldout_better * 10, heldout_measured * 9);
}

// --- Local-Hessian scales

// The damped [gs, gs] diagonal block of H for column group g, as local_hessian_round builds it.
std::vector<double> damped_block(const CalibrationStatistics& stats, std::int64_t in,
                                 std::int64_t g, std::int64_t group_size, double damp) {
  double diag_sum = 0.0;
  for (std::int64_t j = 0; j < in; ++j) diag_sum += stats.hessian[j * in + j];
  const double added = damp * diag_sum / static_cast<double>(in);
  std::vector<double> block(group_size * group_size);
  for (std::int64_t a = 0; a < group_size; ++a) {
    for (std::int64_t b = 0; b < group_size; ++b) {
      block[a * group_size + b] =
          stats.hessian[(g * group_size + a) * in + g * group_size + b] + (a == b ? added : 0.0);
    }
  }
  return block;
}

// Per group of a rendering, its local objective (local_hessian_objective with the damped block).
std::vector<double> group_objectives(const GroupLayout& layout, std::span<const float> w,
                                     std::span<const float> stored, Shape2D shape,
                                     const CalibrationStatistics& stats, double damp) {
  const std::int64_t gs = layout.group_size;
  const std::int64_t groups = shape.in / gs;
  std::vector<double> out(shape.out * groups);
  for (std::int64_t g = 0; g < groups; ++g) {
    const std::vector<double> block = damped_block(stats, shape.in, g, gs, damp);
    for (std::int64_t r = 0; r < shape.out; ++r) {
      out[r * groups + g] = local_hessian_objective(
          w.subspan(r * shape.in + g * gs, gs), stored.subspan(r * shape.in + g * gs, gs), block);
    }
  }
  return out;
}

formats::QuantizeOptions local_hessian_options_for(const WeightFormat& format,
                                                   std::span<const float> w,
                                                   formats::Nvfp4Scales rule) {
  formats::QuantizeOptions options;
  if (format.name() == "NVFP4A16") {
    options.nvfp4_scales = rule;
    options.weight_global_scale =
        formats::nvfp4_weight_global_scale(std::bit_cast<float>(formats::max_abs_bits(w)), rule);
  }
  return options;
}

// Real weights and calibration Hessians (qwen3-dense-tiny, layers 0 and 5): in every NVFP4 and MX
// layout, no group's local objective is above round-to-nearest's and some are strictly below;
// the full E4M3 search is never above the +-8 bracket; codes are round-to-nearest under the
// chosen scales; encode_groups decodes to exactly those codes and scales; under Marlin's rule no
// non-zero group has a subnormal scale; and the render does not depend on the run or the thread
// count.
TEST(LocalHessian, ImprovesOrKeepsEveryGroupOnQwen3DenseTiny) {
  PQ_REQUIRE_SHARED();
  const TinyModel& tiny = qwen3_dense_tiny();
  struct Case {
    const char* format;
    formats::Nvfp4Scales rule;
  };
  for (const Case c : {Case{"NVFP4A16", formats::Nvfp4Scales::kCompressedTensors},
                       Case{"NVFP4A16", formats::Nvfp4Scales::kMarlin},
                       Case{"MXFP4A16", formats::Nvfp4Scales::kCompressedTensors},
                       Case{"MXFP8A16", formats::Nvfp4Scales::kCompressedTensors}}) {
    const WeightFormat& format = formats::format_by_name(c.format);
    std::size_t groups = 0, lower = 0, bracket_lower = 0;
    for (const model::Linear& linear : tiny.spec.linears) {
      if (!linear.is_candidate || (linear.layer != 0 && linear.layer != 5)) continue;
      SCOPED_TRACE(fmt::format("{} ({}) {}", c.format, static_cast<int>(c.rule), linear.name));
      const std::vector<float> w = tiny.model->checkpoint().to_f32(linear.weight_tensor);
      const Shape2D shape{linear.out_features, linear.in_features};
      const CalibrationStatistics stats = tiny.calibration.at(linear.name).view();
      const formats::QuantizeOptions options = local_hessian_options_for(format, w, c.rule);
      const GroupLayout layout = layout_for(format, shape, options);
      ASSERT_TRUE(local_hessian_applies(layout));
      const LocalHessianOptions full;
      const std::optional<GroupedWeight> render =
          local_hessian_round(w, shape, layout, stats, full);
      ASSERT_TRUE(render.has_value());

      const formats::EncodedWeight encoded =
          format.encode_groups(render->codes, render->scales, shape, options);
      const std::vector<float> stored = format.dequantize(encoded);
      std::vector<float> expected(w.size());
      formats::dequantize_rows(layout.codec, render->codes, render->scales, shape.in,
                               layout.group_size, expected);
      ASSERT_TRUE(same_bits(stored, expected));
      std::vector<GroupScale> scales = render->scales;
      EXPECT_EQ(codes_for(layout, w, scales, shape), render->codes);
      const double direct = output_mse(w, stored, shape, stats) *
                            static_cast<double>(stats.tokens) * static_cast<double>(shape.out);
      EXPECT_NEAR(render->output_error, direct, 1e-9 * direct);

      const std::vector<float> nearest = format.dequantize(format.quantize(w, shape, options));
      const std::vector<double> rendered =
          group_objectives(layout, w, stored, shape, stats, full.damp);
      const std::vector<double> rtn = group_objectives(layout, w, nearest, shape, stats, full.damp);
      const std::vector<GroupScale> nearest_scale = nearest_scales(layout, w, shape);
      std::int64_t changed = 0;
      for (std::size_t i = 0; i < rendered.size(); ++i) {
        ASSERT_LE(rendered[i], rtn[i]) << "group " << i;
        lower += rendered[i] < rtn[i];
        changed += render->scales[i] != nearest_scale[i] ? 1 : 0;
      }
      groups += rendered.size();
      EXPECT_EQ(render->groups_rescaled, changed);

      if (layout.codec.scale_spec().kind == formats::ScaleKind::kE4M3OverGlobal) {
        const std::optional<GroupedWeight> bracket =
            local_hessian_round(w, shape, layout, stats, {.e4m3_bracket = 8});
        ASSERT_TRUE(bracket.has_value());
        std::vector<float> bracket_stored(w.size());
        formats::dequantize_rows(layout.codec, bracket->codes, bracket->scales, shape.in,
                                 layout.group_size, bracket_stored);
        const std::vector<double> narrow =
            group_objectives(layout, w, bracket_stored, shape, stats, full.damp);
        for (std::size_t i = 0; i < rendered.size(); ++i) {
          ASSERT_LE(rendered[i], narrow[i]) << "group " << i;
          bracket_lower += rendered[i] < narrow[i];
        }
        if (c.rule == formats::Nvfp4Scales::kMarlin) {
          for (const GroupScale& s : render->scales) {
            if (s.stored != 0) {
              ASSERT_GE(s.stored, 0x08u);
            }
          }
        }
      }

      const std::optional<GroupedWeight> again = local_hessian_round(w, shape, layout, stats, full);
      EXPECT_EQ(again->codes, render->codes);
      EXPECT_EQ(again->scales, render->scales);
      const int threads = omp_get_max_threads();
      omp_set_num_threads(threads == 1 ? 2 : 1);
      const std::optional<GroupedWeight> other = local_hessian_round(w, shape, layout, stats, full);
      omp_set_num_threads(threads);
      EXPECT_EQ(other->codes, render->codes);
      EXPECT_EQ(other->scales, render->scales);
    }
    std::printf(
        "%s (%s scales): %zu of %zu groups below round-to-nearest's local error; full "
        "E4M3 search below the +-8 bracket on %zu\n",
        c.format, c.rule == formats::Nvfp4Scales::kMarlin ? "Marlin" : "compressed-tensors", lower,
        groups, bracket_lower);
    EXPECT_GT(lower, 0u);
  }
}

// The objective's SIMD path (taken here when the CPU has AVX2) gives the bits of the scalar
// formula, for NVFP4's 16-element and MX's 32-element groups and symmetric blocks.
TEST(LocalHessian, ObjectiveMatchesTheScalarFormulaBitForBit) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const std::size_t n : {16u, 32u, 12u}) {
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<float> x(n), q(n);
      for (std::size_t i = 0; i < n; ++i) {
        x[i] = normal(rng);
        q[i] = x[i] + 0.1f * normal(rng);
      }
      std::vector<double> block(n * n);
      for (std::size_t i = 0; i < n; ++i) {
        for (std::size_t j = 0; j <= i; ++j) {
          block[i * n + j] = block[j * n + i] = normal(rng) + (i == j ? 3.0 * n : 0.0);
        }
      }
      double sum = 0.0;
      for (std::size_t i = 0; i < n; ++i) {
        double row = 0.0;
        for (std::size_t j = 0; j < n; ++j) row += block[i * n + j] * (double{q[j]} - x[j]);
        sum += (double{q[i]} - x[i]) * row;
      }
      EXPECT_EQ(local_hessian_objective(x, q, block), sum) << n;
    }
  }
}

TEST(LocalHessian, RendersOnlyNvfp4AndMxScales) {
  const std::vector<float> w = synthetic_weight(kShape, 21);
  const Calibration calibration = correlated_calibration(kShape.in, 256, 22);
  for (const WeightFormat* format : grouped_formats(kShape)) {
    SCOPED_TRACE(std::string(format->name()));
    const formats::QuantizeOptions options = options_for(*format, w);
    const GroupLayout layout = layout_for(*format, kShape, options);
    const formats::ScaleKind kind = layout.codec.scale_spec().kind;
    const bool expected = kind != formats::ScaleKind::kFloat;
    EXPECT_EQ(local_hessian_applies(layout), expected);
    EXPECT_EQ(local_hessian_round(w, kShape, layout, calibration.view()).has_value(), expected);
  }
}

// GptqRounding with both renders: each is measured and recorded in the report's candidates, the
// stored weight is the lowest of them and round-to-nearest, and each set of renders has its own
// name and fingerprint (the render cache keys on it).
TEST(GptqRounding, OffersLocalHessianBesideGptq) {
  const std::vector<float> w = synthetic_weight(kShape, 31);
  const Calibration calibration = correlated_calibration(kShape.in, 512, 32);
  const StatisticsProvider provider =
      [&](const model::Linear&) -> std::optional<CalibrationStatistics> {
    return calibration.view();
  };
  GptqRounding both(provider, {.local_hessian = true});
  GptqRounding local(provider, {.gptq = false, .local_hessian = true});
  const GptqRounding gptq(provider);
  EXPECT_EQ(both.name(), "gptq+local-hessian");
  EXPECT_EQ(local.name(), "local-hessian");
  EXPECT_EQ(gptq.name(), "gptq");
  EXPECT_NE(both.fingerprint(), gptq.fingerprint());
  EXPECT_NE(local.fingerprint(), gptq.fingerprint());
  EXPECT_NE(local.fingerprint(), both.fingerprint());
  EXPECT_NE(local.fingerprint(),
            GptqRounding(provider,
                         {.gptq = false, .local_hessian = true, .local_hessian_e4m3_bracket = 8})
                .fingerprint());
  EXPECT_THROW(GptqRounding(provider, {.gptq = false}), Error);
  // By name, as --rounding gives it: the Local-Hessian strategies need a probe's Hessians too.
  for (const char* name : {"gptq", "local-hessian", "gptq+local-hessian"}) {
    try {
      make_rounding(name, nullptr);
      ADD_FAILURE() << name << " without a probe";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
    }
  }
  EXPECT_EQ(make_rounding("nearest", nullptr)->name(), "nearest");
  try {
    make_rounding("local_hessian", nullptr);
    ADD_FAILURE() << "an unknown name";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("gptq+local-hessian"), std::string::npos) << e.what();
  }

  const model::Linear linear = test_linear("model.layers.0.self_attn.k_proj", kShape);
  for (const char* name : {"NVFP4A16", "MXFP4A16", "INT4_W4A16"}) {
    SCOPED_TRACE(name);
    const WeightFormat& format = formats::format_by_name(name);
    const formats::QuantizeOptions options = options_for(format, w);
    const std::vector<float> stored =
        format.dequantize(both.encode({linear, format, kShape, w, options}));
    const RoundingReport& report = both.reports().back();
    const bool scales = std::string_view(name) != "INT4_W4A16";
    ASSERT_EQ(report.candidates.size(), scales ? 2u : 1u);
    EXPECT_TRUE(report.candidates.contains("gptq+sweep"));
    EXPECT_EQ(report.candidates.contains("local-hessian"), scales);
    double lowest = *report.nearest_output_mse;
    for (const auto& [method, mse] : report.candidates) lowest = std::min(lowest, mse);
    EXPECT_EQ(*report.output_mse, lowest);
    EXPECT_EQ(report.candidates.at(report.method), lowest);
    const double direct = output_mse(w, stored, kShape, calibration.view());
    EXPECT_NEAR(*report.output_mse, direct, 1e-6 * direct);
    EXPECT_EQ(rounding_report_from_json(to_json(report)).candidates, report.candidates);

    local.encode({linear, format, kShape, w, options});
    const RoundingReport& alone = local.reports().back();
    if (scales) {
      EXPECT_EQ(alone.candidates.at("local-hessian"), report.candidates.at("local-hessian"));
      EXPECT_LE(*alone.output_mse, *alone.nearest_output_mse);
    } else {
      EXPECT_EQ(alone.method, "nearest");
      EXPECT_EQ(alone.fallback, "Local-Hessian renders NVFP4 and MX group scales only");
    }
  }
}

// Calibration statistics of `fitting` and `holdout` rows together, with the held-out rows'
// Hessian recorded apart (as a probe with --holdout-hessian gives them).
struct SplitCalibration {
  Calibration all;
  Calibration holdout;
  CalibrationStatistics view() const {
    CalibrationStatistics stats = all.view();
    stats.key = "split";
    stats.holdout_hessian = holdout.hessian;
    stats.holdout_tokens = holdout.tokens;
    return stats;
  }
};

SplitCalibration split_calibration(const Calibration& fitting, const Calibration& holdout) {
  SplitCalibration split{fitting, holdout};
  const auto in = static_cast<std::int64_t>(fitting.moment.size());
  split.all.tokens += holdout.tokens;
  for (std::size_t k = 0; k < split.all.hessian.size(); ++k) {
    split.all.hessian[k] += holdout.hessian[k];
  }
  for (std::int64_t j = 0; j < in; ++j) {
    split.all.moment[j] = split.all.hessian[j * in + j] / static_cast<float>(split.all.tokens);
  }
  return split;
}

// Inputs that span only `rank` directions (no per-channel noise): GPTQ fitted to them moves the
// error into the directions they never excite.
Calibration low_rank_calibration(std::int64_t in, std::int64_t tokens, std::int64_t rank,
                                 std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> mixing(rank * in);
  for (float& v : mixing) v = normal(rng);
  std::vector<float> x(tokens * in, 0.0f);
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t k = 0; k < rank; ++k) {
      const float latent = normal(rng);
      for (std::int64_t j = 0; j < in; ++j) x[t * in + j] += latent * mixing[k * in + j];
    }
  }
  return from_activations(x, tokens, in);
}

// With held-out rows, every render is fitted without them and judged on them: the stored method
// is the lowest held-out error (round-to-nearest unless one is strictly lower), and the stored
// weight is that method rendered again on all rows, i.e. what the same render stores from the
// statistics without a held-out split.
TEST(GptqRounding, ChoosesOnHeldOutRowsAndStoresTheWinnerRenderedOnAllRows) {
  const std::vector<float> w = synthetic_weight(kShape, 41);
  const model::Linear linear = test_linear("model.layers.0.self_attn.k_proj", kShape);
  const WeightFormat& nvfp4 = formats::format_by_name("NVFP4A16");
  const formats::QuantizeOptions options = options_for(nvfp4, w);
  const auto provider_of = [](CalibrationStatistics stats) -> StatisticsProvider {
    return [stats](const model::Linear&) -> std::optional<CalibrationStatistics> { return stats; };
  };

  // Fitting and held-out rows from one draw: GPTQ generalises and wins on the held-out rows.
  const std::vector<float> x = correlated_activations(kShape.in, 1024, 42);
  const auto held_rows = std::span(x).subspan(896 * kShape.in);
  const Calibration rows = from_activations(held_rows, 128, kShape.in);
  const SplitCalibration alike = split_calibration(from_activations(x, 896, kShape.in), rows);
  GptqRounding both(provider_of(alike.view()), {.local_hessian = true});
  const std::vector<float> stored =
      nvfp4.dequantize(both.encode({linear, nvfp4, kShape, w, options}));
  const RoundingReport report = both.reports().back();
  EXPECT_EQ(report.holdout_tokens, 128);
  ASSERT_EQ(report.holdout_candidates.size(), 3u);
  double lowest = report.holdout_candidates.at("nearest");
  std::string argmin = "nearest";
  for (const auto& [method, mse] : report.holdout_candidates) {
    if (mse < lowest) {
      lowest = mse;
      argmin = method;
    }
  }
  EXPECT_EQ(report.method, argmin);
  EXPECT_EQ(report.method, "gptq+sweep");
  EXPECT_LT(report.holdout_candidates.at("gptq+sweep"),
            0.5 * report.holdout_candidates.at("nearest"));
  // Each render judged on the held-out rows is the one fitted without them.
  const CalibrationStatistics holdout_only = rows.view();
  const std::vector<float> gptq_all = nvfp4.dequantize(
      GptqRounding(provider_of(alike.all.view())).encode({linear, nvfp4, kShape, w, options}));
  EXPECT_EQ(stored, gptq_all);
  EXPECT_NEAR(*report.output_mse, output_mse(w, stored, kShape, alike.all.view()),
              1e-6 * *report.output_mse);
  EXPECT_NE(report.holdout_candidates.at("gptq+sweep"),
            output_mse(w, gptq_all, kShape, holdout_only));
  // Two factorizations (fitting rows, all rows), then shared by a sibling of the same input.
  EXPECT_EQ(both.factorizations(), 2);
  both.encode({test_linear("model.layers.0.self_attn.v_proj", kShape), nvfp4, kShape, w, options});
  EXPECT_EQ(both.factorizations(), 2);
  const RoundingReport again = rounding_report_from_json(to_json(report));
  EXPECT_EQ(again.holdout_tokens, report.holdout_tokens);
  EXPECT_EQ(again.holdout_candidates, report.holdout_candidates);
  EXPECT_NE(both.describe({{linear.name, "NVFP4A16"}}).find("held-out"), std::string::npos);

  // Fitting rows along one direction, held-out rows in all: GPTQ's fit does not carry over, and
  // the held-out choice keeps round-to-nearest where the calibration error would pick GPTQ.
  const SplitCalibration skewed = split_calibration(low_rank_calibration(kShape.in, 448, 1, 44),
                                                    from_activations(held_rows, 128, kShape.in));
  GptqRounding gptq(provider_of(skewed.view()));
  const std::vector<float> kept =
      nvfp4.dequantize(gptq.encode({linear, nvfp4, kShape, w, options}));
  const RoundingReport& guarded = gptq.reports().back();
  EXPECT_GT(guarded.holdout_candidates.at("gptq+sweep"), guarded.holdout_candidates.at("nearest"));
  EXPECT_EQ(guarded.method, "nearest");
  EXPECT_NE(guarded.fallback.find("held-out"), std::string::npos) << guarded.fallback;
  EXPECT_EQ(kept, nvfp4.dequantize(nvfp4.quantize(w, kShape, options)));
  GptqRounding calibration_choice(provider_of(skewed.all.view()));
  calibration_choice.encode({linear, nvfp4, kShape, w, options});
  EXPECT_EQ(calibration_choice.reports().back().method, "gptq+sweep");
}

// --- Local-Hessian against GPTQ + sweep against round-to-nearest, on both tiny Qwen3 models
// (docs/export.md): per format and strategy, the geometric mean over the Linears with statistics
// of the held-out output MSE over RTN's, and the model's held-out KL with every candidate Linear
// in the format. Asserted: Local-Hessian (improve-or-keep) lowers the calibration error of every
// Linear it changes, and the strategy choosing by calibration error is never above RTN there.
TEST(LocalHessian, AgainstGptqAndNearestOnQwen3TinyModels) {
  PQ_REQUIRE_SHARED();
  for (const char* model_name : {"qwen3-dense-tiny", "qwen3-moe-tiny"}) {
    const TinyModel& tiny = tiny_model(model_name);
    test::TempDir dir;
    const std::filesystem::path model_dir = test::shared_dir() / "models" / model_name;
    const data::TokenDataset dataset = data::TokenDataset::from_text_file(
        test::wikitext_excerpt(dir), tokenizer::Tokenizer::load(model_dir));
    const io::Checkpoint checkpoint = io::Checkpoint::open(model_dir);
    const runtime::CheckpointWeightSource source(checkpoint);
    const scout::KlEvaluator evaluator(model::ModelConfig::load(model_dir), source,
                                       dataset.heldout(8, 128));
    const StatisticsProvider provider =
        [&](const model::Linear& linear) -> std::optional<CalibrationStatistics> {
      const auto it = tiny.calibration.find(linear.name);
      if (it == tiny.calibration.end()) return std::nullopt;
      return it->second.view();
    };
    // The same statistics with the last calibration sequence held out (SplitCalibration).
    std::map<std::string, SplitCalibration> split;
    for (const auto& [name, all] : tiny.calibration) {
      const auto held = tiny.calibration_holdout.find(name);
      split[name] = {all,
                     held == tiny.calibration_holdout.end()
                         ? Calibration{std::vector<float>(all.hessian.size(), 0.0f), all.moment, 0}
                         : held->second};
    }
    const StatisticsProvider split_provider =
        [&](const model::Linear& linear) -> std::optional<CalibrationStatistics> {
      const auto it = split.find(linear.name);
      if (it == split.end()) return std::nullopt;
      CalibrationStatistics stats = it->second.view();
      stats.key = linear.name;
      return stats;
    };
    struct Strategy {
      const char* name;
      std::optional<GptqOptions> options;  // nullopt: round to nearest
      bool held_out = false;               // choose on the last calibration sequence
    };
    const Strategy strategies[] = {
        {"nearest", std::nullopt},
        {"gptq+sweep", GptqOptions{}},
        {"local-hessian", GptqOptions{.gptq = false, .local_hessian = true}},
        {"local-hessian +-8",
         GptqOptions{.gptq = false, .local_hessian = true, .local_hessian_e4m3_bracket = 8}},
        {"gptq+local-hessian", GptqOptions{.local_hessian = true}},
        {"gptq+local-hessian, held-out", GptqOptions{.local_hessian = true}, true},
        {"gptq, local-hessian sweep", GptqOptions{.sweep_local_hessian = true}},
    };
    for (const char* format_name : {"NVFP4A16", "MXFP4A16", "MXFP8A16"}) {
      const WeightFormat& format = formats::format_by_name(format_name);
      for (const Strategy& strategy : strategies) {
        if (std::string_view(format_name) != "NVFP4A16" &&
            std::string_view(strategy.name) == "local-hessian +-8") {
          continue;
        }
        SCOPED_TRACE(fmt::format("{} {} {}", model_name, format_name, strategy.name));
        std::optional<GptqRounding> rounding;
        if (strategy.options) {
          rounding.emplace(strategy.held_out ? split_provider : provider, *strategy.options);
        }
        QuantizedLinears quantized;
        std::vector<double> heldout_ratios;
        std::map<std::string, std::int64_t> methods;
        testing::internal::CaptureStderr();  // unrouted experts' warnings
        for (const model::Linear& linear : tiny.spec.linears) {
          if (!linear.is_candidate) continue;
          const std::vector<float> w = tiny.model->checkpoint().to_f32(linear.weight_tensor);
          const Shape2D shape{linear.out_features, linear.in_features};
          if (format.rejects(shape)) continue;
          const formats::QuantizeOptions options = options_for(format, w);
          const std::vector<float> nearest = format.dequantize(format.quantize(w, shape, options));
          std::vector<float> stored = nearest;
          if (rounding) {
            stored = format.dequantize(rounding->encode({linear, format, shape, w, options}));
            const RoundingReport& report = rounding->reports().back();
            ++methods[report.method];
            if (report.output_mse && report.nearest_output_mse) {
              EXPECT_LE(*report.output_mse, *report.nearest_output_mse) << linear.name;
            }
          }
          const auto heldout = tiny.heldout.find(linear.name);
          const auto calibration = tiny.calibration.find(linear.name);
          if (heldout != tiny.heldout.end() && heldout->second.tokens > 0 &&
              calibration != tiny.calibration.end() &&
              calibration->second.tokens >= GptqOptions{}.min_tokens) {
            const CalibrationStatistics unseen = heldout->second.view();
            const double rtn = output_mse(w, nearest, shape, unseen);
            if (rtn > 0.0) heldout_ratios.push_back(output_mse(w, stored, shape, unseen) / rtn);
          }
          quantized.set(linear.name, std::move(stored), nullptr);
        }
        testing::internal::GetCapturedStderr();
        const scout::KlMeasurement kl = evaluator.measure(&quantized, nullptr);
        std::string chosen;
        for (const auto& [method, count] : methods) chosen += fmt::format(" {} {}", count, method);
        std::printf("%s %-8s %-25s held-out output MSE / RTN %.4f over %zu Linears, KL %.6f;%s\n",
                    model_name, format_name, strategy.name, geometric_mean(heldout_ratios),
                    heldout_ratios.size(), kl.kl, chosen.c_str());
      }
    }
  }
}

}  // namespace
}  // namespace pq::exporter
