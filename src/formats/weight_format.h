#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "formats/group_codec.h"
#include "io/dtype.h"

namespace pq::formats {

// A Linear weight [out, in] (row-major, groups run along `in`).
struct Shape2D {
  std::int64_t out = 0;
  std::int64_t in = 0;
  std::int64_t numel() const { return out * in; }
  friend bool operator==(const Shape2D&, const Shape2D&) = default;
};

// One stored tensor, named "<module>.<suffix>" in the checkpoint.
struct TensorSpec {
  std::string suffix;
  io::DType dtype = io::DType::U8;
  std::vector<std::int64_t> shape;
  std::uint64_t byte_size() const;
};

struct EncodedTensor {
  TensorSpec spec;
  std::vector<std::uint8_t> bytes;  // little-endian, row-major: exactly what safetensors holds
};

// What a format writes for one Linear, in the order compressed-tensors writes it.
struct EncodedWeight {
  std::string format;
  Shape2D shape;
  std::vector<EncodedTensor> tensors;

  // Throws pq::Error when the tensor is absent.
  const EncodedTensor& tensor(std::string_view suffix) const;
  std::uint64_t byte_size() const;
};

// The source checkpoint's FP8 block-quantized weight (DeepSeek-V3 / Qwen3-FP8 style: F8_E4M3
// `weight` and `weight_scale_inv` per 128x128 block), for FP8_SOURCE.
struct Fp8SourceWeight {
  std::span<const std::uint8_t> weight;     // F8_E4M3 [out, in]
  io::DType scale_dtype = io::DType::F32;   // F32 or BF16
  std::span<const std::uint8_t> scale_inv;  // [ceil(out/128), ceil(in/128)]
};

// How NVFP4 chooses its scales for the kernel that will serve it.
enum class Nvfp4Scales : std::uint8_t {
  // compressed-tensors' rule: global 448*6/amax(W), so the largest group scale is exactly 448;
  // a non-zero group keeps at least E4M3's smallest subnormal 2^-9.
  kCompressedTensors,
  // vLLM's Marlin kernel (weight-only FP4 below sm100, and NVFP4A16 everywhere) reads the global
  // scale in BF16 and decodes a subnormal group scale as about zero: vLLM
  // csrc/quantization/gptq_marlin/dequant.h dequant_fp8_scales<nv_bfloat162, kFE4M3fn> moves the
  // byte's top bit (set by marlin_utils_fp4.py nvfp4_marlin_process_scales for scales >= 2^-6)
  // onto the BF16 exponent's top bit, so a scale below 2^-6 reads as 2^-112 times its value;
  // newer releases rescale every scale by a power of two instead (_nvfp4_compute_scale_factor),
  // which overflows FP16 for tensors that also have scales near 448. So the global is the largest
  // power of two <= 448*6/amax (exact in BF16 and FP16, and so is its inverse), and a non-zero
  // group keeps at least E4M3's smallest normal 2^-6: every release decodes such scales exactly.
  kMarlin,
};

struct QuantizeOptions {
  // NVFP4: overrides the global scale that `nvfp4_scales` derives from amax(W). Fused siblings
  // (q/k/v, gate/up) must share one value, the one computed from their largest amax (vLLM takes
  // the max; format-facts.md A.3).
  std::optional<float> weight_global_scale;
  Nvfp4Scales nvfp4_scales = Nvfp4Scales::kCompressedTensors;
  // NVFP4 W4A4: 448*6/amax(calibration activations); required, the caller owns calibration.
  std::optional<float> input_global_scale;
  // FP8_SOURCE: the source tensors, kept byte-exact; required by that format only.
  const Fp8SourceWeight* fp8_source = nullptr;
};

// Quantizes activations as the serving kernel does (fake quantization: quantize then dequantize),
// rows of `cols` values, one row per token.
class ActivationQuantizer {
 public:
  virtual ~ActivationQuantizer() = default;
  virtual void fake_quantize(std::span<const float> x, std::int64_t cols,
                             std::span<float> out) const = 0;
};

// The group structure a format quantizes with, for GPTQ and scale sweeps. A scale covers
// `scale_rows` consecutive rows by `group_size` consecutive columns: 1 x 16 (NVFP4), 1 x 32 (MX),
// 1 x 128 (INT4), 1 x in (per-channel FP8, INT8), 128 x 128 (FP8_BLOCK; the last row block may
// be shorter), out x in (FP8_E4M3_TENSOR).
struct GroupLayout {
  GroupCodec codec;
  std::int64_t group_size;      // consecutive input columns sharing a scale
  bool scales_from_group_amax;  // false: per-tensor/per-block scales that span rows
  std::int64_t scale_rows = 1;  // consecutive rows sharing a scale
};

class WeightFormat {
 public:
  virtual ~WeightFormat() = default;

  virtual std::string_view name() const = 0;
  virtual std::string_view summary() const = 0;
  // False for research-only formats with no compressed-tensors format (MXFP6); exporting them is
  // an error, never a silent substitution.
  virtual bool exportable() const = 0;
  // Whether activations are quantized at serving time (W4A4, W8A8) or left in 16 bits.
  virtual bool quantizes_activations() const = 0;

  // Why this format cannot hold (or vLLM cannot serve) a weight of this shape; nullopt if it can.
  virtual std::optional<std::string> rejects(Shape2D shape) const = 0;
  bool accepts(Shape2D shape) const { return !rejects(shape).has_value(); }

  // The tensors quantize() writes, without data.
  virtual std::vector<TensorSpec> tensors(Shape2D shape) const = 0;
  // Every stored byte: codes, scales, global and input scales, weight_shape.
  std::uint64_t bytes(Shape2D shape) const;
  double bits_per_param(Shape2D shape) const;

  // w: row-major f32 [out, in], finite. Throws pq::Error naming the problem (shape, non-finite
  // value, missing option).
  virtual EncodedWeight quantize(std::span<const float> w, Shape2D shape,
                                 const QuantizeOptions& options = {}) const = 0;
  virtual std::vector<float> dequantize(const EncodedWeight& encoded) const = 0;
  // The stored tensors for element codes and group scales chosen by the caller (GPTQ, scale
  // sweeps): quantize() without its rounding step. `codes`: one per element of `shape`,
  // row-major, as GroupCodec::quantize gives them. `scales`: one per (row, group) of
  // group_layout(shape), shape.out * (shape.in / group_size) of them, row-major, as quantize_rows
  // reads them; where a stored scale covers several rows (scale_rows > 1) the entries it covers
  // must be equal. NVFP4 needs options.weight_global_scale (the global scale of the layout the
  // scales were made with) and, for W4A4, options.input_global_scale. dequantize() of the result
  // equals dequantize_rows(codes, scales) bit for bit, and the codes and scales quantize() would
  // choose give quantize()'s bytes. Throws pq::Error for a format without a group layout (BF16,
  // FP8_SOURCE), a shape the format rejects, a size mismatch, a code that is no finite element,
  // or unequal scales under one stored scale.
  virtual EncodedWeight encode_groups(std::span<const std::uint8_t> codes,
                                      std::span<const GroupScale> scales, Shape2D shape,
                                      const QuantizeOptions& options = {}) const;
  // dequantize(quantize(w)) bit for bit, without materialising the packed tensors.
  virtual void fake_quantize(std::span<const float> w, Shape2D shape, std::span<float> out,
                             const QuantizeOptions& options = {}) const;

  // The compressed-tensors config_groups entry without "targets": "format", "weights",
  // "input_activations", "output_activations" (compressed-tensors quantization/quant_scheme.py
  // presets; the exporter adds targets).
  virtual nlohmann::json config_group() const = 0;

  // The serving-time activation quantizer, or null for weight-only formats. NVFP4 W4A4 needs
  // options.input_global_scale.
  virtual std::unique_ptr<ActivationQuantizer> activation_quantizer(
      const QuantizeOptions& options = {}) const;

  // The group codec and grouping, or nullopt (BF16, FP8_SOURCE). NVFP4 reads
  // options.weight_global_scale (default 1) and options.nvfp4_scales.
  virtual std::optional<GroupLayout> group_layout(Shape2D shape,
                                                  const QuantizeOptions& options = {}) const;
};

// NVFP4's per-tensor global scale as compressed-tensors computes it
// (quantization/utils/helpers.py generate_gparam): 448 * 6 / amax, 1 when that is not finite.
float nvfp4_global_scale(float amax);
// The weight global scale `rule` gives for amax(W): nvfp4_global_scale, or under kMarlin the
// largest power of two not above it.
float nvfp4_weight_global_scale(float amax, Nvfp4Scales rule);

// Every registered format, in menu order.
const std::vector<const WeightFormat*>& all_formats();
// Throws pq::Error listing the known names when `name` is unknown.
const WeightFormat& format_by_name(std::string_view name);

}  // namespace pq::formats
