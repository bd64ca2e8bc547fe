#pragma once

// SIMD kernels of the Local-Hessian render, compiled with ISA flags (local_hessian_avx2.cpp: call
// only after cpu_features().has_avx2_fma()). Each gives exactly the bits of its scalar reference
// in local_hessian.cpp.

#include <cstddef>

namespace pq::exporter::simd {

// d^T B d for d [n] and an exactly symmetric row-major B [n, n], n a multiple of 4, at most 64.
double local_hessian_objective_avx2(const double* d, const double* block, std::size_t n);

}  // namespace pq::exporter::simd
