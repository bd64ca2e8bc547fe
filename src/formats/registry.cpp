// The weight formats: what each stores, how, and how compressed-tensors / vLLM describe it.
// Tensor layouts: ../shared/docs/format-facts.md A.1/A.2 (compressed-tensors compressors/*,
// vLLM compressed_tensors schemes); config entries: compressed-tensors
// quantization/quant_scheme.py presets (NVFP4, NVFP4A16, MXFP4, MXFP4A16, MXFP8, MXFP8A16,
// FP8_DYNAMIC, FP8_BLOCK, W4A16, W8A16).

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>

#include "common/error.h"
#include "formats/packing.h"
#include "formats/weight_format.h"

namespace pq::formats {
namespace {

using nlohmann::json;

constexpr std::int64_t kFp8Block = 128;

std::int64_t ceil_div(std::int64_t a, std::int64_t b) {
  return (a + b - 1) / b;
}

void check_input(const WeightFormat& format, std::span<const float> w, Shape2D shape) {
  PQ_CHECK(shape.out > 0 && shape.in > 0, "{}: weight shape [{}, {}] is empty", format.name(),
           shape.out, shape.in);
  PQ_CHECK(w.size() == static_cast<std::size_t>(shape.numel()),
           "{}: {} values for weight shape [{}, {}]", format.name(), w.size(), shape.out, shape.in);
}

// Amax of the whole tensor; throws for Inf/NaN.
float finite_amax(const WeightFormat& format, std::span<const float> w) {
  const std::uint32_t bits = max_abs_bits(w);
  PQ_CHECK(bits < 0x7F800000u, "{}: the weight holds Inf or NaN", format.name());
  return std::bit_cast<float>(bits);
}

EncodedTensor make_tensor(TensorSpec spec, std::vector<std::uint8_t> bytes) {
  PQ_CHECK(bytes.size() == spec.byte_size(), "internal: tensor {} has {} bytes, expected {}",
           spec.suffix, bytes.size(), spec.byte_size());
  return {std::move(spec), std::move(bytes)};
}

std::vector<std::uint8_t> f32_bytes(float value) {
  std::vector<std::uint8_t> out(4);
  std::memcpy(out.data(), &value, 4);
  return out;
}

float read_f32_scalar(const EncodedTensor& t) {
  PQ_CHECK(t.bytes.size() == 4 && t.spec.dtype == io::DType::F32, "tensor {} is not one F32",
           t.spec.suffix);
  float value;
  std::memcpy(&value, t.bytes.data(), 4);
  return value;
}

// Stored scales, `width` bytes each, little-endian.
std::vector<std::uint8_t> scale_bytes(std::span<const GroupScale> scales, std::size_t width) {
  std::vector<std::uint8_t> out(scales.size() * width);
  for (std::size_t i = 0; i < scales.size(); ++i) {
    for (std::size_t b = 0; b < width; ++b) {
      out[i * width + b] = static_cast<std::uint8_t>(scales[i].stored >> (8 * b));
    }
  }
  return out;
}

std::vector<GroupScale> scales_from_bytes(const GroupCodec& codec,
                                          std::span<const std::uint8_t> bytes, std::size_t width) {
  std::vector<GroupScale> out(bytes.size() / width);
  for (std::size_t i = 0; i < out.size(); ++i) {
    std::uint32_t stored = 0;
    for (std::size_t b = 0; b < width; ++b)
      stored |= std::uint32_t{bytes[i * width + b]} << (8 * b);
    out[i] = codec.scale_from_stored(stored);
  }
  return out;
}

void check_encoded(const WeightFormat& format, const EncodedWeight& encoded) {
  PQ_CHECK(encoded.format == format.name(), "cannot decode a {} weight as {}", encoded.format,
           format.name());
  const auto specs = format.tensors(encoded.shape);
  PQ_CHECK(specs.size() == encoded.tensors.size(), "{} weight [{}, {}]: {} tensors, expected {}",
           format.name(), encoded.shape.out, encoded.shape.in, encoded.tensors.size(),
           specs.size());
  for (const auto& spec : specs) {
    const EncodedTensor& t = encoded.tensor(spec.suffix);
    PQ_CHECK(t.spec.dtype == spec.dtype && t.spec.shape == spec.shape &&
                 t.bytes.size() == spec.byte_size(),
             "{} tensor {} does not have the dtype, shape and size the format writes",
             format.name(), spec.suffix);
  }
}

// Checks what encode_groups was given against the layout: sizes, every code a finite element of
// the codec's type, every scale one the codec can store (its step read back from its stored bits).
void check_groups(const WeightFormat& format, std::span<const std::uint8_t> codes,
                  std::span<const GroupScale> scales, Shape2D s, const GroupLayout& layout) {
  PQ_CHECK(codes.size() == static_cast<std::size_t>(s.numel()),
           "{}: {} codes for weight shape [{}, {}]", format.name(), codes.size(), s.out, s.in);
  const std::int64_t groups = s.out * (s.in / layout.group_size);
  PQ_CHECK(scales.size() == static_cast<std::size_t>(groups),
           "{}: {} scales for the {} groups of weight [{}, {}]", format.name(), scales.size(),
           groups, s.out, s.in);
  const GroupCodec& codec = layout.codec;
  const int bits = codec.codes().int_bits > 0 ? codec.codes().int_bits
                                              : element_info(codec.codes().element).bits;
  std::array<bool, 256> valid{};
  for (std::uint32_t c = 0; c < (1u << bits); ++c) {
    valid[c] = std::isfinite(codec.dequantize(static_cast<std::uint8_t>(c), {0, 1.0f}));
  }
  for (const std::uint8_t code : codes) {
    PQ_CHECK(valid[code], "{}: code {:#04x} is not a finite {}-bit element", format.name(), code,
             bits);
  }
  for (const GroupScale& scale : scales) {
    PQ_CHECK(codec.scale_from_stored(scale.stored) == scale,
             "{}: scale {} (stored {:#x}) is not one the format stores", format.name(), scale.step,
             scale.stored);
  }
}

json float_args(int bits, std::string_view strategy, json group_size, json dynamic) {
  return {{"num_bits", bits},         {"type", "float"},
          {"symmetric", true},        {"strategy", strategy},
          {"group_size", group_size}, {"dynamic", dynamic},
          {"actorder", nullptr},      {"block_structure", nullptr},
          {"observer", "minmax"},     {"observer_kwargs", json::object()}};
}

json scheme(std::string_view format, json weights, json input_activations) {
  return {{"format", format},
          {"weights", std::move(weights)},
          {"input_activations", std::move(input_activations)},
          {"output_activations", nullptr}};
}

// Activations fake-quantized in groups along each row (dynamic scales computed per group).
class GroupActivationQuantizer final : public ActivationQuantizer {
 public:
  // group_size 0: one group per row (per-token).
  GroupActivationQuantizer(GroupCodec codec, std::int64_t group_size)
      : codec_(codec), group_size_(group_size) {}

  void fake_quantize(std::span<const float> x, std::int64_t cols,
                     std::span<float> out) const override {
    const std::int64_t g = group_size_ == 0 ? cols : group_size_;
    PQ_CHECK(cols > 0 && cols % g == 0 && x.size() % cols == 0 && out.size() == x.size(),
             "activation quantizer: {} values, {} outputs in rows of {} (groups of {})", x.size(),
             out.size(), cols, g);
    std::vector<GroupScale> scales(x.size() / static_cast<std::size_t>(g));
    quantize_rows(
        codec_,
        {.weights = x, .cols = cols, .group_size = g, .scales = scales, .dequantized = out});
  }

 private:
  GroupCodec codec_;
  std::int64_t group_size_;
};

// ---------------------------------------------------------------------------------------------
// NVFP4 (W4A4) and NVFP4A16: E2M1 codes in groups of 16, E4M3 group scales under an FP32 global
// scale (compressed-tensors compressors/nvfp4/base.py; vLLM compressed_tensors_w4a4_nvfp4.py,
// compressed_tensors_w4a16_nvfp4.py).
class NvFp4Format final : public WeightFormat {
 public:
  static constexpr std::int64_t kGroup = 16;

  explicit NvFp4Format(bool w4a4) : w4a4_(w4a4) {}

  std::string_view name() const override { return w4a4_ ? "NVFP4" : "NVFP4A16"; }
  std::string_view summary() const override {
    return w4a4_ ? "FP4 E2M1 g16, E4M3 scales + FP32 global; FP4 activations (dynamic g16)"
                 : "FP4 E2M1 g16, E4M3 scales + FP32 global; 16-bit activations";
  }
  bool exportable() const override { return true; }
  bool quantizes_activations() const override { return w4a4_; }

  std::optional<std::string> rejects(Shape2D s) const override {
    // vLLM requires the input dim in whole groups (upstream prismaquant format_registry,
    // method-facts.md §4: "NVFP4 ... need in % 16 == 0").
    if (s.in % kGroup != 0) return fmt::format("in ({}) is not a multiple of 16", s.in);
    return std::nullopt;
  }

  std::vector<TensorSpec> tensors(Shape2D s) const override {
    std::vector<TensorSpec> out = {
        {"weight_packed", io::DType::U8, {s.out, s.in / 2}},
        {"weight_scale", io::DType::F8_E4M3, {s.out, s.in / kGroup}},
        {"weight_global_scale", io::DType::F32, {1}},
    };
    if (w4a4_) out.push_back({"input_global_scale", io::DType::F32, {1}});
    return out;
  }

  EncodedWeight quantize(std::span<const float> w, Shape2D s,
                         const QuantizeOptions& options) const override {
    const GroupCodec codec = prepare(w, s, options);
    std::vector<std::uint8_t> codes(w.size());
    std::vector<GroupScale> scales(w.size() / kGroup);
    quantize_rows(
        codec,
        {.weights = w, .cols = s.in, .group_size = kGroup, .scales = scales, .codes = codes});
    return pack(codes, scales, s, codec.scale_spec().global_scale, options);
  }

  EncodedWeight encode_groups(std::span<const std::uint8_t> codes,
                              std::span<const GroupScale> scales, Shape2D s,
                              const QuantizeOptions& options) const override {
    check_shape(s);
    check_input_scale(options);
    PQ_CHECK(options.weight_global_scale.has_value(),
             "{}: encoding given codes and scales needs the weight_global_scale they were made "
             "under",
             name());
    const GroupCodec codec =
        make_codec(*options.weight_global_scale, "weight_global_scale", options.nvfp4_scales);
    check_groups(*this, codes, scales, s, {codec, kGroup, true});
    return pack(codes, scales, s, *options.weight_global_scale, options);
  }

  std::vector<float> dequantize(const EncodedWeight& e) const override {
    check_encoded(*this, e);
    const float global = read_f32_scalar(e.tensor("weight_global_scale"));
    const GroupCodec codec = make_codec(global, "stored weight_global_scale");
    std::vector<std::uint8_t> codes(e.shape.numel());
    unpack_fp4(e.tensor("weight_packed").bytes, codes);
    const auto scales = scales_from_bytes(codec, e.tensor("weight_scale").bytes, 1);
    std::vector<float> out(codes.size());
    dequantize_rows(codec, codes, scales, e.shape.in, kGroup, out);
    return out;
  }

  void fake_quantize(std::span<const float> w, Shape2D s, std::span<float> out,
                     const QuantizeOptions& options) const override {
    const GroupCodec codec = prepare(w, s, options);
    PQ_CHECK(out.size() == w.size(), "{}: {} outputs for {} weights", name(), out.size(), w.size());
    std::vector<GroupScale> scales(w.size() / kGroup);
    quantize_rows(
        codec,
        {.weights = w, .cols = s.in, .group_size = kGroup, .scales = scales, .dequantized = out});
  }

  json config_group() const override {
    // NVFP4A16 / NVFP4 presets: strategy tensor_group, group 16, E4M3 scales; W4A4 activations
    // are "local"-dynamic per 16 under a static global scale (observer static_minmax).
    json weights = float_args(4, "tensor_group", kGroup, false);
    weights["scale_dtype"] = "torch.float8_e4m3fn";
    weights["zp_dtype"] = "torch.float8_e4m3fn";
    json inputs = nullptr;
    if (w4a4_) {
      inputs = float_args(4, "tensor_group", kGroup, "local");
      inputs["observer"] = "static_minmax";
      inputs["scale_dtype"] = "torch.float8_e4m3fn";
      inputs["zp_dtype"] = "torch.float8_e4m3fn";
    }
    return scheme("nvfp4-pack-quantized", std::move(weights), std::move(inputs));
  }

  std::unique_ptr<ActivationQuantizer> activation_quantizer(
      const QuantizeOptions& options) const override {
    if (!w4a4_) return nullptr;
    PQ_CHECK(options.input_global_scale.has_value(),
             "NVFP4 activations need input_global_scale (448*6/amax from calibration)");
    return std::make_unique<GroupActivationQuantizer>(
        make_codec(*options.input_global_scale, "input_global_scale"), kGroup);
  }

  std::optional<GroupLayout> group_layout(Shape2D, const QuantizeOptions& options) const override {
    return GroupLayout{make_codec(options.weight_global_scale.value_or(1.0f), "global scale",
                                  options.nvfp4_scales),
                       kGroup, true};
  }

 private:
  static GroupCodec make_codec(float global, std::string_view what,
                               Nvfp4Scales rule = Nvfp4Scales::kCompressedTensors) {
    PQ_CHECK(std::isfinite(global) && global > 0.0f, "NVFP4 {} {} is not positive and finite", what,
             global);
    // kMarlin: non-zero groups keep at least E4M3's smallest normal, 2^-6 (byte 0x08).
    const std::uint8_t min_scale = rule == Nvfp4Scales::kMarlin ? 0x08 : 0x01;
    return GroupCodec(
        {ElementType::E2M1, 0},
        {.kind = ScaleKind::kE4M3OverGlobal, .global_scale = global, .min_e4m3_scale = min_scale});
  }

  void check_shape(Shape2D s) const {
    PQ_CHECK(s.out > 0 && s.in > 0, "{}: weight shape [{}, {}] is empty", name(), s.out, s.in);
    if (auto why = rejects(s)) fail("{}: weight [{}, {}]: {}", name(), s.out, s.in, *why);
  }

  void check_input_scale(const QuantizeOptions& options) const {
    if (!w4a4_) return;
    PQ_CHECK(options.input_global_scale.has_value(),
             "NVFP4 (W4A4) needs input_global_scale (448*6/amax of calibration activations)");
    make_codec(*options.input_global_scale, "input_global_scale");
  }

  // Checks the input and options; returns the codec under the tensor's (or the given) global
  // scale.
  GroupCodec prepare(std::span<const float> w, Shape2D s, const QuantizeOptions& options) const {
    check_input(*this, w, s);
    check_shape(s);
    const float amax = finite_amax(*this, w);
    check_input_scale(options);
    const float global =
        options.weight_global_scale.value_or(nvfp4_weight_global_scale(amax, options.nvfp4_scales));
    return make_codec(global, "weight_global_scale", options.nvfp4_scales);
  }

  // The stored tensors of checked codes and per-group scales.
  EncodedWeight pack(std::span<const std::uint8_t> codes, std::span<const GroupScale> scales,
                     Shape2D s, float global, const QuantizeOptions& options) const {
    const auto specs = tensors(s);
    EncodedWeight out{std::string(name()), s, {}};
    std::vector<std::uint8_t> packed(codes.size() / 2);
    pack_fp4(codes, packed);
    out.tensors.push_back(make_tensor(specs[0], std::move(packed)));
    out.tensors.push_back(make_tensor(specs[1], scale_bytes(scales, 1)));
    out.tensors.push_back(make_tensor(specs[2], f32_bytes(global)));
    if (w4a4_) out.tensors.push_back(make_tensor(specs[3], f32_bytes(*options.input_global_scale)));
    return out;
  }

  bool w4a4_;
};

// ---------------------------------------------------------------------------------------------
// MX formats: groups of 32 sharing an E8M0 scale (OCP MX v1.0). Stored as compressed-tensors
// writes MXFP4 (compressors/mxfp4/base.py: weight_packed U8 [N, K/2], weight_scale U8 [N, K/32])
// and MXFP8 (compressors/mxfp8/base.py: weight F8_E4M3 [N, K], weight_scale U8 [N, K/32]).
// MXFP6 has no compressed-tensors format: research only, packed 4 codes per 3 bytes.
class MxFormat final : public WeightFormat {
 public:
  static constexpr std::int64_t kGroup = 32;

  MxFormat(std::string name, ElementType element, bool w_and_a, MxScaleRule rule)
      : name_(std::move(name)), element_(element), w_and_a_(w_and_a), rule_(rule) {}

  std::string_view name() const override { return name_; }
  std::string_view summary() const override {
    switch (element_) {
      case ElementType::E2M1:
        return w_and_a_ ? "MXFP4: E2M1 g32, E8M0 scales; MXFP4 activations"
                        : "MXFP4: E2M1 g32, E8M0 scales; 16-bit activations";
      case ElementType::E4M3:
        return w_and_a_ ? "MXFP8: E4M3 g32, E8M0 scales; MXFP8 activations"
                        : "MXFP8: E4M3 g32, E8M0 scales; 16-bit activations";
      default:
        return "MXFP6 g32, E8M0 scales; research only (no compressed-tensors format)";
    }
  }
  bool exportable() const override { return element_bits() != 6; }
  bool quantizes_activations() const override { return w_and_a_; }

  std::optional<std::string> rejects(Shape2D s) const override {
    if (s.in % kGroup != 0) return fmt::format("in ({}) is not a multiple of 32", s.in);
    // vLLM's MXFP8 linear kernel (flashinfer/cutlass path) needs out % 128 == 0 and both dims
    // >= 128 (upstream prismaquant format_registry, method-facts.md §4).
    if (element_ == ElementType::E4M3 && (s.out % 128 != 0 || s.in < 128)) {
      return fmt::format("MXFP8 kernels need out % 128 == 0 and in >= 128 (got [{}, {}])", s.out,
                         s.in);
    }
    return std::nullopt;
  }

  std::vector<TensorSpec> tensors(Shape2D s) const override {
    TensorSpec codes =
        element_bits() == 8
            ? TensorSpec{"weight", io::DType::F8_E4M3, {s.out, s.in}}
            : TensorSpec{"weight_packed", io::DType::U8, {s.out, s.in * element_bits() / 8}};
    return {codes, {"weight_scale", io::DType::U8, {s.out, s.in / kGroup}}};
  }

  EncodedWeight quantize(std::span<const float> w, Shape2D s,
                         const QuantizeOptions&) const override {
    prepare(w, s);
    std::vector<std::uint8_t> codes(w.size());
    std::vector<GroupScale> scales(w.size() / kGroup);
    quantize_rows(
        make_codec(),
        {.weights = w, .cols = s.in, .group_size = kGroup, .scales = scales, .codes = codes});
    return pack(codes, scales, s);
  }

  EncodedWeight encode_groups(std::span<const std::uint8_t> codes,
                              std::span<const GroupScale> scales, Shape2D s,
                              const QuantizeOptions&) const override {
    check_shape(s);
    check_groups(*this, codes, scales, s, {make_codec(), kGroup, true});
    return pack(codes, scales, s);
  }

  std::vector<float> dequantize(const EncodedWeight& e) const override {
    check_encoded(*this, e);
    const GroupCodec codec = make_codec();
    const auto specs = tensors(e.shape);
    const auto& stored = e.tensor(specs[0].suffix).bytes;
    std::vector<std::uint8_t> codes(e.shape.numel());
    switch (element_bits()) {
      case 4:
        unpack_fp4(stored, codes);
        break;
      case 6:
        unpack_fp6(stored, codes);
        break;
      default:
        codes = stored;
    }
    const auto scales = scales_from_bytes(codec, e.tensor("weight_scale").bytes, 1);
    std::vector<float> out(codes.size());
    dequantize_rows(codec, codes, scales, e.shape.in, kGroup, out);
    return out;
  }

  void fake_quantize(std::span<const float> w, Shape2D s, std::span<float> out,
                     const QuantizeOptions&) const override {
    prepare(w, s);
    PQ_CHECK(out.size() == w.size(), "{}: {} outputs for {} weights", name_, out.size(), w.size());
    std::vector<GroupScale> scales(w.size() / kGroup);
    quantize_rows(
        make_codec(),
        {.weights = w, .cols = s.in, .group_size = kGroup, .scales = scales, .dequantized = out});
  }

  json config_group() const override {
    PQ_CHECK(exportable(),
             "{} has no compressed-tensors format (research only); it cannot be exported", name_);
    // MXFP4(A16) / MXFP8(A16) presets: strategy group, group 32, uint8 (E8M0) scales; W+A
    // variants quantize activations dynamically per 32.
    const int bits = element_bits();
    json weights = float_args(bits, "group", kGroup, false);
    weights["scale_dtype"] = "torch.uint8";
    weights["zp_dtype"] = "torch.uint8";
    json inputs = nullptr;
    if (w_and_a_) {
      inputs = float_args(bits, "group", kGroup, true);
      inputs["scale_dtype"] = "torch.uint8";
      inputs["zp_dtype"] = "torch.uint8";
    }
    return scheme(bits == 4 ? "mxfp4-pack-quantized" : "mxfp8-quantized", std::move(weights),
                  std::move(inputs));
  }

  std::unique_ptr<ActivationQuantizer> activation_quantizer(const QuantizeOptions&) const override {
    if (!w_and_a_) return nullptr;
    return std::make_unique<GroupActivationQuantizer>(make_codec(), kGroup);
  }

  std::optional<GroupLayout> group_layout(Shape2D, const QuantizeOptions&) const override {
    return GroupLayout{make_codec(), kGroup, true};
  }

 private:
  int element_bits() const { return element_info(element_).bits; }

  GroupCodec make_codec() const {
    return GroupCodec({element_, 0}, {.kind = ScaleKind::kE8M0, .mx_rule = rule_});
  }

  void check_shape(Shape2D s) const {
    PQ_CHECK(s.out > 0 && s.in > 0, "{}: weight shape [{}, {}] is empty", name_, s.out, s.in);
    PQ_CHECK(s.in % kGroup == 0, "{}: weight [{}, {}]: in is not a multiple of 32", name_, s.out,
             s.in);
  }

  void prepare(std::span<const float> w, Shape2D s) const {
    check_input(*this, w, s);
    check_shape(s);
    finite_amax(*this, w);
  }

  // The stored tensors of checked codes and per-group scales.
  EncodedWeight pack(std::span<const std::uint8_t> codes, std::span<const GroupScale> scales,
                     Shape2D s) const {
    const auto specs = tensors(s);
    std::vector<std::uint8_t> stored(specs[0].byte_size());
    switch (element_bits()) {
      case 4:
        pack_fp4(codes, stored);
        break;
      case 6:
        pack_fp6(codes, stored);
        break;
      default:
        std::copy(codes.begin(), codes.end(), stored.begin());
    }
    EncodedWeight out{name_, s, {}};
    out.tensors.push_back(make_tensor(specs[0], std::move(stored)));
    out.tensors.push_back(make_tensor(specs[1], scale_bytes(scales, 1)));
    return out;
  }

  std::string name_;
  ElementType element_;
  bool w_and_a_;
  MxScaleRule rule_;
};

// ---------------------------------------------------------------------------------------------
// FP8 E4M3 with F32 scales amax/448 (compressed-tensors helpers.py calculate_qparams; vLLM
// compressed_tensors_w8a8_fp8.py allocates float32 Channel/PerTensor/BlockQuantScaleParameter).
enum class Fp8Granularity { kChannel, kTensor, kBlock };

class Fp8Format final : public WeightFormat {
 public:
  Fp8Format(std::string name, Fp8Granularity granularity, bool dynamic_activations)
      : name_(std::move(name)), granularity_(granularity), w8a8_(dynamic_activations) {}

  std::string_view name() const override { return name_; }
  std::string_view summary() const override {
    switch (granularity_) {
      case Fp8Granularity::kChannel:
        return w8a8_ ? "FP8 E4M3 per-channel; FP8 activations (dynamic per token)"
                     : "FP8 E4M3 per-channel; 16-bit activations";
      case Fp8Granularity::kTensor:
        return "FP8 E4M3 per-tensor; FP8 activations (dynamic per token)";
      case Fp8Granularity::kBlock:
        break;
    }
    return "FP8 E4M3 128x128 blocks; FP8 activations (dynamic per 128)";
  }
  bool exportable() const override { return true; }
  bool quantizes_activations() const override { return w8a8_; }

  std::optional<std::string> rejects(Shape2D s) const override {
    // Block scales cover whole 128-column groups of each row (vLLM's block FP8 path wants the
    // input dim in whole blocks: fp8_utils.py validate_fp8_block_shape).
    if (granularity_ == Fp8Granularity::kBlock && s.in % kFp8Block != 0) {
      return fmt::format("in ({}) is not a multiple of 128", s.in);
    }
    return std::nullopt;
  }

  std::vector<TensorSpec> tensors(Shape2D s) const override {
    std::vector<std::int64_t> scale_shape;
    switch (granularity_) {
      case Fp8Granularity::kChannel:
        scale_shape = {s.out, 1};
        break;
      case Fp8Granularity::kTensor:
        scale_shape = {1};
        break;
      case Fp8Granularity::kBlock:
        scale_shape = {ceil_div(s.out, kFp8Block), ceil_div(s.in, kFp8Block)};
    }
    return {{"weight", io::DType::F8_E4M3, {s.out, s.in}},
            {"weight_scale", io::DType::F32, scale_shape}};
  }

  EncodedWeight quantize(std::span<const float> w, Shape2D s,
                         const QuantizeOptions&) const override {
    std::vector<std::uint8_t> codes(w.size());
    const std::vector<GroupScale> stored = run(w, s, codes, {});
    return pack(codes, stored, s);
  }

  EncodedWeight encode_groups(std::span<const std::uint8_t> codes,
                              std::span<const GroupScale> scales, Shape2D s,
                              const QuantizeOptions&) const override {
    PQ_CHECK(s.out > 0 && s.in > 0, "{}: weight shape [{}, {}] is empty", name_, s.out, s.in);
    if (auto why = rejects(s)) fail("{}: weight [{}, {}]: {}", name_, s.out, s.in, *why);
    const GroupLayout layout = *group_layout(s, {});
    check_groups(*this, codes, scales, s, layout);
    // The stored scales: the (row, group) entry at the first row each one covers, every other
    // row it covers checked against it.
    const std::int64_t groups = s.in / layout.group_size;
    std::vector<GroupScale> stored;
    for (std::int64_t r0 = 0; r0 < s.out; r0 += layout.scale_rows) {
      for (std::int64_t g = 0; g < groups; ++g) {
        const GroupScale& first = scales[r0 * groups + g];
        for (std::int64_t r = r0; r < std::min(s.out, r0 + layout.scale_rows); ++r) {
          PQ_CHECK(scales[r * groups + g] == first,
                   "{}: rows {} and {} of column group {} share one stored scale but were given "
                   "{} and {}",
                   name_, r0, r, g, first.step, scales[r * groups + g].step);
        }
        stored.push_back(first);
      }
    }
    return pack(codes, stored, s);
  }

  std::vector<float> dequantize(const EncodedWeight& e) const override {
    check_encoded(*this, e);
    const Shape2D s = e.shape;
    const auto stored = scales_from_bytes(codec(), e.tensor("weight_scale").bytes, 4);
    const std::vector<GroupScale> row_scales = expand(stored, s);
    std::vector<float> out(s.numel());
    dequantize_rows(codec(), e.tensor("weight").bytes, row_scales, s.in, row_group(s), out);
    return out;
  }

  void fake_quantize(std::span<const float> w, Shape2D s, std::span<float> out,
                     const QuantizeOptions&) const override {
    PQ_CHECK(out.size() == w.size(), "{}: {} outputs for {} weights", name_, out.size(), w.size());
    run(w, s, {}, out);
  }

  json config_group() const override {
    // FP8_DYNAMIC (channel), FP8 (tensor) with per-token dynamic activations, FP8_BLOCK; the
    // weight-only variant is compressed-tensors' naive-quantized W8A16 (format-facts.md A.1).
    json weights;
    json inputs = nullptr;
    switch (granularity_) {
      case Fp8Granularity::kChannel:
        weights = float_args(8, "channel", nullptr, false);
        break;
      case Fp8Granularity::kTensor:
        weights = float_args(8, "tensor", nullptr, false);
        break;
      case Fp8Granularity::kBlock:
        weights = float_args(8, "block", nullptr, false);
        weights["block_structure"] = {kFp8Block, kFp8Block};
        break;
    }
    if (w8a8_) {
      inputs = granularity_ == Fp8Granularity::kBlock ? float_args(8, "group", kFp8Block, true)
                                                      : float_args(8, "token", nullptr, true);
    }
    return scheme(w8a8_ ? "float-quantized" : "naive-quantized", std::move(weights),
                  std::move(inputs));
  }

  std::unique_ptr<ActivationQuantizer> activation_quantizer(const QuantizeOptions&) const override {
    if (!w8a8_) return nullptr;
    // vLLM dynamic FP8 activation scales: amax / 448 per token (per 128 for block weights).
    return std::make_unique<GroupActivationQuantizer>(
        codec(), granularity_ == Fp8Granularity::kBlock ? kFp8Block : 0);
  }

  std::optional<GroupLayout> group_layout(Shape2D s, const QuantizeOptions&) const override {
    switch (granularity_) {
      case Fp8Granularity::kChannel:
        return GroupLayout{codec(), s.in, true, 1};
      case Fp8Granularity::kTensor:
        return GroupLayout{codec(), s.in, false, s.out};
      case Fp8Granularity::kBlock:
        break;
    }
    return GroupLayout{codec(), kFp8Block, false, kFp8Block};
  }

 private:
  static GroupCodec codec() {
    return GroupCodec({ElementType::E4M3, 0},
                      {.kind = ScaleKind::kFloat, .float_dtype = io::DType::F32});
  }

  std::int64_t row_group(Shape2D s) const {
    return granularity_ == Fp8Granularity::kBlock ? kFp8Block : s.in;
  }

  // The stored tensors of checked codes and stored scales.
  EncodedWeight pack(std::span<const std::uint8_t> codes, std::span<const GroupScale> stored,
                     Shape2D s) const {
    const auto specs = tensors(s);
    EncodedWeight out{name_, s, {}};
    out.tensors.push_back(make_tensor(specs[0], {codes.begin(), codes.end()}));
    out.tensors.push_back(make_tensor(specs[1], scale_bytes(stored, 4)));
    return out;
  }

  // The stored scales broadcast to each row's groups.
  std::vector<GroupScale> expand(std::span<const GroupScale> stored, Shape2D s) const {
    switch (granularity_) {
      case Fp8Granularity::kChannel:
        return {stored.begin(), stored.end()};
      case Fp8Granularity::kTensor:
        return std::vector<GroupScale>(s.out, stored[0]);
      case Fp8Granularity::kBlock:
        break;
    }
    const std::int64_t col_blocks = s.in / kFp8Block;
    std::vector<GroupScale> out(s.out * col_blocks);
    for (std::int64_t r = 0; r < s.out; ++r) {
      for (std::int64_t b = 0; b < col_blocks; ++b) {
        out[r * col_blocks + b] = stored[(r / kFp8Block) * col_blocks + b];
      }
    }
    return out;
  }

  // Quantizes into codes and/or dequantized values; returns the stored scales.
  std::vector<GroupScale> run(std::span<const float> w, Shape2D s, std::span<std::uint8_t> codes,
                              std::span<float> dequantized) const {
    check_input(*this, w, s);
    if (auto why = rejects(s)) fail("{}: weight [{}, {}]: {}", name_, s.out, s.in, *why);
    const float amax = finite_amax(*this, w);
    const GroupCodec c = codec();
    std::vector<GroupScale> stored;
    switch (granularity_) {
      case Fp8Granularity::kChannel: {
        stored.resize(s.out);
        quantize_rows(c, {.weights = w,
                          .cols = s.in,
                          .group_size = s.in,
                          .scales = stored,
                          .codes = codes,
                          .dequantized = dequantized});
        return stored;
      }
      case Fp8Granularity::kTensor:
        stored = {c.scale_for_amax(amax)};
        break;
      case Fp8Granularity::kBlock: {
        const std::int64_t row_blocks = ceil_div(s.out, kFp8Block);
        const std::int64_t col_blocks = s.in / kFp8Block;
        std::vector<std::uint32_t> block_max(row_blocks * col_blocks, 0);
        for (std::int64_t r = 0; r < s.out; ++r) {
          for (std::int64_t b = 0; b < col_blocks; ++b) {
            std::uint32_t& m = block_max[(r / kFp8Block) * col_blocks + b];
            m = std::max(m, max_abs_bits(w.subspan(r * s.in + b * kFp8Block, kFp8Block)));
          }
        }
        for (std::uint32_t m : block_max)
          stored.push_back(c.scale_for_amax(std::bit_cast<float>(m)));
        break;
      }
    }
    std::vector<GroupScale> row_scales = expand(stored, s);
    quantize_rows(c, {.weights = w,
                      .cols = s.in,
                      .group_size = row_group(s),
                      .scales_given = true,
                      .scales = row_scales,
                      .codes = codes,
                      .dequantized = dequantized});
    return stored;
  }

  std::string name_;
  Fp8Granularity granularity_;
  bool w8a8_;
};

// ---------------------------------------------------------------------------------------------
// Symmetric integer weights, 16-bit activations, compressed-tensors pack-quantized
// (compressors/pack_quantized/base.py: weight_packed I32 [N, K*bits/32], weight_scale [N, K/g]
// in the model dtype, weight_shape I64 [2]; symmetric zero points are not written). Served by
// vLLM's WNA16 Marlin kernels (compressed_tensors_wNa16.py, uint4b8 / uint8b128).
class IntFormat final : public WeightFormat {
 public:
  // group_size 0: per output channel.
  IntFormat(std::string name, int bits, std::int64_t group_size)
      : name_(std::move(name)), bits_(bits), group_size_(group_size) {}

  std::string_view name() const override { return name_; }
  std::string_view summary() const override {
    return bits_ == 4 ? "INT4 symmetric g128, BF16 scales, packed int32; 16-bit activations"
                      : "INT8 symmetric per-channel, BF16 scales, packed int32; 16-bit activations";
  }
  bool exportable() const override { return true; }
  bool quantizes_activations() const override { return false; }

  std::optional<std::string> rejects(Shape2D s) const override {
    if (auto why = layout_problem(s)) return why;
    // Marlin WNA16: GPTQ_MARLIN_MIN_THREAD_N = 64, GPTQ_MARLIN_MIN_THREAD_K = 128
    // (vLLM model_executor/layers/quantization/utils/marlin_utils.py).
    if (s.out % 64 != 0 || s.in % 128 != 0) {
      return fmt::format("Marlin needs out % 64 == 0 and in % 128 == 0 (got [{}, {}])", s.out,
                         s.in);
    }
    return std::nullopt;
  }

  std::vector<TensorSpec> tensors(Shape2D s) const override {
    return {{"weight_packed", io::DType::I32, {s.out, s.in * bits_ / 32}},
            {"weight_scale", io::DType::BF16, {s.out, s.in / group(s)}},
            {"weight_shape", io::DType::I64, {2}}};
  }

  EncodedWeight quantize(std::span<const float> w, Shape2D s,
                         const QuantizeOptions&) const override {
    prepare(w, s);
    std::vector<std::uint8_t> codes(w.size());
    std::vector<GroupScale> scales(w.size() / group(s));
    quantize_rows(
        codec(),
        {.weights = w, .cols = s.in, .group_size = group(s), .scales = scales, .codes = codes});
    return pack(codes, scales, s);
  }

  EncodedWeight encode_groups(std::span<const std::uint8_t> codes,
                              std::span<const GroupScale> scales, Shape2D s,
                              const QuantizeOptions&) const override {
    check_shape(s);
    check_groups(*this, codes, scales, s, {codec(), group(s), true});
    return pack(codes, scales, s);
  }

  std::vector<float> dequantize(const EncodedWeight& e) const override {
    check_encoded(*this, e);
    std::int64_t dims[2];
    std::memcpy(dims, e.tensor("weight_shape").bytes.data(), 16);
    PQ_CHECK(dims[0] == e.shape.out && dims[1] == e.shape.in,
             "{}: weight_shape [{}, {}] does not match [{}, {}]", name_, dims[0], dims[1],
             e.shape.out, e.shape.in);
    std::vector<std::uint8_t> codes(e.shape.numel());
    unpack_int32(e.tensor("weight_packed").bytes, bits_, codes);
    const auto scales = scales_from_bytes(codec(), e.tensor("weight_scale").bytes, 2);
    std::vector<float> out(codes.size());
    dequantize_rows(codec(), codes, scales, e.shape.in, group(e.shape), out);
    return out;
  }

  void fake_quantize(std::span<const float> w, Shape2D s, std::span<float> out,
                     const QuantizeOptions&) const override {
    prepare(w, s);
    PQ_CHECK(out.size() == w.size(), "{}: {} outputs for {} weights", name_, out.size(), w.size());
    std::vector<GroupScale> scales(w.size() / group(s));
    quantize_rows(
        codec(),
        {.weights = w, .cols = s.in, .group_size = group(s), .scales = scales, .dequantized = out});
  }

  json config_group() const override {
    json weights = {{"num_bits", bits_},
                    {"type", "int"},
                    {"symmetric", true},
                    {"strategy", group_size_ == 0 ? "channel" : "group"},
                    {"group_size", group_size_ == 0 ? json(nullptr) : json(group_size_)},
                    {"dynamic", false},
                    {"actorder", nullptr},
                    {"block_structure", nullptr},
                    {"observer", "minmax"},
                    {"observer_kwargs", json::object()}};
    return scheme("pack-quantized", std::move(weights), nullptr);
  }

  std::optional<GroupLayout> group_layout(Shape2D s, const QuantizeOptions&) const override {
    return GroupLayout{codec(), group(s), true};
  }

 private:
  std::int64_t group(Shape2D s) const { return group_size_ == 0 ? s.in : group_size_; }

  GroupCodec codec() const {
    return GroupCodec({ElementType::E2M1, bits_},
                      {.kind = ScaleKind::kFloat, .float_dtype = io::DType::BF16});
  }

  std::optional<std::string> layout_problem(Shape2D s) const {
    if (group_size_ != 0 && s.in % group_size_ != 0) {
      return fmt::format("in ({}) is not a multiple of {}", s.in, group_size_);
    }
    if (s.in * bits_ % 32 != 0) {
      return fmt::format("in ({}) does not fill whole int32 words of {}-bit codes", s.in, bits_);
    }
    return std::nullopt;
  }

  void check_shape(Shape2D s) const {
    PQ_CHECK(s.out > 0 && s.in > 0, "{}: weight shape [{}, {}] is empty", name_, s.out, s.in);
    if (auto why = layout_problem(s)) fail("{}: weight [{}, {}]: {}", name_, s.out, s.in, *why);
  }

  void prepare(std::span<const float> w, Shape2D s) const {
    check_input(*this, w, s);
    check_shape(s);
    finite_amax(*this, w);
  }

  // The stored tensors of checked codes and per-group scales.
  EncodedWeight pack(std::span<const std::uint8_t> codes, std::span<const GroupScale> scales,
                     Shape2D s) const {
    const auto specs = tensors(s);
    std::vector<std::uint8_t> packed(specs[0].byte_size());
    pack_int32(codes, bits_, packed);
    std::vector<std::uint8_t> shape_bytes(16);
    const std::int64_t dims[2] = {s.out, s.in};
    std::memcpy(shape_bytes.data(), dims, 16);
    EncodedWeight out{name_, s, {}};
    out.tensors.push_back(make_tensor(specs[0], std::move(packed)));
    out.tensors.push_back(make_tensor(specs[1], scale_bytes(scales, 2)));
    out.tensors.push_back(make_tensor(specs[2], std::move(shape_bytes)));
    return out;
  }

  std::string name_;
  int bits_;
  std::int64_t group_size_;
};

// ---------------------------------------------------------------------------------------------
// BF16 passthrough: the weight rounded to bfloat16 (exact for a BF16 source); the exporter lists
// such modules in `ignore`, so there is no config group.
class Bf16Format final : public WeightFormat {
 public:
  std::string_view name() const override { return "BF16"; }
  std::string_view summary() const override { return "unquantized bfloat16 (listed in ignore)"; }
  bool exportable() const override { return true; }
  bool quantizes_activations() const override { return false; }
  std::optional<std::string> rejects(Shape2D) const override { return std::nullopt; }

  std::vector<TensorSpec> tensors(Shape2D s) const override {
    return {{"weight", io::DType::BF16, {s.out, s.in}}};
  }

  EncodedWeight quantize(std::span<const float> w, Shape2D s,
                         const QuantizeOptions&) const override {
    check_input(*this, w, s);
    std::vector<std::uint16_t> codes(w.size());
    encode_elements16(ElementType::BF16, w, codes);
    std::vector<std::uint8_t> bytes(w.size() * 2);
    std::memcpy(bytes.data(), codes.data(), bytes.size());
    EncodedWeight out{"BF16", s, {}};
    out.tensors.push_back(make_tensor(tensors(s)[0], std::move(bytes)));
    return out;
  }

  std::vector<float> dequantize(const EncodedWeight& e) const override {
    check_encoded(*this, e);
    const auto& bytes = e.tensor("weight").bytes;
    std::vector<std::uint16_t> codes(bytes.size() / 2);
    std::memcpy(codes.data(), bytes.data(), bytes.size());
    std::vector<float> out(codes.size());
    decode_elements16(ElementType::BF16, codes, out);
    return out;
  }

  void fake_quantize(std::span<const float> w, Shape2D s, std::span<float> out,
                     const QuantizeOptions&) const override {
    check_input(*this, w, s);
    PQ_CHECK(out.size() == w.size(), "BF16: {} outputs for {} weights", out.size(), w.size());
    // Through a small buffer: no tensor-sized allocation, same bits as quantize + dequantize.
    constexpr std::size_t kChunk = 4096;
    std::array<std::uint16_t, kChunk> codes;
    for (std::size_t i = 0; i < w.size(); i += kChunk) {
      const std::size_t n = std::min(kChunk, w.size() - i);
      encode_elements16(ElementType::BF16, w.subspan(i, n), std::span(codes).first(n));
      decode_elements16(ElementType::BF16, std::span(codes).first(n), out.subspan(i, n));
    }
  }

  json config_group() const override { return nullptr; }
};

// ---------------------------------------------------------------------------------------------
// FP8_SOURCE: a source checkpoint's FP8 128x128 block weights kept byte-exact; its
// weight_scale_inv (a multiplier despite the name) is stored as the compressed-tensors block
// weight_scale in F32 (BF16 sources widen exactly). Upstream prismaquant does the same rename
// (method-facts.md §7); the config is FP8_BLOCK's.
class Fp8SourceFormat final : public WeightFormat {
 public:
  std::string_view name() const override { return "FP8_SOURCE"; }
  std::string_view summary() const override {
    return "source FP8 E4M3 128x128 block weights kept byte-exact (FP8 sources only)";
  }
  bool exportable() const override { return true; }
  bool quantizes_activations() const override { return true; }
  // Served as FP8_BLOCK: vLLM quantizes the activations in groups of 128 along the input
  // (fp8_utils.py per-token-group quantization), so the input dim must be whole blocks. No
  // published source has such a Linear (deepseek_v3-architecture-facts.md §9); tiny test
  // checkpoints do (DeepSeek-V3's q_b_proj in 64, kv_b_proj in 32).
  std::optional<std::string> rejects(Shape2D s) const override {
    if (s.in % kFp8Block != 0) return fmt::format("in ({}) is not a multiple of 128", s.in);
    return std::nullopt;
  }

  std::vector<TensorSpec> tensors(Shape2D s) const override {
    return {
        {"weight", io::DType::F8_E4M3, {s.out, s.in}},
        {"weight_scale", io::DType::F32, {ceil_div(s.out, kFp8Block), ceil_div(s.in, kFp8Block)}}};
  }

  EncodedWeight quantize(std::span<const float>, Shape2D s,
                         const QuantizeOptions& options) const override {
    PQ_CHECK(options.fp8_source != nullptr,
             "FP8_SOURCE needs the source checkpoint's FP8 weight and weight_scale_inv");
    const Fp8SourceWeight& src = *options.fp8_source;
    const auto specs = tensors(s);
    PQ_CHECK(src.weight.size() == specs[0].byte_size(),
             "FP8_SOURCE: source weight has {} bytes, expected {} for [{}, {}]", src.weight.size(),
             specs[0].byte_size(), s.out, s.in);
    PQ_CHECK(src.scale_dtype == io::DType::F32 || src.scale_dtype == io::DType::BF16,
             "FP8_SOURCE: weight_scale_inv must be F32 or BF16, not {}",
             io::dtype_name(src.scale_dtype));
    const std::size_t scales = specs[1].byte_size() / 4;
    PQ_CHECK(src.scale_inv.size() == scales * io::dtype_size(src.scale_dtype),
             "FP8_SOURCE: weight_scale_inv has {} bytes, expected {} {} scales",
             src.scale_inv.size(), scales, io::dtype_name(src.scale_dtype));
    std::vector<float> scale_values(scales);
    io::decode_to_f32(src.scale_dtype, src.scale_inv, scale_values);
    std::vector<std::uint8_t> scale_out(scales * 4);
    std::memcpy(scale_out.data(), scale_values.data(), scale_out.size());
    EncodedWeight out{"FP8_SOURCE", s, {}};
    out.tensors.push_back(make_tensor(specs[0], {src.weight.begin(), src.weight.end()}));
    out.tensors.push_back(make_tensor(specs[1], std::move(scale_out)));
    return out;
  }

  std::vector<float> dequantize(const EncodedWeight& e) const override {
    check_encoded(*this, e);
    const Shape2D s = e.shape;
    std::vector<float> values(s.numel());
    decode_elements(ElementType::E4M3, e.tensor("weight").bytes, values);
    const auto& scale_bytes = e.tensor("weight_scale").bytes;
    std::vector<float> scales(scale_bytes.size() / 4);
    std::memcpy(scales.data(), scale_bytes.data(), scale_bytes.size());
    const std::int64_t col_blocks = ceil_div(s.in, kFp8Block);
    for (std::int64_t r = 0; r < s.out; ++r) {
      for (std::int64_t c = 0; c < s.in; ++c) {
        values[r * s.in + c] *= scales[(r / kFp8Block) * col_blocks + c / kFp8Block];
      }
    }
    return values;
  }

  json config_group() const override {
    json weights = float_args(8, "block", nullptr, false);
    weights["block_structure"] = {kFp8Block, kFp8Block};
    return scheme("float-quantized", std::move(weights), float_args(8, "group", kFp8Block, true));
  }

  std::unique_ptr<ActivationQuantizer> activation_quantizer(const QuantizeOptions&) const override {
    return std::make_unique<GroupActivationQuantizer>(
        GroupCodec({ElementType::E4M3, 0}, {.kind = ScaleKind::kFloat}), kFp8Block);
  }
};

std::vector<std::unique_ptr<WeightFormat>> make_formats() {
  // MX scale rule: compressed-tensors' round_to_power_2, the rule llm-compressor checkpoints
  // are made with. On qwen3-dense-tiny layer 0 it lowers the relative weight MSE against the OCP
  // floor rule for MXFP4 (1.27e-2 vs 1.35e-2), MXFP6_E3M2 (2.79e-3 vs 2.96e-3) and MXFP8
  // (7.05e-4 vs 9.28e-4) and costs 3% on MXFP6_E2M3 (docs/formats.md). vLLM reads only the
  // stored exponent, so either rule loads.
  constexpr MxScaleRule kMxRule = MxScaleRule::kRoundToPower2;
  std::vector<std::unique_ptr<WeightFormat>> f;
  f.push_back(std::make_unique<NvFp4Format>(true));
  f.push_back(std::make_unique<NvFp4Format>(false));
  f.push_back(std::make_unique<MxFormat>("MXFP4", ElementType::E2M1, true, kMxRule));
  f.push_back(std::make_unique<MxFormat>("MXFP4A16", ElementType::E2M1, false, kMxRule));
  f.push_back(std::make_unique<MxFormat>("MXFP6_E2M3", ElementType::E2M3, true, kMxRule));
  f.push_back(std::make_unique<MxFormat>("MXFP6_E2M3A16", ElementType::E2M3, false, kMxRule));
  f.push_back(std::make_unique<MxFormat>("MXFP6_E3M2", ElementType::E3M2, true, kMxRule));
  f.push_back(std::make_unique<MxFormat>("MXFP6_E3M2A16", ElementType::E3M2, false, kMxRule));
  f.push_back(std::make_unique<MxFormat>("MXFP8", ElementType::E4M3, true, kMxRule));
  f.push_back(std::make_unique<MxFormat>("MXFP8A16", ElementType::E4M3, false, kMxRule));
  f.push_back(std::make_unique<Fp8Format>("FP8_E4M3", Fp8Granularity::kChannel, true));
  f.push_back(std::make_unique<Fp8Format>("FP8_E4M3A16", Fp8Granularity::kChannel, false));
  f.push_back(std::make_unique<Fp8Format>("FP8_E4M3_TENSOR", Fp8Granularity::kTensor, true));
  f.push_back(std::make_unique<Fp8Format>("FP8_BLOCK", Fp8Granularity::kBlock, true));
  f.push_back(std::make_unique<IntFormat>("INT8_W8A16", 8, 0));
  f.push_back(std::make_unique<IntFormat>("INT4_W4A16", 4, 128));
  f.push_back(std::make_unique<Bf16Format>());
  f.push_back(std::make_unique<Fp8SourceFormat>());
  return f;
}

}  // namespace

const std::vector<const WeightFormat*>& all_formats() {
  static const std::vector<std::unique_ptr<WeightFormat>> owned = make_formats();
  static const std::vector<const WeightFormat*> views = [] {
    std::vector<const WeightFormat*> v;
    for (const auto& f : owned) v.push_back(f.get());
    return v;
  }();
  return views;
}

const WeightFormat& format_by_name(std::string_view name) {
  // "MXFP8_E4M3" is the element-explicit name of MXFP8 (upstream prismaquant alias).
  const std::string_view canonical = name == "MXFP8_E4M3" ? "MXFP8" : name;
  std::string known;
  for (const WeightFormat* f : all_formats()) {
    if (f->name() == canonical) return *f;
    known += known.empty() ? "" : ", ";
    known += f->name();
  }
  fail("unknown weight format '{}' (known: {})", name, known);
}

}  // namespace pq::formats
