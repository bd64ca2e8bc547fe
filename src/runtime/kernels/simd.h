#pragma once

// Kernels compiled with AVX-512 flags (see CMakeLists.txt). Only call them after
// pq::cpu_features().has_avx512_core() returned true.

#include <cstddef>
#include <cstdint>

namespace pq::runtime::avx512 {

void convert_f32_to_bf16(const float* in, std::uint16_t* out, std::size_t n);
void convert_bf16_to_f32(const std::uint16_t* in, float* out, std::size_t n);

}  // namespace pq::runtime::avx512
