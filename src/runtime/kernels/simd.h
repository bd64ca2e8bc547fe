#pragma once

// Kernels compiled with ISA flags (see CMakeLists.txt). Only call the avx512 ones after
// pq::cpu_features().has_avx512_core() returned true, the avx2 ones after has_avx2_fma().

#include <cstddef>
#include <cstdint>

namespace pq::runtime::avx512 {

void convert_f32_to_bf16(const float* in, std::uint16_t* out, std::size_t n);
void convert_bf16_to_f32(const std::uint16_t* in, float* out, std::size_t n);

// Attention tile primitives; attention.cpp documents them next to their scalar versions.
void tile_gemm(std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a,
               std::int64_t a_row_stride, std::int64_t a_col_stride, const float* b,
               std::int64_t ldb, float* c, std::int64_t ldc);
float exp_shifted(float* x, std::int64_t n, float shift);

// Elementwise math behind vector_math.h.
double exp_shifted_sum(float* x, std::int64_t n, float shift);
void sigmoid(const float* x, float* y, std::int64_t n);

}  // namespace pq::runtime::avx512

namespace pq::runtime::avx2 {

// The same primitives for AVX2 + FMA3 CPUs without AVX-512 (AMD Zen 1-3, Intel before Skylake-SP
// and client parts), 8 lanes wide.
void tile_gemm(std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a,
               std::int64_t a_row_stride, std::int64_t a_col_stride, const float* b,
               std::int64_t ldb, float* c, std::int64_t ldc);
float exp_shifted(float* x, std::int64_t n, float shift);
double exp_shifted_sum(float* x, std::int64_t n, float shift);
void sigmoid(const float* x, float* y, std::int64_t n);

}  // namespace pq::runtime::avx2
