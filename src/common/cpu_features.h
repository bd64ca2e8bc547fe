#pragma once

namespace pq {

// What the running CPU offers; kernels built with ISA flags are only entered when these say so.
struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512dq = false;
  bool avx512bf16 = false;
  bool amx_bf16 = false;

  // The AVX-512 subset our SIMD codecs are written for (F, BW, VL, DQ).
  bool has_avx512_core() const { return avx512f && avx512bw && avx512vl && avx512dq; }
  // The AVX2 + FMA3 kernels' requirement (every x86-64 CPU since Haswell and Zen 1).
  bool has_avx2_fma() const { return avx2 && fma; }
};

// Detected once; PQ_FORCE_SCALAR=1 in the environment disables every SIMD path (for tests and
// for comparing paths).
const CpuFeatures& cpu_features();

}  // namespace pq
