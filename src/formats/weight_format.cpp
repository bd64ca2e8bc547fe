#include "formats/weight_format.h"

#include <cmath>
#include <cstring>

#include "common/error.h"

namespace pq::formats {

std::uint64_t TensorSpec::byte_size() const {
  std::uint64_t n = io::dtype_size(dtype);
  for (std::int64_t d : shape) n *= static_cast<std::uint64_t>(d);
  return n;
}

const EncodedTensor& EncodedWeight::tensor(std::string_view suffix) const {
  for (const auto& t : tensors) {
    if (t.spec.suffix == suffix) return t;
  }
  fail("{} weight [{}, {}] has no tensor '{}'", format, shape.out, shape.in, suffix);
}

std::uint64_t EncodedWeight::byte_size() const {
  std::uint64_t n = 0;
  for (const auto& t : tensors) n += t.bytes.size();
  return n;
}

std::uint64_t WeightFormat::bytes(Shape2D shape) const {
  std::uint64_t n = 0;
  for (const auto& spec : tensors(shape)) n += spec.byte_size();
  return n;
}

double WeightFormat::bits_per_param(Shape2D shape) const {
  return 8.0 * static_cast<double>(bytes(shape)) / static_cast<double>(shape.numel());
}

void WeightFormat::fake_quantize(std::span<const float> w, Shape2D shape, std::span<float> out,
                                 const QuantizeOptions& options) const {
  const std::vector<float> result = dequantize(quantize(w, shape, options));
  PQ_CHECK(out.size() == result.size(), "{}: {} outputs for shape [{}, {}]", name(), out.size(),
           shape.out, shape.in);
  std::memcpy(out.data(), result.data(), result.size() * sizeof(float));
}

std::unique_ptr<ActivationQuantizer> WeightFormat::activation_quantizer(
    const QuantizeOptions&) const {
  return nullptr;
}

std::optional<GroupLayout> WeightFormat::group_layout(Shape2D, const QuantizeOptions&) const {
  return std::nullopt;
}

EncodedWeight WeightFormat::encode_groups(std::span<const std::uint8_t>,
                                          std::span<const GroupScale>, Shape2D,
                                          const QuantizeOptions&) const {
  fail("{} has no group layout: it cannot encode given codes and scales", name());
}

float nvfp4_global_scale(float amax) {
  const float scale = 448.0f * 6.0f / amax;
  return std::isfinite(scale) && scale > 0.0f ? scale : 1.0f;
}

float nvfp4_weight_global_scale(float amax, Nvfp4Scales rule) {
  const float scale = nvfp4_global_scale(amax);
  if (rule == Nvfp4Scales::kCompressedTensors) return scale;
  int exponent = 0;
  std::frexp(scale, &exponent);  // scale = m * 2^exponent, m in [0.5, 1)
  return std::ldexp(1.0f, exponent - 1);
}

}  // namespace pq::formats
