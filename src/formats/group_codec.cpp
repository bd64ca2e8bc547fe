#include "formats/group_codec.h"

#include <algorithm>
#include <bit>
#include <cmath>

#include "common/cpu_features.h"
#include "common/error.h"
#include "formats/simd_kernels.h"

namespace pq::formats {
namespace {

// Callers ask these in this order: AVX-512 when the CPU has it, else AVX2, else scalar.
bool use_avx512() {
  return cpu_features().has_avx512_core();
}
bool use_avx2() {
  return cpu_features().has_avx2_fma();
}

// The row kernels of the ISA chosen as above; null selects the scalar loops.
using QuantizeRow = decltype(&simd::quantize_row_avx512);
using DequantizeRow = decltype(&simd::dequantize_row_avx512);
QuantizeRow simd_quantize_row() {
  if (use_avx512()) return simd::quantize_row_avx512;
  if (use_avx2()) return simd::quantize_row_avx2;
  return nullptr;
}
DequantizeRow simd_dequantize_row() {
  if (use_avx512()) return simd::dequantize_row_avx512;
  if (use_avx2()) return simd::dequantize_row_avx2;
  return nullptr;
}

std::uint32_t store_float_scale(io::DType dtype, float scale) {
  switch (dtype) {
    case io::DType::BF16:
      return encode_element(ElementType::BF16, scale);
    case io::DType::F16:
      return encode_element(ElementType::F16, scale);
    default:
      return std::bit_cast<std::uint32_t>(scale);
  }
}

}  // namespace

GroupCodec::GroupCodec(CodeSpec codes, ScaleSpec scale) : codes_(codes), scale_(scale) {
  if (codes_.int_bits > 0) {
    PQ_CHECK(codes_.int_bits <= 8, "GroupCodec: {}-bit integer codes do not fit a byte",
             codes_.int_bits);
    code_max_ = static_cast<float>((1 << (codes_.int_bits - 1)) - 1);
    amax_divisor_ = static_cast<float>((1 << codes_.int_bits) - 1) / 2.0f;
  } else {
    PQ_CHECK(element_info(codes_.element).bits <= 8, "GroupCodec: {} elements are not 8-bit codes",
             element_info(codes_.element).name);
    code_max_ = element_info(codes_.element).max_finite;
    amax_divisor_ = code_max_;
  }
  const int bits = codes_.int_bits > 0 ? codes_.int_bits : element_info(codes_.element).bits;
  for (std::uint32_t c = 0; c < (1u << bits); ++c) {
    code_values_[c] = codes_.int_bits > 0
                          ? static_cast<float>(static_cast<int>(c) - (1 << (codes_.int_bits - 1)))
                          : decode_element(codes_.element, c);
  }
  PQ_CHECK(scale_.kind != ScaleKind::kFloat || scale_.float_dtype == io::DType::F32 ||
               scale_.float_dtype == io::DType::BF16 || scale_.float_dtype == io::DType::F16,
           "GroupCodec: float scales are stored as F32, BF16 or F16, not {}",
           io::dtype_name(scale_.float_dtype));
  PQ_CHECK(scale_.kind != ScaleKind::kE4M3OverGlobal ||
               (std::isfinite(scale_.global_scale) && scale_.global_scale > 0.0f),
           "GroupCodec: global scale {} is not a positive finite number", scale_.global_scale);
  PQ_CHECK(scale_.min_e4m3_scale >= 0x01 && scale_.min_e4m3_scale <= 0x7E,
           "GroupCodec: smallest E4M3 group scale byte {:#04x} is not a positive finite scale",
           scale_.min_e4m3_scale);
}

GroupScale GroupCodec::scale_for_amax(float amax) const {
  switch (scale_.kind) {
    case ScaleKind::kE4M3OverGlobal: {
      // compressed-tensors (quantization/utils/helpers.py calculate_qparams, tensor_group):
      // the stored E4M3 scale is global * amax / 6. A non-zero group never gets scale 0: like
      // modelopt (qtensor/nvfp4_tensor.py, clamp to [2^-9, 448]) we keep at least the smallest
      // subnormal 2^-9 (or the smallest normal under Marlin's rule) so the group's values survive.
      if (amax == 0.0f) return {};
      const float unrounded = scale_.global_scale * (amax / code_max_);
      return scale_from_stored(std::max(encode_element(ElementType::E4M3, unrounded),
                                        std::uint32_t{scale_.min_e4m3_scale}));
    }
    case ScaleKind::kE8M0: {
      // An all-zero group takes the smallest scale; its codes are all zero whatever it is.
      if (amax == 0.0f) return scale_from_stored(0);
      int exponent = floor_log2(amax);
      if (scale_.mx_rule == MxScaleRule::kRoundToPower2 && std::ldexp(amax, -exponent) >= 1.75f) {
        ++exponent;
      }
      return scale_from_stored(e8m0_from_exponent(exponent - floor_log2(code_max_)));
    }
    case ScaleKind::kFloat:
      break;
  }
  // Plain float scale amax / divisor rounded to its stored dtype; codes are computed against the
  // rounded value. A scale that is 0 (all-zero group, or underflow) is stored as 1: every code
  // of such a group rounds to 0 against it.
  const GroupScale rounded =
      scale_from_stored(store_float_scale(scale_.float_dtype, amax / amax_divisor_));
  if (rounded.step == 0.0f) return scale_from_stored(store_float_scale(scale_.float_dtype, 1.0f));
  return rounded;
}

GroupScale GroupCodec::scale_from_stored(std::uint32_t stored) const {
  switch (scale_.kind) {
    case ScaleKind::kE4M3OverGlobal:
      PQ_CHECK(stored <= 0x7E, "NVFP4 group scale byte {:#04x} is negative or NaN", stored);
      return {stored, decode_element(ElementType::E4M3, stored) / scale_.global_scale};
    case ScaleKind::kE8M0:
      PQ_CHECK(stored < kE8M0Nan, "E8M0 scale byte {:#04x} is not a finite scale", stored);
      return {stored, decode_e8m0(static_cast<std::uint8_t>(stored))};
    case ScaleKind::kFloat:
      break;
  }
  float step = 0.0f;
  switch (scale_.float_dtype) {
    case io::DType::BF16:
      step = decode_element(ElementType::BF16, stored);
      break;
    case io::DType::F16:
      step = decode_element(ElementType::F16, stored);
      break;
    default:
      step = std::bit_cast<float>(stored);
  }
  PQ_CHECK(std::isfinite(step) && step >= 0.0f, "scale {} is not a non-negative finite number",
           step);
  return {stored, step};
}

std::vector<GroupScale> GroupCodec::candidate_scales(float amax, int count, float lo,
                                                     float hi) const {
  PQ_CHECK(count >= 1 && lo > 0.0f && lo <= hi, "candidate_scales: need count >= 1, 0 < lo <= hi");
  std::vector<GroupScale> out;
  for (int i = 0; i < count; ++i) {
    const float m = count == 1 ? lo : lo + (hi - lo) * static_cast<float>(i) / (count - 1);
    out.push_back(scale_for_amax(amax * m));
  }
  std::sort(out.begin(), out.end(),
            [](const GroupScale& a, const GroupScale& b) { return a.step < b.step; });
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

std::uint8_t GroupCodec::quantize(float x, const GroupScale& scale) const {
  if (codes_.int_bits > 0) {
    const int offset = 1 << (codes_.int_bits - 1);
    if (scale.step == 0.0f) return static_cast<std::uint8_t>(offset);
    // NaN -> the zero code; otherwise clamp to the code range and round to nearest even.
    const float scaled = x / scale.step;
    const float clamped =
        std::isnan(scaled) ? 0.0f : std::clamp(scaled, -static_cast<float>(offset), code_max_);
    return static_cast<std::uint8_t>(static_cast<int>(std::nearbyint(clamped)) + offset);
  }
  if (scale.step == 0.0f) return 0;
  return static_cast<std::uint8_t>(encode_element(codes_.element, x / scale.step));
}

float GroupCodec::dequantize(std::uint8_t code, const GroupScale& scale) const {
  return code_values_[code] * scale.step;
}

void GroupCodec::quantize_group(std::span<const float> x, const GroupScale& scale,
                                std::span<std::uint8_t> codes, std::span<float> dequantized) const {
  PQ_CHECK(codes.size() == x.size() && (dequantized.empty() || dequantized.size() == x.size()),
           "quantize_group: {} values, {} codes, {} outputs", x.size(), codes.size(),
           dequantized.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    codes[i] = quantize(x[i], scale);
    if (!dequantized.empty()) dequantized[i] = dequantize(codes[i], scale);
  }
}

void GroupCodec::dequantize_group(std::span<const std::uint8_t> codes, const GroupScale& scale,
                                  std::span<float> out) const {
  PQ_CHECK(codes.size() == out.size(), "dequantize_group: {} codes, {} outputs", codes.size(),
           out.size());
  for (std::size_t i = 0; i < codes.size(); ++i) out[i] = dequantize(codes[i], scale);
}

std::uint32_t max_abs_bits(std::span<const float> x) {
  if (use_avx512()) return simd::max_abs_bits_avx512(x);
  if (use_avx2()) return simd::max_abs_bits_avx2(x);
  std::uint32_t m = 0;
  for (float v : x) m = std::max(m, std::bit_cast<std::uint32_t>(v) & 0x7FFFFFFFu);
  return m;
}

void quantize_rows(const GroupCodec& codec, const RowsJob& job) {
  const std::int64_t cols = job.cols;
  const std::int64_t g = job.group_size;
  PQ_CHECK(cols > 0 && g > 0 && cols % g == 0, "quantize_rows: {} columns in groups of {}", cols,
           g);
  PQ_CHECK(job.weights.size() % cols == 0, "quantize_rows: {} values are not rows of {}",
           job.weights.size(), cols);
  const std::int64_t rows = static_cast<std::int64_t>(job.weights.size()) / cols;
  const std::int64_t groups = cols / g;
  PQ_CHECK(job.scales.size() == static_cast<std::size_t>(rows * groups),
           "quantize_rows: {} scales for {} groups", job.scales.size(), rows * groups);
  PQ_CHECK(job.codes.empty() || job.codes.size() == job.weights.size(),
           "quantize_rows: {} codes for {} values", job.codes.size(), job.weights.size());
  PQ_CHECK(job.dequantized.empty() || job.dequantized.size() == job.weights.size(),
           "quantize_rows: {} outputs for {} values", job.dequantized.size(), job.weights.size());
  const QuantizeRow simd_row = simd_quantize_row();
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* x = job.weights.data() + r * cols;
    GroupScale* scales = job.scales.data() + r * groups;
    std::uint8_t* codes = job.codes.empty() ? nullptr : job.codes.data() + r * cols;
    float* deq = job.dequantized.empty() ? nullptr : job.dequantized.data() + r * cols;
    if (!job.scales_given) {
      const std::uint32_t row_max = max_abs_bits({x, static_cast<std::size_t>(cols)});
      PQ_CHECK(row_max < 0x7F800000u, "cannot quantize row {}: it holds Inf or NaN", r);
    }
    if (simd_row) {
      simd_row(codec, x, cols, g, job.scales_given, scales, codes, deq);
      continue;
    }
    for (std::int64_t gi = 0; gi < groups; ++gi) {
      const std::span<const float> group(x + gi * g, static_cast<std::size_t>(g));
      if (!job.scales_given) {
        scales[gi] = codec.scale_for_amax(std::bit_cast<float>(max_abs_bits(group)));
      }
      for (std::int64_t i = 0; i < g; ++i) {
        const std::uint8_t code = codec.quantize(group[i], scales[gi]);
        if (codes) codes[gi * g + i] = code;
        if (deq) deq[gi * g + i] = codec.dequantize(code, scales[gi]);
      }
    }
  }
}

void quantize_with_steps(const GroupCodec& codec, std::span<const float> x,
                         std::span<const float> steps, std::span<std::uint8_t> codes,
                         std::span<float> dequantized) {
  PQ_CHECK(steps.size() == x.size() && codes.size() == x.size() && dequantized.size() == x.size(),
           "quantize_with_steps: {} values, {} steps, {} codes, {} outputs", x.size(), steps.size(),
           codes.size(), dequantized.size());
  // Every AVX-512 CPU has AVX2 and FMA: one vector path serves both.
  if (use_avx2()) {
    return simd::quantize_with_steps_avx2(codec, x.data(), steps.data(),
                                          static_cast<std::int64_t>(x.size()), codes.data(),
                                          dequantized.data());
  }
  for (std::size_t i = 0; i < x.size(); ++i) {
    const GroupScale scale{0, steps[i]};
    codes[i] = codec.quantize(x[i], scale);
    dequantized[i] = codec.dequantize(codes[i], scale);
  }
}

void dequantize_rows(const GroupCodec& codec, std::span<const std::uint8_t> codes,
                     std::span<const GroupScale> scales, std::int64_t cols, std::int64_t group_size,
                     std::span<float> out) {
  PQ_CHECK(cols > 0 && group_size > 0 && cols % group_size == 0 && codes.size() % cols == 0 &&
               out.size() == codes.size() &&
               scales.size() == codes.size() / static_cast<std::size_t>(group_size),
           "dequantize_rows: {} codes, {} scales, {} outputs, {} columns in groups of {}",
           codes.size(), scales.size(), out.size(), cols, group_size);
  const std::int64_t rows = static_cast<std::int64_t>(codes.size()) / cols;
  const std::int64_t groups = cols / group_size;
  const DequantizeRow simd_row = simd_dequantize_row();
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::uint8_t* row_codes = codes.data() + r * cols;
    const GroupScale* row_scales = scales.data() + r * groups;
    float* row_out = out.data() + r * cols;
    if (simd_row) {
      simd_row(codec, row_codes, row_scales, cols, group_size, row_out);
      continue;
    }
    for (std::int64_t i = 0; i < cols; ++i) {
      row_out[i] = codec.dequantize(row_codes[i], row_scales[i / group_size]);
    }
  }
}

}  // namespace pq::formats
