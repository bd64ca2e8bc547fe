#include <algorithm>
#include <bit>

#include "common/cpu_features.h"
#include "common/error.h"
#include "runtime/kernels/gemm.h"
#include "runtime/kernels/simd.h"

namespace pq::runtime {
namespace {

// Round-to-nearest-even on the 16 dropped bits: adding 0x7fff plus the lowest kept bit carries
// into the kept half exactly when the dropped half exceeds one half ulp, or equals it and the kept
// value is odd. NaNs are truncated and forced quiet so that no payload rounds to infinity.
std::uint16_t f32_to_bf16_scalar(float value) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x40u);
  return static_cast<std::uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// Conversions are memory-bound; below this many elements threads cost more than they save.
constexpr std::size_t kParallelThreshold = 1 << 16;
constexpr std::size_t kChunk = 1 << 14;

// Runs body(begin, count) over [0, n) in chunks, in parallel when n is large.
template <typename Body>
void for_chunks(std::size_t n, Body body) {
  if (n < kParallelThreshold) return body(std::size_t{0}, n);
  const auto chunks = static_cast<std::int64_t>((n + kChunk - 1) / kChunk);
#pragma omp parallel for schedule(static)
  for (std::int64_t c = 0; c < chunks; ++c) {
    const std::size_t begin = static_cast<std::size_t>(c) * kChunk;
    body(begin, std::min(kChunk, n - begin));
  }
}

}  // namespace

void convert_f32_to_bf16(std::span<const float> in, std::span<std::uint16_t> out) {
  PQ_CHECK(in.size() == out.size(), "convert_f32_to_bf16: {} inputs but {} outputs", in.size(),
           out.size());
  const bool simd = cpu_features().has_avx512_core();
  for_chunks(in.size(), [&](std::size_t begin, std::size_t count) {
    if (simd) return avx512::convert_f32_to_bf16(in.data() + begin, out.data() + begin, count);
    for (std::size_t i = begin; i < begin + count; ++i) out[i] = f32_to_bf16_scalar(in[i]);
  });
}

void convert_bf16_to_f32(std::span<const std::uint16_t> in, std::span<float> out) {
  PQ_CHECK(in.size() == out.size(), "convert_bf16_to_f32: {} inputs but {} outputs", in.size(),
           out.size());
  const bool simd = cpu_features().has_avx512_core();
  for_chunks(in.size(), [&](std::size_t begin, std::size_t count) {
    if (simd) return avx512::convert_bf16_to_f32(in.data() + begin, out.data() + begin, count);
    for (std::size_t i = begin; i < begin + count; ++i) {
      out[i] = std::bit_cast<float>(static_cast<std::uint32_t>(in[i]) << 16);
    }
  });
}

}  // namespace pq::runtime
