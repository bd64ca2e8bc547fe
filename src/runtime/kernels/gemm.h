#pragma once

#include <cstdint>
#include <span>

namespace pq::runtime {

// Whether a GEMM operand is used as stored or transposed.
enum class Transpose : bool { kNo, kYes };

// All GEMMs are row-major: op(A) is [m, k], op(B) is [k, n], C is [m, n], and
// C = alpha * op(A) * op(B) + beta * C. lda/ldb/ldc are the row strides (in elements) of A, B and C
// as stored. beta == 0 overwrites C without reading it (NaNs in C do not propagate).
//
// The runtime's Linear maps onto these as
//   forward  y[T, out] = x[T, in] W^T   -> gemm(kNo, kYes, T, out, in, 1, x, in, W, in, 0, y, out)
//   dX[T, in]  = dY[T, out] W           -> gemm(kNo, kNo, T, in, out, 1, dY, out, W, in, 0, dX, in)
//   dW[out, in] = dY^T X                -> gemm(kYes, kNo, out, in, T, 1, dY, out, x, in, b, dW,
//   in)

// fp32 GEMM, multi-threaded with OpenMP: a cached oneDNN matmul primitive per shape on AVX-512
// CPUs (brgemm kernels), OpenBLAS sgemm elsewhere (and under PQ_FORCE_SCALAR=1).
void gemm_f32(Transpose ta, Transpose tb, std::int64_t m, std::int64_t n, std::int64_t k,
              float alpha, const float* a, std::int64_t lda, const float* b, std::int64_t ldb,
              float beta, float* c, std::int64_t ldc);

// bf16 inputs (raw bit patterns), fp32 accumulation and fp32 C. Uses a cached oneDNN matmul
// primitive per shape (AMX or AVX512-BF16 brgemm where the CPU has them); on CPUs without
// AVX-512 (or with PQ_FORCE_SCALAR=1) the inputs are widened to fp32 and multiplied by gemm_f32,
// which computes the same exact products.
void gemm_bf16(Transpose ta, Transpose tb, std::int64_t m, std::int64_t n, std::int64_t k,
               float alpha, const std::uint16_t* a, std::int64_t lda, const std::uint16_t* b,
               std::int64_t ldb, float beta, float* c, std::int64_t ldc);

// The Gram matrix of A's columns, upper triangle only: C[i, j] = alpha * (A^T A)[i, j] +
// beta * C[i, j] for i <= j, where A is [k, n] row-major with row stride lda and C is [n, n] with
// row stride ldc; C's strict lower triangle is neither read nor written (mirror it with
// mirror_upper_triangle). Half a GEMM's arithmetic: OpenBLAS ssyrk, multi-threaded with OpenMP;
// the same Hessian 1.8x (in 2048) to 2.8x (in 6144) sooner than the full product by gemm_f32 at
// 4096 tokens on 2 AVX-512 cores (bench_gemm BM_Hessian*).
void gram_upper_f32(std::int64_t n, std::int64_t k, float alpha, const float* a, std::int64_t lda,
                    float beta, float* c, std::int64_t ldc);

// Copies the upper triangle of the [n, n] matrix c (row stride ldc) onto its lower triangle.
void mirror_upper_triangle(std::int64_t n, float* c, std::int64_t ldc);

// Scalar reference with double accumulation; slow, for tests.
void gemm_reference(Transpose ta, Transpose tb, std::int64_t m, std::int64_t n, std::int64_t k,
                    float alpha, const float* a, std::int64_t lda, const float* b, std::int64_t ldb,
                    float beta, float* c, std::int64_t ldc);

// fp32 -> bf16 with round-to-nearest-even; NaNs stay NaN (quiet), infinities and subnormals are
// rounded like any other value. in and out must have the same size.
void convert_f32_to_bf16(std::span<const float> in, std::span<std::uint16_t> out);

// bf16 -> fp32 (exact). in and out must have the same size.
void convert_bf16_to_f32(std::span<const std::uint16_t> in, std::span<float> out);

}  // namespace pq::runtime
