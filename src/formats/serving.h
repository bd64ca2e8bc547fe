#pragma once

#include <span>
#include <string_view>

#include "common/layer_kind.h"
#include "formats/weight_format.h"

namespace pq::formats {

// What stock vLLM does with a compressed-tensors scheme is not always what the scheme says: on
// GPUs without FP4 tensor cores FP4 weights run through Marlin with 16-bit activations, MXFP4A16
// runs W4A4 where FlashInfer is present, FP8 weight-only experts do not load at all. This is that
// serving model as data, one cell per (exportable format, layer kind, target), each citing the
// vLLM file it was read from (docs/formats.md "Serving model" lists the versions).

// A GPU generation; vLLM selects kernels by compute capability.
enum class ServingTarget {
  kBlackwell,  // sm100 (B200/GB200) and sm120 (RTX 50 / RTX PRO 6000)
  kHopper,     // sm90 (H100/H200)
  kAda,        // sm89 (L40S, RTX 40): FP8 tensor cores, no FP4
  kAmpere,     // sm80/sm86 (A100, A10, RTX 30): neither FP8 nor FP4 tensor cores
};

using LayerKind = pq::LayerKind;

// How activations reach the GEMM.
enum class ActivationPath {
  kNotLoaded,   // vLLM refuses the checkpoint: the cell describes no execution
  kSixteenBit,  // weight-only: activations stay BF16/FP16 whatever the checkpoint says
  kQuantized,   // true low precision: activations quantized at run time (W4A4, W8A8)
};

struct ServingBehaviour {
  bool loads = false;
  ActivationPath activations = ActivationPath::kNotLoaded;
  // The kernel family vLLM picks (e.g. "Marlin FP4 (weight-only)", "CUTLASS FP4 W4A4").
  std::string_view kernel = {};
  bool marlin = false;
  // NVFP4 under Marlin: the FP32 global scale is cast to the model dtype (BF16) before use.
  bool global_scale_bf16 = false;
  // NVFP4 under Marlin: E4M3 group scales in the subnormal range decode to about zero.
  bool flushes_subnormal_scales = false;
  // Minimum vLLM / compressed-tensors versions where known, else empty.
  std::string_view min_versions = {};
  // The vLLM file (and function) the cell was read from.
  std::string_view source = {};
  // What else matters (fused-shard rules, sm120 vs sm100, load errors).
  std::string_view note = {};
  // What in this cell could not be confirmed from the sources; empty when all of it was.
  std::string_view unconfirmed = {};

  bool confirmed() const { return unconfirmed.empty(); }
};

std::span<const ServingTarget> all_serving_targets();
std::span<const LayerKind> all_layer_kinds();
std::string_view serving_target_name(ServingTarget target);  // "blackwell", "hopper", ...
std::string_view layer_kind_name(LayerKind kind);            // "linear", "fused_linear", ...
std::string_view activation_path_name(ActivationPath path);  // "not_loaded", "16bit", ...

// Throws pq::Error (one line, listing the known names) for an unknown target.
ServingTarget parse_serving_target(std::string_view name);

// Whether stock vLLM on `target` loads `format` for a Linear of `kind`: the format is exportable
// and its cell loads.
bool serves(const WeightFormat& format, LayerKind kind, ServingTarget target);

// The format whose activation quantization vLLM runs when it serves `format` with quantized
// activations: the format itself, or the W-A twin of a weight-only MX format that vLLM serves
// exactly like it (MXFP4A16 -> MXFP4, MXFP8A16 -> MXFP8: one scheme each, whose
// input_activations vLLM does not read; the MX rows of the table cite the files).
const WeightFormat& served_activation_format(const WeightFormat& format);

// What stock vLLM does with `format` on `kind` on `target`. Throws pq::Error for a format that
// is not exportable (research only: there is nothing for vLLM to load).
const ServingBehaviour& serving_behaviour(const WeightFormat& format, LayerKind kind,
                                          ServingTarget target);

// The NVFP4 scale rule for `format` on `kind` on `target`: kMarlin where vLLM serves it through
// Marlin (its cell's flushes_subnormal_scales), else kCompressedTensors (also for every format
// without E4M3 group scales, where the rule is unused).
Nvfp4Scales nvfp4_scales(const WeightFormat& format, LayerKind kind, ServingTarget target);

}  // namespace pq::formats
