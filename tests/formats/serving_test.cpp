#include "formats/serving.h"

#include <gtest/gtest.h>

#include <string>

#include "common/error.h"
#include "formats/weight_format.h"

namespace pq::formats {
namespace {

const ServingBehaviour& cell(std::string_view format, LayerKind kind, ServingTarget target) {
  return serving_behaviour(format_by_name(format), kind, target);
}

TEST(ServingModel, EveryExportableCellIsDefinedOnceAndCited) {
  int cells = 0;
  for (const WeightFormat* f : all_formats()) {
    if (!f->exportable()) continue;
    for (const LayerKind kind : all_layer_kinds()) {
      for (const ServingTarget target : all_serving_targets()) {
        SCOPED_TRACE(
            fmt::format("{} {} {}", f->name(), layer_kind_name(kind), serving_target_name(target)));
        const ServingBehaviour& b = serving_behaviour(*f, kind, target);  // throws on gap/overlap
        EXPECT_FALSE(b.source.empty());
        EXPECT_EQ(b.loads, b.activations != ActivationPath::kNotLoaded);
        if (b.loads) EXPECT_FALSE(b.kernel.empty());
        if (!b.loads) EXPECT_FALSE(b.note.empty()) << "a refusal says what vLLM raises";
        // Marlin never quantizes activations; the NVFP4-only scale facts need Marlin.
        if (b.marlin) EXPECT_EQ(b.activations, ActivationPath::kSixteenBit);
        if (b.global_scale_bf16 || b.flushes_subnormal_scales) EXPECT_TRUE(b.marlin);
        ++cells;
      }
    }
  }
  EXPECT_EQ(cells, 14 * 4 * 4);
}

TEST(ServingModel, ResearchOnlyFormatsHaveNoServingModel) {
  try {
    cell("MXFP6_E2M3", LayerKind::kLinear, ServingTarget::kHopper);
    FAIL() << "expected pq::Error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "MXFP6_E2M3 is research only: vLLM has no scheme to serve it");
  }
}

TEST(ServingModel, Fp8WeightOnlyExpertsLoadNowhere) {
  for (const ServingTarget target : all_serving_targets()) {
    const ServingBehaviour& b = cell("FP8_E4M3A16", LayerKind::kMoeExperts, target);
    EXPECT_FALSE(b.loads);
    EXPECT_TRUE(b.confirmed());
    EXPECT_NE(b.note.find("only format 'pack-quantized'"), std::string_view::npos);
    // The same scheme on a dense Linear loads (Marlin FP8).
    EXPECT_TRUE(cell("FP8_E4M3A16", LayerKind::kLinear, target).loads);
  }
}

TEST(ServingModel, IntWeightOnlyExpertsLoadThroughMarlin) {
  for (const ServingTarget target : all_serving_targets()) {
    for (const char* f : {"INT4_W4A16", "INT8_W8A16"}) {
      const ServingBehaviour& b = cell(f, LayerKind::kMoeExperts, target);
      EXPECT_TRUE(b.loads && b.marlin && b.confirmed()) << f;
    }
  }
}

TEST(ServingModel, Fp4BelowBlackwellIsMarlinWeightOnly) {
  for (const ServingTarget target :
       {ServingTarget::kHopper, ServingTarget::kAda, ServingTarget::kAmpere}) {
    for (const char* f : {"NVFP4", "NVFP4A16", "MXFP4", "MXFP4A16"}) {
      for (const LayerKind kind : {LayerKind::kLinear, LayerKind::kFusedLinear}) {
        const ServingBehaviour& b = cell(f, kind, target);
        EXPECT_TRUE(b.loads) << f;
        EXPECT_TRUE(b.marlin) << f;
        EXPECT_EQ(b.activations, ActivationPath::kSixteenBit) << f;
      }
    }
  }
  const ServingBehaviour& nvfp4 = cell("NVFP4", LayerKind::kLinear, ServingTarget::kHopper);
  EXPECT_TRUE(nvfp4.global_scale_bf16);
  EXPECT_TRUE(nvfp4.flushes_subnormal_scales);
  EXPECT_TRUE(nvfp4.confirmed()) << nvfp4.unconfirmed;
  // Marlin's scale rule follows the cell: NVFP4 W4A4 only below sm100, NVFP4A16 everywhere.
  const WeightFormat& w4a4 = format_by_name("NVFP4");
  const WeightFormat& a16 = format_by_name("NVFP4A16");
  EXPECT_EQ(nvfp4_scales(w4a4, LayerKind::kLinear, ServingTarget::kHopper), Nvfp4Scales::kMarlin);
  EXPECT_EQ(nvfp4_scales(w4a4, LayerKind::kMoeExperts, ServingTarget::kAmpere),
            Nvfp4Scales::kMarlin);
  EXPECT_EQ(nvfp4_scales(w4a4, LayerKind::kLinear, ServingTarget::kBlackwell),
            Nvfp4Scales::kCompressedTensors);
  EXPECT_EQ(nvfp4_scales(a16, LayerKind::kFusedLinear, ServingTarget::kBlackwell),
            Nvfp4Scales::kMarlin);
  EXPECT_EQ(nvfp4_scales(format_by_name("MXFP4"), LayerKind::kLinear, ServingTarget::kHopper),
            Nvfp4Scales::kCompressedTensors);
  // MXFP4 has E8M0 scales and no global scale: neither Marlin scale caveat applies.
  const ServingBehaviour& mxfp4 = cell("MXFP4", LayerKind::kLinear, ServingTarget::kHopper);
  EXPECT_FALSE(mxfp4.global_scale_bf16);
  EXPECT_FALSE(mxfp4.flushes_subnormal_scales);
}

TEST(ServingModel, BlackwellRunsFp4AndMxfp8AsTheCheckpointCannotSay) {
  EXPECT_EQ(cell("NVFP4", LayerKind::kLinear, ServingTarget::kBlackwell).activations,
            ActivationPath::kQuantized);
  // NVFP4A16 stays weight-only on Blackwell (Marlin), MXFP4A16 is run W4A4 under FlashInfer.
  EXPECT_EQ(cell("NVFP4A16", LayerKind::kLinear, ServingTarget::kBlackwell).activations,
            ActivationPath::kSixteenBit);
  EXPECT_EQ(cell("MXFP4A16", LayerKind::kLinear, ServingTarget::kBlackwell).activations,
            ActivationPath::kQuantized);
  // No MXFP8 weight-only scheme: MXFP8A16 is served exactly as MXFP8, W8A8 on Blackwell.
  for (const LayerKind kind : all_layer_kinds()) {
    for (const ServingTarget target : all_serving_targets()) {
      const ServingBehaviour& a16 = cell("MXFP8A16", kind, target);
      const ServingBehaviour& w8a8 = cell("MXFP8", kind, target);
      EXPECT_EQ(&a16, &w8a8);
    }
  }
  EXPECT_EQ(cell("MXFP8A16", LayerKind::kLinear, ServingTarget::kBlackwell).activations,
            ActivationPath::kQuantized);
}

TEST(ServingModel, Fp8W8A8NeedsSm89) {
  for (const ServingTarget target :
       {ServingTarget::kBlackwell, ServingTarget::kHopper, ServingTarget::kAda}) {
    EXPECT_EQ(cell("FP8_E4M3", LayerKind::kLinear, target).activations, ActivationPath::kQuantized);
  }
  const ServingBehaviour& ampere = cell("FP8_E4M3", LayerKind::kLinear, ServingTarget::kAmpere);
  EXPECT_TRUE(ampere.marlin);
  EXPECT_EQ(ampere.activations, ActivationPath::kSixteenBit);
}

TEST(ServingModel, QuantizedLmHeadIsUnconfirmedButBf16IsNot) {
  for (const ServingTarget target : all_serving_targets()) {
    EXPECT_TRUE(cell("BF16", LayerKind::kLmHead, target).confirmed());
    EXPECT_FALSE(cell("NVFP4", LayerKind::kLmHead, target).confirmed());
    EXPECT_FALSE(cell("INT4_W4A16", LayerKind::kLmHead, target).confirmed());
  }
}

TEST(ServingModel, ParsesTargetNames) {
  for (const ServingTarget target : all_serving_targets()) {
    EXPECT_EQ(parse_serving_target(serving_target_name(target)), target);
  }
  try {
    parse_serving_target("volta");
    FAIL() << "expected pq::Error";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_EQ(message, "unknown serving target 'volta' (known: blackwell, hopper, ada, ampere)");
    EXPECT_EQ(message.find('\n'), std::string::npos);
  }
}

}  // namespace
}  // namespace pq::formats
