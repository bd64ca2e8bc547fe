#include "common/cpu_features.h"

#include <cpuid.h>

#include <cstdlib>
#include <cstring>

namespace pq {
namespace {

CpuFeatures detect() {
  CpuFeatures f;
  const char* force_scalar = std::getenv("PQ_FORCE_SCALAR");
  if (force_scalar != nullptr && std::strcmp(force_scalar, "0") != 0) return f;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(1, 0, eax, ebx, ecx, edx);
  const bool osxsave = (ecx >> 27) & 1;
  const bool fma = (ecx >> 12) & 1;
  if (!osxsave) return f;
  // XCR0 tells whether the OS saves the wide registers (bits 1-2: SSE/AVX, 5-7: AVX-512,
  // 17-18: AMX tile state).
  unsigned xcr0_lo = 0, xcr0_hi = 0;
  __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool os_avx = (xcr0_lo & 0x6) == 0x6;
  const bool os_avx512 = os_avx && (xcr0_lo & 0xe0) == 0xe0;
  const bool os_amx = (xcr0_lo & 0x60000) == 0x60000;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  f.avx2 = os_avx && ((ebx >> 5) & 1);
  f.fma = os_avx && fma;
  f.avx512f = os_avx512 && ((ebx >> 16) & 1);
  f.avx512dq = os_avx512 && ((ebx >> 17) & 1);
  f.avx512bw = os_avx512 && ((ebx >> 30) & 1);
  f.avx512vl = os_avx512 && ((ebx >> 31) & 1);
  f.amx_bf16 = os_amx && ((edx >> 22) & 1);
  __cpuid_count(7, 1, eax, ebx, ecx, edx);
  f.avx512bf16 = os_avx512 && ((eax >> 5) & 1);
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

}  // namespace pq
