// The serving model: what stock vLLM does with each exportable format's compressed-tensors
// scheme. Read from vllm-project/vllm sources (paths below are under vllm/model_executor/; the
// commits are listed in docs/formats.md "Serving model"). Facts only; no vLLM code.

#include "formats/serving.h"

#include <algorithm>
#include <array>
#include <string>
#include <vector>

#include "common/error.h"

namespace pq::formats {
namespace {

constexpr std::array kTargets = {ServingTarget::kBlackwell, ServingTarget::kHopper,
                                 ServingTarget::kAda, ServingTarget::kAmpere};
constexpr std::array kLayerKinds = {LayerKind::kLinear, LayerKind::kFusedLinear,
                                    LayerKind::kMoeExperts, LayerKind::kLmHead};

constexpr unsigned bit(ServingTarget t) {
  return 1u << static_cast<unsigned>(t);
}
constexpr unsigned bit(LayerKind k) {
  return 1u << static_cast<unsigned>(k);
}

constexpr unsigned kBlackwell = bit(ServingTarget::kBlackwell);
constexpr unsigned kBelowSm100 =
    bit(ServingTarget::kHopper) | bit(ServingTarget::kAda) | bit(ServingTarget::kAmpere);
constexpr unsigned kFp8TensorCores =
    bit(ServingTarget::kBlackwell) | bit(ServingTarget::kHopper) | bit(ServingTarget::kAda);
constexpr unsigned kAmpere = bit(ServingTarget::kAmpere);
constexpr unsigned kEveryTarget = kBlackwell | kBelowSm100;

constexpr unsigned kDense = bit(LayerKind::kLinear) | bit(LayerKind::kFusedLinear);
constexpr unsigned kExperts = bit(LayerKind::kMoeExperts);
constexpr unsigned kLmHead = bit(LayerKind::kLmHead);
constexpr unsigned kEveryLayer = kDense | kExperts | kLmHead;

// ParallelLMHead: the newest get_quant_method (vLLM docs "latest", 2026-09-24) sends it through
// get_scheme like a Linear; the older compressed_tensors.py versions read return no method for
// it, so the head stays unquantized and a quantized head's tensors have nowhere to load.
constexpr std::string_view kLmHeadSource =
    "layers/quantization/compressed_tensors/compressed_tensors.py::get_quant_method "
    "(ParallelLMHead branch -> get_scheme)";
constexpr std::string_view kLmHeadUnconfirmed =
    "quantized lm_head: only the newest get_quant_method (docs 'latest' 2026-09-24) routes "
    "ParallelLMHead through get_scheme; the release that added it is not established and older "
    "releases leave the head unquantized, so its packed tensors do not load";
constexpr std::string_view kScaleDtypeVersions =
    "compressed-tensors >= 0.13 for the scale_dtype key (issue 12); vLLM: unknown";

constexpr std::string_view kNvfp4Marlin = "Marlin FP4 (weight-only)";
constexpr std::string_view kNvfp4MarlinSource =
    "kernels/linear/__init__.py::_POSSIBLE_NVFP4_KERNELS (no CUTLASS/FlashInfer FP4 below "
    "sm100, Marlin next); layers/quantization/utils/marlin_utils_fp4.py::"
    "nvfp4_marlin_process_global_scale (global scale in half/bf16), nvfp4_marlin_process_scales "
    "(scale * 2^7 as an S0E5M3 byte); csrc/quantization/gptq_marlin/dequant.h::"
    "dequant_fp8_scales (a scale below 2^-6 reads as 2^-112 times itself)";
constexpr std::string_view kNvfp4A16Source =
    "compressed_tensors.py::_get_scheme_from_parts (NVFP4 weights, no input_activations -> "
    "CompressedTensorsW4A4Fp4(use_a16=True)); schemes/compressed_tensors_w4a16_nvfp4.py "
    "(always Marlin); marlin_utils_fp4.py::nvfp4_marlin_process_global_scale";
constexpr std::string_view kNvfp4FusedNote =
    "fused shards: vLLM takes the max of the shards' weight_global_scale, so they must share one";
constexpr std::string_view kMxfp4Source =
    "compressed_tensors.py::_get_scheme_from_parts (_is_mxfp4 -> CompressedTensorsW4A4Mxfp4 for "
    "MXFP4 and MXFP4A16 alike); schemes/compressed_tensors_w4a4_mxfp4.py (W4A4 on sm100 with "
    "FlashInfer, else Marlin); kernels/linear/mxfp4/flashinfer.py::is_supported";
constexpr std::string_view kMxfp8Source =
    "compressed_tensors.py::_get_scheme_from_parts (_is_mxfp8 -> CompressedTensorsW8A8Mxfp8 "
    "whatever input_activations say); kernels/linear/__init__.py::_POSSIBLE_MXFP8_KERNELS "
    "(FlashInferCutlass, Marlin, Emulation); kernels/linear/mxfp8/marlin.py";
constexpr std::string_view kMxfp8Note =
    "no MXFP8 weight-only scheme: MXFP8A16 is served exactly like MXFP8; _is_mxfp8 needs "
    "scale_dtype torch.uint8 in the weights args";
constexpr std::string_view kFp8Source =
    "compressed_tensors.py::_get_scheme_from_parts (_is_fp8_w8a8 -> CompressedTensorsW8A8Fp8 "
    "where capability >= its minimum 89, else CompressedTensorsW8A16Fp8)";
constexpr std::string_view kFp8MoeSource =
    "compressed_tensors_moe/compressed_tensors_moe.py::get_moe_method (_is_fp8_w8a8 -> "
    "CompressedTensorsW8A8Fp8MoEMethod)";
constexpr std::string_view kFp8MoeUnconfirmed =
    "the FP8 MoE backend per GPU (fused_moe/oracle/fp8.py) was not read";
constexpr std::string_view kWna16Source =
    "compressed_tensors.py::_get_scheme_from_parts (_is_wNa16_group_channel and format "
    "pack-quantized -> CompressedTensorsWNA16); kernels/linear/__init__.py::_POSSIBLE_KERNELS";

// One row covers every (format, layer kind, target) it names; exactly one row covers each cell of
// an exportable format (tests/formats/serving_test.cpp checks there are no gaps or overlaps).
struct Row {
  std::string_view formats;  // space-separated registry names
  unsigned layers;
  unsigned targets;
  ServingBehaviour behaviour;
};

// clang-format off
const std::array kTable = {
    // NVFP4 (W4A4)
    Row{"NVFP4", kDense, kBlackwell,
        {.loads = true, .activations = ActivationPath::kQuantized,
         .kernel = "FlashInfer / CUTLASS FP4 GEMM (W4A4, activations quantized per 16)",
         .min_versions = kScaleDtypeVersions,
         .source = "compressed_tensors.py::_get_scheme_from_parts -> CompressedTensorsW4A4Fp4; "
                   "kernels/linear/__init__.py::_POSSIBLE_NVFP4_KERNELS; "
                   "kernels/linear/nvfp4/cutlass.py (scaled_fp4_quant of the input)",
         .note = kNvfp4FusedNote}},
    Row{"NVFP4", kDense, kBelowSm100,
        {.loads = true, .activations = ActivationPath::kSixteenBit, .kernel = kNvfp4Marlin,
         .marlin = true, .global_scale_bf16 = true, .flushes_subnormal_scales = true,
         .min_versions = kScaleDtypeVersions, .source = kNvfp4MarlinSource,
         .note = "input_global_scale is loaded but unused: activations are not quantized"}},
    Row{"NVFP4", kExperts, kBlackwell,
        {.loads = true, .activations = ActivationPath::kQuantized,
         .kernel = "FlashInfer / CUTLASS NVFP4 MoE (W4A4)", .min_versions = kScaleDtypeVersions,
         .source = "compressed_tensors_moe/compressed_tensors_moe.py::get_moe_method -> "
                   "CompressedTensorsW4A4Nvfp4MoEMethod (select_nvfp4_moe_backend, activation "
                   "kNvfp4Dynamic)",
         .unconfirmed = "the backend order of fused_moe/oracle/nvfp4.py was not read"}},
    Row{"NVFP4", kExperts, kBelowSm100,
        {.loads = true, .activations = ActivationPath::kSixteenBit,
         .kernel = "Marlin NVFP4 MoE (weight-only)", .marlin = true, .global_scale_bf16 = true,
         .flushes_subnormal_scales = true, .min_versions = kScaleDtypeVersions,
         .source = "compressed_tensors_moe/compressed_tensors_moe.py::get_moe_method -> "
                   "CompressedTensorsW4A4Nvfp4MoEMethod; marlin_utils_fp4.py "
                   "(prepare_nvfp4_moe_weights_for_marlin)",
         .unconfirmed = "fused_moe/oracle/nvfp4.py (Marlin as the sub-sm100 backend) was not "
                        "read"}},
    Row{"NVFP4", kLmHead, kBlackwell,
        {.loads = true, .activations = ActivationPath::kQuantized,
         .kernel = "as Linear: FlashInfer / CUTLASS FP4 GEMM (W4A4)",
         .min_versions = kScaleDtypeVersions, .source = kLmHeadSource,
         .unconfirmed = kLmHeadUnconfirmed}},
    Row{"NVFP4", kLmHead, kBelowSm100,
        {.loads = true, .activations = ActivationPath::kSixteenBit, .kernel = kNvfp4Marlin,
         .marlin = true, .global_scale_bf16 = true, .flushes_subnormal_scales = true,
         .min_versions = kScaleDtypeVersions, .source = kLmHeadSource,
         .unconfirmed = kLmHeadUnconfirmed}},

    // NVFP4A16: weight-only everywhere, always through Marlin.
    Row{"NVFP4A16", kDense, kEveryTarget,
        {.loads = true, .activations = ActivationPath::kSixteenBit, .kernel = kNvfp4Marlin,
         .marlin = true, .global_scale_bf16 = true, .flushes_subnormal_scales = true,
         .min_versions = kScaleDtypeVersions, .source = kNvfp4A16Source, .note = kNvfp4FusedNote}},
    Row{"NVFP4A16", kExperts, kEveryTarget,
        {.loads = true, .activations = ActivationPath::kSixteenBit,
         .kernel = "Marlin NVFP4 MoE (weight-only)", .marlin = true, .global_scale_bf16 = true,
         .flushes_subnormal_scales = true, .min_versions = kScaleDtypeVersions,
         .source = "compressed_tensors_moe/compressed_tensors_moe.py::get_moe_method -> "
                   "CompressedTensorsW4A4Nvfp4MoEMethod(use_a16=True) (activation key None)",
         .unconfirmed = "the weight-only backend of fused_moe/oracle/nvfp4.py was not read"}},
    Row{"NVFP4A16", kLmHead, kEveryTarget,
        {.loads = true, .activations = ActivationPath::kSixteenBit, .kernel = kNvfp4Marlin,
         .marlin = true, .global_scale_bf16 = true, .flushes_subnormal_scales = true,
         .min_versions = kScaleDtypeVersions, .source = kLmHeadSource,
         .unconfirmed = kLmHeadUnconfirmed}},

    // MXFP4 and MXFP4A16 share one scheme: the checkpoint's input_activations are not read.
    Row{"MXFP4 MXFP4A16", kDense, kBlackwell,
        {.loads = true, .activations = ActivationPath::kQuantized,
         .kernel = "FlashInfer MXFP4 GEMM (W4A4, activations quantized per 32); Marlin "
                   "weight-only without FlashInfer",
         .min_versions = kScaleDtypeVersions, .source = kMxfp4Source,
         .note = "MXFP4A16 is run W4A4 too; sm120: the scheme file gates FlashInfer on the sm100 "
                 "family, the newer kernels/linear/mxfp4/flashinfer.py on >= sm100 with "
                 "FlashInfer cute-dsl"}},
    Row{"MXFP4 MXFP4A16", kDense, kBelowSm100,
        {.loads = true, .activations = ActivationPath::kSixteenBit,
         .kernel = "Marlin FP4 (weight-only, E8M0 scales)", .marlin = true,
         .min_versions = kScaleDtypeVersions,
         .source = "schemes/compressed_tensors_w4a4_mxfp4.py (Marlin below sm100, min "
                   "capability 80); marlin_utils_fp4.py::prepare_fp4_layer_for_marlin",
         .note = "MXFP4: the activation quantization the checkpoint declares is not applied"}},
    Row{"MXFP4 MXFP4A16", kExperts, kBlackwell,
        {.loads = true, .activations = ActivationPath::kQuantized,
         .kernel = "CUTLASS / FlashInfer MXFP4 MoE (W4A4)", .min_versions = kScaleDtypeVersions,
         .source = "compressed_tensors_moe/compressed_tensors_moe.py::get_moe_method -> "
                   "CompressedTensorsW4A4Mxfp4MoEMethod (select_mxfp4_moe_backend, activation "
                   "kMxfp4Dynamic)",
         .unconfirmed = "the backend order of fused_moe/oracle/mxfp4.py was not read"}},
    Row{"MXFP4 MXFP4A16", kExperts, kBelowSm100,
        {.loads = true, .activations = ActivationPath::kSixteenBit,
         .kernel = "Marlin / Triton MXFP4 MoE (weight-only)", .marlin = true,
         .min_versions = kScaleDtypeVersions,
         .source = "compressed_tensors_moe/compressed_tensors_moe.py::get_moe_method -> "
                   "CompressedTensorsW4A4Mxfp4MoEMethod (select_mxfp4_moe_backend)",
         .unconfirmed = "fused_moe/oracle/mxfp4.py was not read: which weight-only backend "
                        "(Marlin or Triton) runs below sm100, and whether sm80 has one"}},
    Row{"MXFP4 MXFP4A16", kLmHead, kBlackwell,
        {.loads = true, .activations = ActivationPath::kQuantized,
         .kernel = "as Linear: FlashInfer MXFP4 GEMM (W4A4)", .min_versions = kScaleDtypeVersions,
         .source = kLmHeadSource, .unconfirmed = kLmHeadUnconfirmed}},
    Row{"MXFP4 MXFP4A16", kLmHead, kBelowSm100,
        {.loads = true, .activations = ActivationPath::kSixteenBit,
         .kernel = "as Linear: Marlin FP4 (weight-only)", .marlin = true,
         .min_versions = kScaleDtypeVersions, .source = kLmHeadSource,
         .unconfirmed = kLmHeadUnconfirmed}},

    // MXFP8 and MXFP8A16 share one scheme.
    Row{"MXFP8 MXFP8A16", kDense, kBlackwell,
        {.loads = true, .activations = ActivationPath::kQuantized,
         .kernel = "FlashInfer CUTLASS MXFP8 GEMM (W8A8, activations quantized per 32)",
         .min_versions = kScaleDtypeVersions, .source = kMxfp8Source, .note = kMxfp8Note,
         .unconfirmed = "FlashInferCutlassMxfp8LinearKernel.is_supported (sm100 and sm120?) was "
                        "not read"}},
    Row{"MXFP8 MXFP8A16", kDense, kBelowSm100,
        {.loads = true, .activations = ActivationPath::kSixteenBit,
         .kernel = "Marlin MXFP8 (W8A16, weight-only)", .marlin = true,
         .min_versions = kScaleDtypeVersions, .source = kMxfp8Source,
         .note = "MXFP8: the activation quantization the checkpoint declares is not applied",
         .unconfirmed = "the release that added MarlinMxfp8LinearKernel is not established; "
                        "before it nothing below sm100 could run the scheme"}},
    Row{"MXFP8 MXFP8A16", kExperts, kBlackwell,
        {.loads = true, .activations = ActivationPath::kQuantized,
         .kernel = "FlashInfer TRT-LLM MXFP8 MoE (W8A8)", .min_versions = kScaleDtypeVersions,
         .source = "compressed_tensors_moe/compressed_tensors_moe_w8a8_mxfp8.py "
                   "(CompressedTensorsW8A8Mxfp8MoEMethod: FlashInfer TRT-LLM or Marlin, "
                   "select_mxfp8_moe_backend)",
         .note = kMxfp8Note,
         .unconfirmed = "the per-GPU choice of fused_moe/oracle/mxfp8.py was not read"}},
    Row{"MXFP8 MXFP8A16", kExperts, kBelowSm100,
        {.loads = true, .activations = ActivationPath::kSixteenBit,
         .kernel = "Marlin MXFP8 MoE (weight-only)", .marlin = true,
         .min_versions = kScaleDtypeVersions,
         .source = "compressed_tensors_moe/compressed_tensors_moe_w8a8_mxfp8.py "
                   "(CompressedTensorsW8A8Mxfp8MoEMethod: FlashInfer TRT-LLM or Marlin)",
         .unconfirmed = "the per-GPU choice of fused_moe/oracle/mxfp8.py was not read"}},
    Row{"MXFP8 MXFP8A16", kLmHead, kBlackwell,
        {.loads = true, .activations = ActivationPath::kQuantized,
         .kernel = "as Linear: FlashInfer CUTLASS MXFP8 GEMM (W8A8)",
         .min_versions = kScaleDtypeVersions, .source = kLmHeadSource,
         .unconfirmed = kLmHeadUnconfirmed}},
    Row{"MXFP8 MXFP8A16", kLmHead, kBelowSm100,
        {.loads = true, .activations = ActivationPath::kSixteenBit,
         .kernel = "as Linear: Marlin MXFP8 (W8A16)", .marlin = true,
         .min_versions = kScaleDtypeVersions, .source = kLmHeadSource,
         .unconfirmed = kLmHeadUnconfirmed}},

    // FP8 W8A8: channel or tensor weights, dynamic per-token activations.
    Row{"FP8_E4M3 FP8_E4M3_TENSOR", kDense, kFp8TensorCores,
        {.loads = true, .activations = ActivationPath::kQuantized,
         .kernel = "CUTLASS / FlashInfer FP8 scaled_mm (W8A8, per-token activations)",
         .source = kFp8Source,
         .note = "fused shards with per-tensor scales are requantized to their max scale "
                 "(requantize_with_max_scale)"}},
    Row{"FP8_BLOCK FP8_SOURCE", kDense, kFp8TensorCores,
        {.loads = true, .activations = ActivationPath::kQuantized,
         .kernel = "block FP8 GEMM (W8A8, activations per 1x128 group): DeepGEMM / CUTLASS / "
                   "Triton",
         .source = kFp8Source}},
    Row{"FP8_E4M3 FP8_E4M3_TENSOR FP8_BLOCK FP8_SOURCE", kDense, kAmpere,
        {.loads = true, .activations = ActivationPath::kSixteenBit,
         .kernel = "Marlin FP8 (CompressedTensorsW8A16Fp8, weight-only)", .marlin = true,
         .source = kFp8Source,
         .note = "the checkpoint's activation quantization is ignored below sm89",
         .unconfirmed = "FP8_BLOCK/FP8_SOURCE: Marlin FP8 with 128x128 block scales was not "
                        "checked in marlin_utils_fp8.py"}},
    Row{"FP8_E4M3 FP8_E4M3_TENSOR FP8_BLOCK FP8_SOURCE", kExperts, kFp8TensorCores,
        {.loads = true, .activations = ActivationPath::kQuantized,
         .kernel = "FP8 fused MoE (W8A8): Triton / CUTLASS / DeepGEMM / FlashInfer",
         .source = kFp8MoeSource, .unconfirmed = kFp8MoeUnconfirmed}},
    Row{"FP8_E4M3 FP8_E4M3_TENSOR FP8_BLOCK FP8_SOURCE", kExperts, kAmpere,
        {.loads = true, .activations = ActivationPath::kSixteenBit,
         .kernel = "Marlin FP8 MoE (weight-only)", .marlin = true, .source = kFp8MoeSource,
         .unconfirmed = kFp8MoeUnconfirmed}},
    Row{"FP8_E4M3 FP8_E4M3_TENSOR FP8_BLOCK FP8_SOURCE", kLmHead, kFp8TensorCores,
        {.loads = true, .activations = ActivationPath::kQuantized,
         .kernel = "as Linear: FP8 scaled_mm (W8A8)", .source = kLmHeadSource,
         .unconfirmed = kLmHeadUnconfirmed}},
    Row{"FP8_E4M3 FP8_E4M3_TENSOR FP8_BLOCK FP8_SOURCE", kLmHead, kAmpere,
        {.loads = true, .activations = ActivationPath::kSixteenBit,
         .kernel = "as Linear: Marlin FP8 (weight-only)", .marlin = true,
         .source = kLmHeadSource, .unconfirmed = kLmHeadUnconfirmed}},

    // FP8_E4M3A16 (naive-quantized, no input_activations).
    Row{"FP8_E4M3A16", kDense, kEveryTarget,
        {.loads = true, .activations = ActivationPath::kSixteenBit,
         .kernel = "Marlin FP8 (CompressedTensorsW8A16Fp8, weight-only)", .marlin = true,
         .source = "compressed_tensors.py::_get_scheme_from_parts (naive-quantized is an "
                   "activation format; _is_fp8_w8a8 needs input_activations, _is_fp8_w8a16 -> "
                   "CompressedTensorsW8A16Fp8)"}},
    Row{"FP8_E4M3A16", kExperts, kEveryTarget,
        {.loads = false, .activations = ActivationPath::kNotLoaded,
         .source = "compressed_tensors_moe/compressed_tensors_moe.py::get_moe_method "
                   "(_is_wNa16_group_channel, format not pack-quantized)",
         .note = "ValueError: For Fused MoE layers, only format 'pack-quantized' and bits "
                 "[4, 8] are supported"}},
    Row{"FP8_E4M3A16", kLmHead, kEveryTarget,
        {.loads = true, .activations = ActivationPath::kSixteenBit,
         .kernel = "as Linear: Marlin FP8 (weight-only)", .marlin = true,
         .source = kLmHeadSource, .unconfirmed = kLmHeadUnconfirmed}},

    // INT4_W4A16 / INT8_W8A16 (pack-quantized).
    Row{"INT4_W4A16 INT8_W8A16", kDense, kEveryTarget,
        {.loads = true, .activations = ActivationPath::kSixteenBit,
         .kernel = "WNA16 mixed-precision GEMM (weight-only): Machete (sm90) / AllSpark / Marlin",
         .marlin = true, .source = kWna16Source,
         .unconfirmed = "which of Machete, AllSpark and Marlin can_implement picks per GPU was "
                        "not read (all are weight-only)"}},
    Row{"INT4_W4A16 INT8_W8A16", kExperts, kEveryTarget,
        {.loads = true, .activations = ActivationPath::kSixteenBit,
         .kernel = "Marlin WNA16 MoE (weight-only)", .marlin = true,
         .source = "compressed_tensors_moe/compressed_tensors_moe.py::get_moe_method "
                   "(pack-quantized, bits 4/8 -> CompressedTensorsWNA16MarlinMoEMethod)"}},
    Row{"INT4_W4A16 INT8_W8A16", kLmHead, kEveryTarget,
        {.loads = true, .activations = ActivationPath::kSixteenBit,
         .kernel = "as Linear: WNA16 GEMM (weight-only)", .marlin = true,
         .source = kLmHeadSource, .unconfirmed = kLmHeadUnconfirmed}},

    // BF16: listed in `ignore`.
    Row{"BF16", kEveryLayer, kEveryTarget,
        {.loads = true, .activations = ActivationPath::kSixteenBit,
         .kernel = "unquantized (UnquantizedLinearMethod / UnquantizedFusedMoEMethod)",
         .source = "compressed_tensors.py::get_scheme_dict (should_ignore_layer -> None); "
                   "compressed_tensors_moe/compressed_tensors_moe.py::get_moe_method "
                   "(scheme_dict None -> UnquantizedFusedMoEMethod)",
         .note = "fused shards must all be ignored or none (should_ignore_layer raises)"}},
};
// clang-format on

// The registry names of a row, split at spaces.
std::vector<std::string_view> row_formats(std::string_view formats) {
  std::vector<std::string_view> names;
  while (!formats.empty()) {
    const auto space = formats.find(' ');
    names.push_back(formats.substr(0, space));
    formats.remove_prefix(space == std::string_view::npos ? formats.size() : space + 1);
  }
  return names;
}

bool names_format(std::string_view formats, std::string_view name) {
  const auto names = row_formats(formats);
  return std::ranges::find(names, name) != names.end();
}

}  // namespace

std::span<const ServingTarget> all_serving_targets() {
  return kTargets;
}

std::span<const LayerKind> all_layer_kinds() {
  return kLayerKinds;
}

std::string_view serving_target_name(ServingTarget target) {
  switch (target) {
    case ServingTarget::kBlackwell:
      return "blackwell";
    case ServingTarget::kHopper:
      return "hopper";
    case ServingTarget::kAda:
      return "ada";
    case ServingTarget::kAmpere:
      return "ampere";
  }
  fail("internal: serving target {}", static_cast<int>(target));
}

std::string_view layer_kind_name(LayerKind kind) {
  switch (kind) {
    case LayerKind::kLinear:
      return "linear";
    case LayerKind::kFusedLinear:
      return "fused_linear";
    case LayerKind::kMoeExperts:
      return "moe_experts";
    case LayerKind::kLmHead:
      return "lm_head";
  }
  fail("internal: layer kind {}", static_cast<int>(kind));
}

std::string_view activation_path_name(ActivationPath path) {
  switch (path) {
    case ActivationPath::kNotLoaded:
      return "not_loaded";
    case ActivationPath::kSixteenBit:
      return "16bit";
    case ActivationPath::kQuantized:
      return "quantized";
  }
  fail("internal: activation path {}", static_cast<int>(path));
}

ServingTarget parse_serving_target(std::string_view name) {
  std::string known;
  for (const ServingTarget target : kTargets) {
    if (serving_target_name(target) == name) return target;
    known += known.empty() ? "" : ", ";
    known += serving_target_name(target);
  }
  fail("unknown serving target '{}' (known: {})", name, known);
}

const WeightFormat& served_activation_format(const WeightFormat& format) {
  if (format.name() == "MXFP4A16") return format_by_name("MXFP4");
  if (format.name() == "MXFP8A16") return format_by_name("MXFP8");
  return format;
}

bool serves(const WeightFormat& format, LayerKind kind, ServingTarget target) {
  return format.exportable() && serving_behaviour(format, kind, target).loads;
}

const ServingBehaviour& serving_behaviour(const WeightFormat& format, LayerKind kind,
                                          ServingTarget target) {
  // Every name in the table is a registered, exportable format (a misspelt row would otherwise
  // be silently unused).
  static const bool table_names_known = [] {
    for (const Row& row : kTable) {
      for (const std::string_view name : row_formats(row.formats)) {
        PQ_CHECK(format_by_name(name).exportable(),
                 "internal: serving table names research-only format {}", name);
      }
    }
    return true;
  }();
  (void)table_names_known;
  PQ_CHECK(format.exportable(), "{} is research only: vLLM has no scheme to serve it",
           format.name());
  const ServingBehaviour* found = nullptr;
  for (const Row& row : kTable) {
    if ((row.layers & bit(kind)) == 0 || (row.targets & bit(target)) == 0 ||
        !names_format(row.formats, format.name())) {
      continue;
    }
    PQ_CHECK(found == nullptr, "internal: two serving rows for {} {} on {}", format.name(),
             layer_kind_name(kind), serving_target_name(target));
    found = &row.behaviour;
  }
  PQ_CHECK(found != nullptr, "internal: no serving model for {} {} on {}", format.name(),
           layer_kind_name(kind), serving_target_name(target));
  return *found;
}

Nvfp4Scales nvfp4_scales(const WeightFormat& format, LayerKind kind, ServingTarget target) {
  if (!format.exportable()) return Nvfp4Scales::kCompressedTensors;
  const ServingBehaviour& cell = serving_behaviour(format, kind, target);
  return cell.loads && cell.flushes_subnormal_scales ? Nvfp4Scales::kMarlin
                                                     : Nvfp4Scales::kCompressedTensors;
}

}  // namespace pq::formats
