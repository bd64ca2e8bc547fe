#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>

namespace pq::io {

// The element types a safetensors file may hold, named as the format names them (the `Dtype` enum
// in huggingface/safetensors safetensors/src/tensor.rs; every one is little-endian).
enum class DType : std::uint8_t {
  F64,
  F32,
  F16,
  BF16,
  F8_E4M3,
  F8_E5M2,
  I64,
  I32,
  I16,
  I8,
  U8,
  BOOL,
  U64,
  U32,
  U16,
};

// Every DType, in enum order (for tests and tools that iterate them).
inline constexpr DType kAllDTypes[] = {DType::F64,     DType::F32,     DType::F16, DType::BF16,
                                       DType::F8_E4M3, DType::F8_E5M2, DType::I64, DType::I32,
                                       DType::I16,     DType::I8,      DType::U8,  DType::BOOL,
                                       DType::U64,     DType::U32,     DType::U16};

std::string_view dtype_name(DType dtype);
std::optional<DType> parse_dtype(std::string_view name);
std::size_t dtype_size(DType dtype);
bool dtype_is_float(DType dtype);

// Exact widening of stored floating-point elements to float32. F64 is narrowed with round to
// nearest even. Throws pq::Error for non-float dtypes.
void decode_to_f32(DType dtype, std::span<const std::uint8_t> bytes, std::span<float> out);

// The index of the first NaN or infinity in `values`, or values.size() when every value is
// finite. Decoding keeps every value; the readers of weights for computing (the runtime's
// CheckpointWeightSource, cost, export) check what they decode, for one more read of it, so a
// damaged checkpoint stops with the tensor's name instead of becoming NaN results (issue 13).
std::size_t first_non_finite(std::span<const float> values);

// Throws pq::Error naming `what` (a tensor, a layer's output) and the first non-finite element.
void require_finite(std::span<const float> values, std::string_view what);
// The same for bfloat16 bit patterns (non-finite: every exponent bit set).
void require_finite_bf16(std::span<const std::uint16_t> values, std::string_view what);

// Scalar conversions used by decode_to_f32; exact (every input value is representable in f32).
float bf16_bits_to_f32(std::uint16_t bits);
float f16_bits_to_f32(std::uint16_t bits);
float f8e4m3_bits_to_f32(std::uint8_t bits);  // OCP E4M3 "fn": no infinities, S.1111.111 = NaN
float f8e5m2_bits_to_f32(std::uint8_t bits);  // IEEE-like: infinities and NaNs

}  // namespace pq::io
