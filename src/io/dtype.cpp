#include "io/dtype.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

#include "common/error.h"

namespace pq::io {
namespace {

struct DTypeEntry {
  DType dtype;
  std::string_view name;
  std::size_t size;
  bool is_float;
};

// Indexed by DType; sizes from Dtype::size() in huggingface/safetensors safetensors/src/tensor.rs.
constexpr std::array<DTypeEntry, 15> kDTypes = {{
    {DType::F64, "F64", 8, true},
    {DType::F32, "F32", 4, true},
    {DType::F16, "F16", 2, true},
    {DType::BF16, "BF16", 2, true},
    {DType::F8_E4M3, "F8_E4M3", 1, true},
    {DType::F8_E5M2, "F8_E5M2", 1, true},
    {DType::I64, "I64", 8, false},
    {DType::I32, "I32", 4, false},
    {DType::I16, "I16", 2, false},
    {DType::I8, "I8", 1, false},
    {DType::U8, "U8", 1, false},
    {DType::BOOL, "BOOL", 1, false},
    {DType::U64, "U64", 8, false},
    {DType::U32, "U32", 4, false},
    {DType::U16, "U16", 2, false},
}};

const DTypeEntry& entry(DType dtype) {
  return kDTypes[static_cast<std::size_t>(dtype)];
}

constexpr bool table_matches_enum() {
  for (std::size_t i = 0; i < kDTypes.size(); ++i) {
    if (static_cast<std::size_t>(kDTypes[i].dtype) != i) return false;
  }
  return true;
}
static_assert(table_matches_enum(), "kDTypes must be indexed by DType");

template <typename T>
T load(const std::uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

}  // namespace

std::string_view dtype_name(DType dtype) {
  return entry(dtype).name;
}
std::size_t dtype_size(DType dtype) {
  return entry(dtype).size;
}
bool dtype_is_float(DType dtype) {
  return entry(dtype).is_float;
}

std::optional<DType> parse_dtype(std::string_view name) {
  for (const auto& e : kDTypes) {
    if (e.name == name) return e.dtype;
  }
  return std::nullopt;
}

float bf16_bits_to_f32(std::uint16_t bits) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
}

float f16_bits_to_f32(std::uint16_t bits) {
  const std::uint32_t sign = static_cast<std::uint32_t>(bits & 0x8000u) << 16;
  const std::uint32_t exp = (bits >> 10) & 0x1fu;
  const std::uint32_t mant = bits & 0x3ffu;
  if (exp == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));
  if (exp != 0) return std::bit_cast<float>(sign | ((exp + 112) << 23) | (mant << 13));
  // Subnormal half: mant * 2^-24, exact in float.
  const float magnitude = std::ldexp(static_cast<float>(mant), -24);
  return sign ? -magnitude : magnitude;
}

float f8e4m3_bits_to_f32(std::uint8_t bits) {
  const bool negative = bits & 0x80u;
  const int exp = (bits >> 3) & 0xf;
  const int mant = bits & 0x7;
  if (exp == 0xf && mant == 0x7) return std::numeric_limits<float>::quiet_NaN();
  // Bias 7; exponent field 0 holds subnormals m/8 * 2^-6 (OCP OFP8 spec, E4M3).
  const float magnitude =
      exp == 0 ? std::ldexp(static_cast<float>(mant), -9) : std::ldexp(1.0f + mant / 8.0f, exp - 7);
  return negative ? -magnitude : magnitude;
}

float f8e5m2_bits_to_f32(std::uint8_t bits) {
  // E5M2 is the top byte of an IEEE half.
  return f16_bits_to_f32(static_cast<std::uint16_t>(bits) << 8);
}

std::size_t first_non_finite(std::span<const float> values) {
  // Blocks with a branch-free test of the exponent bits (all ones: infinity or NaN), which the
  // compiler vectorizes; only a block that holds one is searched again element by element.
  constexpr std::size_t kBlock = 1024;
  const std::size_t n = values.size();
  for (std::size_t begin = 0; begin < n; begin += kBlock) {
    const std::size_t end = std::min(n, begin + kBlock);
    bool any = false;
    for (std::size_t i = begin; i < end; ++i) {
      any |= (std::bit_cast<std::uint32_t>(values[i]) & 0x7f800000u) == 0x7f800000u;
    }
    if (!any) continue;
    for (std::size_t i = begin; i < end; ++i) {
      if (!std::isfinite(values[i])) return i;
    }
  }
  return n;
}

void require_finite(std::span<const float> values, std::string_view what) {
  const std::size_t i = first_non_finite(values);
  PQ_CHECK(i == values.size(), "{} holds a non-finite value ({} at element {} of {})", what,
           values[i], i, values.size());
}

void require_finite_bf16(std::span<const std::uint16_t> values, std::string_view what) {
  const auto bad = std::find_if(values.begin(), values.end(),
                                [](std::uint16_t v) { return (v & 0x7f80u) == 0x7f80u; });
  if (bad == values.end()) return;
  const auto i = static_cast<std::size_t>(bad - values.begin());
  fail("{} holds a non-finite value ({} at element {} of {})", what,
       std::bit_cast<float>(static_cast<std::uint32_t>(*bad) << 16), i, values.size());
}

namespace {

// Every value of an 8-bit float, decoded once by the scalar conversion: an FP8 checkpoint's
// weights are decoded by table lookup (a Qwen3-30B-A3B-FP8 layer holds 600 million of them, and
// the exponent arithmetic per element was a quarter of the KL-Fisher pass's render step).
using Fp8Table = std::array<float, 256>;
Fp8Table fp8_table(float (*decode)(std::uint8_t)) {
  Fp8Table table;
  for (int bits = 0; bits < 256; ++bits) table[bits] = decode(static_cast<std::uint8_t>(bits));
  return table;
}

}  // namespace

void decode_to_f32(DType dtype, std::span<const std::uint8_t> bytes, std::span<float> out) {
  const std::size_t size = dtype_size(dtype);
  PQ_CHECK(bytes.size() == out.size() * size, "decode_to_f32: {} bytes for {} {} elements",
           bytes.size(), out.size(), dtype_name(dtype));
  const std::uint8_t* p = bytes.data();
  const std::size_t n = out.size();
  switch (dtype) {
    case DType::F64:
      for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<float>(load<double>(p + 8 * i));
      return;
    case DType::F32:
      std::memcpy(out.data(), p, n * 4);
      return;
    case DType::F16:
      for (std::size_t i = 0; i < n; ++i) out[i] = f16_bits_to_f32(load<std::uint16_t>(p + 2 * i));
      return;
    case DType::BF16:
      for (std::size_t i = 0; i < n; ++i) out[i] = bf16_bits_to_f32(load<std::uint16_t>(p + 2 * i));
      return;
    case DType::F8_E4M3: {
      static const Fp8Table e4m3 = fp8_table(f8e4m3_bits_to_f32);
      for (std::size_t i = 0; i < n; ++i) out[i] = e4m3[p[i]];
      return;
    }
    case DType::F8_E5M2: {
      static const Fp8Table e5m2 = fp8_table(f8e5m2_bits_to_f32);
      for (std::size_t i = 0; i < n; ++i) out[i] = e5m2[p[i]];
      return;
    }
    default:
      fail("decode_to_f32: {} is not a floating-point dtype", dtype_name(dtype));
  }
}

}  // namespace pq::io
