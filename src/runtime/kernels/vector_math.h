#pragma once

#include <span>

namespace pq::runtime {

// Elementwise math for the runtime's softmax and SwiGLU loops: AVX-512 where the CPU has it
// (results within 4 ulp of libm for arguments of exp in [-87, 88]; beyond, exp underflows to 0
// and saturates at e^88.7), libm otherwise and under PQ_FORCE_SCALAR=1.

// x[i] = exp(x[i] - shift) for every i; returns the sum of the results, accumulated in double.
// Runs on the calling thread (meant for one softmax row inside a parallel loop).
double exp_shifted_sum(std::span<float> x, float shift);

// y[i] = 1 / (1 + exp(-x[i])); x and y may be the same array. Parallel over large arrays.
void sigmoid(std::span<const float> x, std::span<float> y);

}  // namespace pq::runtime
