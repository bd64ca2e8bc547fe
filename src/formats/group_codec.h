#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "formats/element.h"
#include "io/dtype.h"

namespace pq::formats {

// How a group's scale is stored.
enum class ScaleKind : std::uint8_t {
  kE4M3OverGlobal,  // NVFP4: FP8 E4M3 group scale, divided by an FP32 per-tensor global scale
  kE8M0,            // MX: a power of two stored as its biased exponent
  kFloat,           // FP8 / INT: a float scale stored as F32, BF16 or F16
};

// How an MX group's shared exponent is derived from the group's largest magnitude amax.
enum class MxScaleRule : std::uint8_t {
  // OCP MX v1.0 §6.3 (microxcaling mx/mx_ops.py `_quantize_mx`, ggml quantize_row_mxfp4_ref):
  // X = 2^(floor(log2(amax)) - emax_elem). Elements above the largest code saturate (clip).
  kOcpFloor,
  // compressed-tensors (quantization/utils/mxfp_utils.py `generate_mx_scales`): amax is first
  // rounded to a power of two by adding a quarter of its binade and truncating the mantissa
  // (`round_to_power_2`), then X = 2^(floor(log2(that)) - emax_elem). Groups whose amax mantissa is
  // >= 1.75 move up one binade, which avoids most clipping.
  kRoundToPower2,
};

// The scale of one group as stored, and the multiplier it stands for.
struct GroupScale {
  std::uint32_t stored = 0;  // E4M3 / E8M0 byte, BF16 / F16 bits, or F32 bits
  float step = 0.0f;         // dequantized element = element value * step; 0: every code is 0
  friend bool operator==(const GroupScale&, const GroupScale&) = default;
};

// The element codes of a format: a minifloat, or a symmetric signed integer of `int_bits` bits
// stored offset-binary (q + 2^(bits-1), as compressed-tensors pack_to_int32 stores it).
struct CodeSpec {
  ElementType element = ElementType::E2M1;
  int int_bits = 0;  // > 0 selects integer codes
};

struct ScaleSpec {
  ScaleKind kind = ScaleKind::kFloat;
  io::DType float_dtype = io::DType::F32;        // kFloat only: F32, BF16 or F16
  MxScaleRule mx_rule = MxScaleRule::kOcpFloor;  // kE8M0 only
  float global_scale = 1.0f;                     // kE4M3OverGlobal only (the stored divisor)
  // kE4M3OverGlobal only: the smallest stored scale byte of a group that is not all zero. 0x01 is
  // E4M3's smallest subnormal 2^-9; 0x08 its smallest normal 2^-6, for vLLM's Marlin kernel,
  // which reads a subnormal group scale as about zero (weight_format.h, Nvfp4Scales).
  std::uint8_t min_e4m3_scale = 0x01;
};

// The per-group numeric core shared by the weight formats, the cost stage, GPTQ and scale
// sweeps. Codes are one per byte here; formats pack them. Every path (scalar, AVX-512, AVX2, row
// or element at a time) gives the same bits.
//
// Rounding of elements: code = round(x / step) in the element type (RNE, saturating), the
// division done in f32; dequantized = value(code) * step in f32.
class GroupCodec {
 public:
  GroupCodec(CodeSpec codes, ScaleSpec scale);

  const CodeSpec& codes() const { return codes_; }
  const ScaleSpec& scale_spec() const { return scale_; }

  // Largest magnitude a code represents (6, 7.5, 28, 448, 57344; 2^(bits-1)-1 for integers).
  float code_max() const { return code_max_; }
  // What amax is divided by to get an unrounded scale: code_max for minifloats; (2^bits-1)/2 for
  // integers, compressed-tensors' symmetric rule (quantization/utils/helpers.py
  // calculate_qparams: scale = amax / ((qmax - qmin) / 2)).
  float amax_divisor() const { return amax_divisor_; }

  // The format's round-to-nearest scale for a group whose largest magnitude is amax (>= 0,
  // finite).
  GroupScale scale_for_amax(float amax) const;
  // A stored scale read back (e.g. from a checkpoint or a sweep).
  GroupScale scale_from_stored(std::uint32_t stored) const;
  // Distinct stored scales for amax * m, m evenly spaced over [lo, hi] (count >= 1 points),
  // ascending by step: the candidates a scale sweep tries.
  std::vector<GroupScale> candidate_scales(float amax, int count, float lo, float hi) const;

  // One element against a given scale (GPTQ quantizes column by column with the group's scale
  // fixed when the group starts).
  std::uint8_t quantize(float x, const GroupScale& scale) const;
  float dequantize(std::uint8_t code, const GroupScale& scale) const;

  // One group against a given scale; `dequantized` may be empty.
  void quantize_group(std::span<const float> x, const GroupScale& scale,
                      std::span<std::uint8_t> codes, std::span<float> dequantized) const;
  void dequantize_group(std::span<const std::uint8_t> codes, const GroupScale& scale,
                        std::span<float> out) const;

 private:
  CodeSpec codes_;
  ScaleSpec scale_;
  float code_max_;
  float amax_divisor_;
  std::array<float, 256> code_values_{};  // the value of each code (before the scale)
};

// Row-major [rows, cols] weights quantized in groups of `group_size` consecutive columns
// (cols % group_size == 0). With scales_given false each group's scale is scale_for_amax(its
// amax) and is written to `scales`; with true, `scales` is read. `codes` and `dequantized` may
// be empty when not wanted. Takes the AVX-512 path when available, else the AVX2 one.
struct RowsJob {
  std::span<const float> weights = {};
  std::int64_t cols = 0;
  std::int64_t group_size = 0;
  bool scales_given = false;
  std::span<GroupScale> scales = {};  // rows * (cols / group_size)
  std::span<std::uint8_t> codes = {};
  std::span<float> dequantized = {};
};
void quantize_rows(const GroupCodec& codec, const RowsJob& job);

// Each x[i] against its own step (GroupScale::step; 0: the zero code): codes and dequantized
// values, as GroupCodec::quantize and dequantize give them. GPTQ quantizes a column of a weight,
// whose rows have different scales, this way.
void quantize_with_steps(const GroupCodec& codec, std::span<const float> x,
                         std::span<const float> steps, std::span<std::uint8_t> codes,
                         std::span<float> dequantized);

// Dequantizes row-major codes with their per-group scales.
void dequantize_rows(const GroupCodec& codec, std::span<const std::uint8_t> codes,
                     std::span<const GroupScale> scales, std::int64_t cols, std::int64_t group_size,
                     std::span<float> out);

// Largest |x| of a span as f32 bits compared as integers (same order as the magnitudes), which
// also reveals non-finite values: the result is >= 0x7F800000 iff some element is Inf or NaN.
std::uint32_t max_abs_bits(std::span<const float> x);

}  // namespace pq::formats
