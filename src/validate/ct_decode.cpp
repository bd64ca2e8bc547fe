// The consumer-side decoder: a compressed-tensors module's stored tensors to f32, written from the
// compressed-tensors rules (format-facts.md A.1, A.2, Part B) and not from prismaquant's formats
// library, so that the two implementations check each other.
#include "validate/ct_decode.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <functional>
#include <numeric>

#include "common/error.h"
#include "io/dtype.h"

namespace pq::validate {
namespace {

// FP4 E2M1 (OCP MX v1.0; compressed-tensors quantization/utils/fp4_utils.py FLOAT_TO_E2M1):
// code = sign << 3 | index, index 0..7 -> 0, 0.5, 1, 1.5, 2, 3, 4, 6.
constexpr std::array<float, 16> kE2M1 = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                         -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// Every E4M3 byte's value (io::f8e4m3_bits_to_f32, exact), looked up per element.
const std::array<float, 256>& e4m3_values() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int b = 0; b < 256; ++b) t[b] = io::f8e4m3_bits_to_f32(static_cast<std::uint8_t>(b));
    return t;
  }();
  return table;
}

// The E2M1 code of column c of a row of FP4 bytes: even columns in the low nibble
// (compressed-tensors compressors/nvfp4/helpers.py unpack_fp4_from_uint8).
std::uint8_t fp4_code(std::span<const std::uint8_t> row, std::int64_t c) {
  const std::uint8_t byte = row[static_cast<std::size_t>(c / 2)];
  return c % 2 == 0 ? byte & 0x0F : byte >> 4;
}

// An E8M0 scale byte: 2^(e - 127); 0xFF is NaN (OCP MX v1.0 §5.4, compressed-tensors
// mx_utils.py).
float e8m0_value(std::uint8_t e, std::string_view tensor) {
  PQ_CHECK(e != 0xFF, "tensor {} holds the E8M0 NaN scale 0xFF", tensor);
  return std::ldexp(1.0f, static_cast<int>(e) - 127);
}

// A float scale tensor (F32, BF16, F16) widened exactly; each must be finite and >= 0.
std::vector<float> float_scales(const StoredTensor& t, std::string_view tensor) {
  std::vector<float> values(t.bytes.size() / io::dtype_size(t.dtype));
  io::decode_to_f32(t.dtype, t.bytes, values);
  for (const float v : values) {
    PQ_CHECK(std::isfinite(v) && v >= 0.0f, "tensor {} holds the scale {}", tensor, v);
  }
  return values;
}

std::int64_t ceil_div(std::int64_t a, std::int64_t b) {
  return (a + b - 1) / b;
}

// The tensor named by suffix, checked against the scheme's expectation.
StoredTensor fetch(const TensorLookup& lookup, const ExpectedTensor& expected) {
  StoredTensor t = lookup(expected.suffix);
  PQ_CHECK(
      std::find(expected.dtypes.begin(), expected.dtypes.end(), t.dtype) != expected.dtypes.end() &&
          t.shape == expected.shape &&
          t.bytes.size() ==
              static_cast<std::size_t>(std::accumulate(t.shape.begin(), t.shape.end(),
                                                       std::int64_t{1}, std::multiplies<>())) *
                  io::dtype_size(t.dtype),
      "tensor {} does not have the dtype and shape its scheme stores", expected.suffix);
  return t;
}

float f32_scalar(const StoredTensor& t) {
  float value = 0.0f;
  std::memcpy(&value, t.bytes.data(), sizeof value);
  return value;
}

}  // namespace

std::vector<float> decode_weight(const Scheme& scheme, std::int64_t out, std::int64_t in,
                                 const TensorLookup& lookup) {
  const std::vector<ExpectedTensor> expected = expected_tensors(scheme, out, in);
  auto tensor = [&](std::string_view suffix) {
    for (const ExpectedTensor& e : expected) {
      if (e.suffix == suffix) return fetch(lookup, e);
    }
    fail("internal: scheme {} has no tensor {}", scheme.group, suffix);
  };
  std::vector<float> w(static_cast<std::size_t>(out * in));
  switch (scheme.layout) {
    case Layout::kNvfp4: {
      const StoredTensor packed = tensor("weight_packed");
      const StoredTensor scales = tensor("weight_scale");
      const float global = f32_scalar(tensor("weight_global_scale"));
      PQ_CHECK(std::isfinite(global) && global > 0.0f, "weight_global_scale {} is not positive",
               global);
      const std::int64_t groups = in / 16;
      for (std::int64_t r = 0; r < out; ++r) {
        const auto row = packed.bytes.subspan(static_cast<std::size_t>(r * in / 2));
        for (std::int64_t g = 0; g < groups; ++g) {
          const std::uint8_t byte = scales.bytes[static_cast<std::size_t>(r * groups + g)];
          PQ_CHECK(byte < 0x7F, "weight_scale byte {:#04x} of row {} is negative or NaN", byte, r);
          const float step = io::f8e4m3_bits_to_f32(byte) / global;
          for (std::int64_t c = g * 16; c < (g + 1) * 16; ++c) {
            w[static_cast<std::size_t>(r * in + c)] = kE2M1[fp4_code(row, c)] * step;
          }
        }
      }
      return w;
    }
    case Layout::kMxfp4:
    case Layout::kMxfp8: {
      const bool fp4 = scheme.layout == Layout::kMxfp4;
      const StoredTensor codes = tensor(fp4 ? "weight_packed" : "weight");
      const StoredTensor scales = tensor("weight_scale");
      const std::int64_t groups = in / 32;
      const std::array<float, 256>& e4m3 = e4m3_values();
      for (std::int64_t r = 0; r < out; ++r) {
        const auto row = codes.bytes.subspan(static_cast<std::size_t>(r * (fp4 ? in / 2 : in)));
        for (std::int64_t g = 0; g < groups; ++g) {
          const float step =
              e8m0_value(scales.bytes[static_cast<std::size_t>(r * groups + g)], "weight_scale");
          for (std::int64_t c = g * 32; c < (g + 1) * 32; ++c) {
            const float element =
                fp4 ? kE2M1[fp4_code(row, c)] : e4m3[row[static_cast<std::size_t>(c)]];
            PQ_CHECK(!std::isnan(element), "weight holds an E4M3 NaN at [{}, {}]", r, c);
            w[static_cast<std::size_t>(r * in + c)] = element * step;
          }
        }
      }
      return w;
    }
    case Layout::kFp8: {
      const StoredTensor codes = tensor("weight");
      const StoredTensor scale_tensor = tensor("weight_scale");
      const std::vector<float> scales = float_scales(scale_tensor, "weight_scale");
      // Which scale covers (r, c): one, one per row, or one per block_structure block.
      std::int64_t block_rows = out, block_cols = in;
      if (scheme.weights.strategy == Strategy::kChannel) block_rows = 1;
      if (scheme.weights.strategy == Strategy::kBlock) {
        block_rows = (*scheme.weights.block_structure)[0];
        block_cols = (*scheme.weights.block_structure)[1];
      }
      const std::int64_t col_blocks = ceil_div(in, block_cols);
      const std::array<float, 256>& e4m3 = e4m3_values();
      for (std::int64_t r = 0; r < out; ++r) {
        const std::uint8_t* row = codes.bytes.data() + r * in;
        for (std::int64_t b = 0; b < col_blocks; ++b) {
          const float scale = scales[static_cast<std::size_t>((r / block_rows) * col_blocks + b)];
          for (std::int64_t c = b * block_cols; c < std::min(in, (b + 1) * block_cols); ++c) {
            const float element = e4m3[row[c]];
            PQ_CHECK(!std::isnan(element), "weight holds an E4M3 NaN at [{}, {}]", r, c);
            w[static_cast<std::size_t>(r * in + c)] = element * scale;
          }
        }
      }
      return w;
    }
    case Layout::kPackedInt:
      break;
  }
  // pack-quantized (compressed-tensors compressors/pack_quantized/helpers.py pack_to_int32 and
  // unpack_from_int32): q + 2^(bits-1) stored unsigned, 32/bits fields per little-endian int32,
  // LSB first; weight_shape records [out, in].
  const StoredTensor shape_tensor = tensor("weight_shape");
  std::array<std::int64_t, 2> dims{};
  for (std::size_t d = 0; d < 2; ++d) {
    if (shape_tensor.dtype == io::DType::I64) {
      std::memcpy(&dims[d], shape_tensor.bytes.data() + 8 * d, 8);
    } else {
      std::int32_t v = 0;
      std::memcpy(&v, shape_tensor.bytes.data() + 4 * d, 4);
      dims[d] = v;
    }
  }
  PQ_CHECK(dims[0] == out && dims[1] == in, "weight_shape [{}, {}] is not the module's [{}, {}]",
           dims[0], dims[1], out, in);
  const int bits = scheme.weights.num_bits;
  const std::int64_t per_word = 32 / bits;
  const std::uint32_t mask = (1u << bits) - 1u;
  const std::int32_t offset = 1 << (bits - 1);
  const StoredTensor packed = tensor("weight_packed");
  const StoredTensor scale_tensor = tensor("weight_scale");
  const std::vector<float> scales = float_scales(scale_tensor, "weight_scale");
  const std::int64_t words = ceil_div(in * bits, 32);
  const std::int64_t group =
      scheme.weights.strategy == Strategy::kChannel ? in : *scheme.weights.group_size;
  for (std::int64_t r = 0; r < out; ++r) {
    const std::uint8_t* row = packed.bytes.data() + 4 * r * words;
    for (std::int64_t first = 0; first < in; first += per_word) {
      std::uint32_t word = 0;
      std::memcpy(&word, row + 4 * (first / per_word), 4);
      for (std::int64_t c = first; c < std::min(in, first + per_word); ++c, word >>= bits) {
        const auto u = static_cast<std::int32_t>(word & mask);
        const float scale = scales[static_cast<std::size_t>(r * (in / group) + c / group)];
        w[static_cast<std::size_t>(r * in + c)] = static_cast<float>(u - offset) * scale;
      }
    }
  }
  return w;
}

std::vector<float> decode_module(const CompressedTensorsCheckpoint& checkpoint,
                                 std::string_view module) {
  const Scheme* scheme = checkpoint.scheme_of(module);
  PQ_CHECK(scheme != nullptr, "{}: Linear {} is not quantized", checkpoint.directory().string(),
           module);
  const model::Linear& linear = *checkpoint.find_linear(module);
  const std::string prefix = std::string(module) + ".";
  try {
    return decode_weight(*scheme, linear.out_features, linear.in_features,
                         [&](std::string_view suffix) {
                           const std::string name = prefix + std::string(suffix);
                           const io::TensorView view = checkpoint.tensors().view(name);
                           return StoredTensor{view.info->dtype, view.info->shape, view.bytes};
                         });
  } catch (const Error& e) {
    fail("{}: {}: {}", checkpoint.directory().string(), module, e.what());
  }
}

DecodedCheckpointWeightSource::DecodedCheckpointWeightSource(
    const CompressedTensorsCheckpoint& checkpoint)
    : checkpoint_(checkpoint) {}

const model::Linear* DecodedCheckpointWeightSource::quantized_linear(std::string_view name) const {
  if (!name.ends_with(".weight")) return nullptr;
  const std::string_view module = name.substr(0, name.size() - 7);
  const model::Linear* linear = checkpoint_.find_linear(module);
  if (linear == nullptr || checkpoint_.scheme_of(module) == nullptr) return nullptr;
  return linear;
}

bool DecodedCheckpointWeightSource::contains(std::string_view name) const {
  return quantized_linear(name) != nullptr || checkpoint_.tensors().contains(name);
}

std::vector<std::int64_t> DecodedCheckpointWeightSource::shape(std::string_view name) const {
  if (const model::Linear* linear = quantized_linear(name)) {
    return {linear->out_features, linear->in_features};
  }
  return checkpoint_.tensors().info(name).shape;
}

std::vector<float> DecodedCheckpointWeightSource::load_f32(std::string_view name) const {
  if (const model::Linear* linear = quantized_linear(name)) {
    return decode_module(checkpoint_, linear->name);
  }
  const io::TensorInfo& info = checkpoint_.tensors().info(name);
  PQ_CHECK(io::dtype_is_float(info.dtype), "{}: tensor {} has dtype {}, expected a float type",
           checkpoint_.directory().string(), name, io::dtype_name(info.dtype));
  return checkpoint_.tensors().to_f32(name);
}

void DecodedCheckpointWeightSource::release(std::string_view name) const {
  const model::Linear* linear = quantized_linear(name);
  if (linear == nullptr) {
    checkpoint_.tensors().release(name);
    return;
  }
  const Scheme& scheme = *checkpoint_.scheme_of(linear->name);
  for (const ExpectedTensor& t :
       expected_tensors(scheme, linear->out_features, linear->in_features)) {
    checkpoint_.tensors().release(linear->name + "." + t.suffix);
  }
}

namespace {

// The prismaquant format a scheme stores (the serving table's key): the layout, whether it
// quantizes activations, and for FP8 the weight strategy and for integers the width.
std::string_view format_of_scheme(const Scheme& scheme) {
  const bool quantized_inputs = scheme.activations != ActivationKind::kNone;
  switch (scheme.layout) {
    case Layout::kNvfp4:
      return quantized_inputs ? "NVFP4" : "NVFP4A16";
    case Layout::kMxfp4:
      return quantized_inputs ? "MXFP4" : "MXFP4A16";
    case Layout::kMxfp8:
      return quantized_inputs ? "MXFP8" : "MXFP8A16";
    case Layout::kFp8:
      if (!quantized_inputs) return "FP8_E4M3A16";
      if (scheme.weights.strategy == Strategy::kBlock) return "FP8_BLOCK";
      return scheme.weights.strategy == Strategy::kTensor ? "FP8_E4M3_TENSOR" : "FP8_E4M3";
    case Layout::kPackedInt:
      return scheme.weights.num_bits == 4 ? "INT4_W4A16" : "INT8_W8A16";
  }
  return "";
}

// The activations vLLM on `target` quantizes for `linear` stored in `scheme`.
ActivationKind served_activations(const Scheme& scheme, const model::Linear& linear,
                                  formats::ServingTarget target) {
  const formats::ServingBehaviour& served = formats::serving_behaviour(
      formats::format_by_name(format_of_scheme(scheme)), linear.layer_kind(), target);
  if (served.activations != formats::ActivationPath::kQuantized) return ActivationKind::kNone;
  if (scheme.activations != ActivationKind::kNone) return scheme.activations;
  // A weight-only MX scheme that the target runs with its W-A twin's activations.
  return scheme.layout == Layout::kMxfp4 ? ActivationKind::kMxfp4 : ActivationKind::kMxfp8;
}

}  // namespace

void check_marlin_group_scales(const CompressedTensorsCheckpoint& checkpoint,
                               formats::ServingTarget target) {
  for (const model::Linear& linear : checkpoint.spec().linears) {
    const Scheme* scheme = checkpoint.scheme_of(linear.name);
    if (scheme == nullptr || scheme->layout != Layout::kNvfp4) continue;
    const formats::WeightFormat& format = formats::format_by_name(format_of_scheme(*scheme));
    if (formats::nvfp4_scales(format, linear.layer_kind(), target) !=
        formats::Nvfp4Scales::kMarlin) {
      continue;
    }
    const std::string name = linear.name + ".weight_scale";
    const io::TensorView view = checkpoint.tensors().view(name);
    for (std::size_t i = 0; i < view.bytes.size(); ++i) {
      // E4M3 bytes 0x01-0x07 are the positive subnormals 2^-9 .. 7 * 2^-9.
      const std::uint8_t magnitude = view.bytes[i] & 0x7F;
      if (magnitude == 0 || magnitude >= 0x08) continue;
      const std::int64_t groups = linear.in_features / 16;
      fail(
          "{}: {}: NVFP4 group scale [{}, {}] is the E4M3 subnormal {}, which vLLM's Marlin "
          "kernel on {} reads as about zero; export for --serve-on {} keeps group scales normal",
          checkpoint.directory().string(), linear.name, static_cast<std::int64_t>(i) / groups,
          static_cast<std::int64_t>(i) % groups,
          formats::decode_element(formats::ElementType::E4M3, magnitude),
          formats::serving_target_name(target), formats::serving_target_name(target));
    }
    checkpoint.tensors().release(name);
  }
}

CheckpointActivationQuantizer::CheckpointActivationQuantizer(
    const CompressedTensorsCheckpoint& checkpoint, formats::ServingTarget target) {
  using formats::ElementType;
  using formats::GroupCodec;
  using formats::ScaleKind;
  // The MX exponent rule of compressed-tensors (quantization/utils/mxfp_utils.py
  // generate_mx_scales), which its activation observers share with the weights.
  const formats::ScaleSpec mx{.kind = ScaleKind::kE8M0,
                              .mx_rule = formats::MxScaleRule::kRoundToPower2};
  const formats::ScaleSpec fp8{.kind = ScaleKind::kFloat, .float_dtype = io::DType::F32};
  for (const model::Linear& linear : checkpoint.spec().linears) {
    const Scheme* scheme = checkpoint.scheme_of(linear.name);
    if (scheme == nullptr) continue;
    switch (served_activations(*scheme, linear, target)) {
      case ActivationKind::kNone:
        break;
      case ActivationKind::kNvfp4: {
        const io::TensorView view = checkpoint.tensors().view(linear.name + ".input_global_scale");
        float global = 0.0f;
        std::memcpy(&global, view.bytes.data(), sizeof global);
        by_linear_.emplace(
            linear.name,
            Rule{GroupCodec({ElementType::E2M1, 0},
                            {.kind = ScaleKind::kE4M3OverGlobal, .global_scale = global}),
                 16});
        break;
      }
      case ActivationKind::kMxfp4:
        by_linear_.emplace(linear.name, Rule{GroupCodec({ElementType::E2M1, 0}, mx), 32});
        break;
      case ActivationKind::kMxfp8:
        by_linear_.emplace(linear.name, Rule{GroupCodec({ElementType::E4M3, 0}, mx), 32});
        break;
      case ActivationKind::kFp8PerToken:
        by_linear_.emplace(linear.name, Rule{GroupCodec({ElementType::E4M3, 0}, fp8), 0});
        break;
      case ActivationKind::kFp8PerGroup:
        by_linear_.emplace(linear.name, Rule{GroupCodec({ElementType::E4M3, 0}, fp8),
                                             *scheme->input_activations->group_size});
        break;
    }
  }
}

bool CheckpointActivationQuantizer::applies_to(std::string_view linear) const {
  return by_linear_.find(linear) != by_linear_.end();
}

void CheckpointActivationQuantizer::quantize(std::string_view linear, std::int64_t rows,
                                             std::int64_t in_features,
                                             std::span<float> input) const {
  const auto it = by_linear_.find(linear);
  PQ_CHECK(it != by_linear_.end(), "no activation quantization for {}", linear);
  const Rule& rule = it->second;
  const std::int64_t group = rule.group_size == 0 ? in_features : rule.group_size;
  PQ_CHECK(
      in_features % group == 0 && static_cast<std::int64_t>(input.size()) == rows * in_features,
      "{}: activations [{}, {}] do not split into groups of {}", linear, rows, in_features, group);
  const std::vector<float> x(input.begin(), input.end());
  std::vector<formats::GroupScale> scales(x.size() / static_cast<std::size_t>(group));
  formats::quantize_rows(rule.codec, {.weights = x,
                                      .cols = in_features,
                                      .group_size = group,
                                      .scales = scales,
                                      .dequantized = input});
}

}  // namespace pq::validate
