#pragma once

#include <cstdint>
#include <map>
#include <span>

namespace pq::runtime {

// Per-tensor scales of one attention layer's FP8 key/value cache: what vLLM loads as
// `<layer>.self_attn.k_scale` / `.v_scale` (BaseKVCacheMethod, vllm/model_executor/layers/
// quantization/kv_cache.py) and divides keys and values by before storing them as E4M3.
struct KvCacheScales {
  float key = 1.0f;
  float value = 1.0f;
};

// The scale of an FP8 (E4M3) KV cache for keys or values of largest magnitude `amax`, so that
// amax maps to E4M3's largest finite value 448: scale = amax / 448 (float32). pq::Error unless
// amax is positive and finite.
float fp8_kv_cache_scale(float amax);

// vLLM's FP8 KV cache (`--kv-cache-dtype fp8` with scales from the checkpoint), simulated: each key
// (value) an attention layer stores is replaced by e4m3(x / scale) * scale, the value its
// attention reads back. vLLM stores round-to-nearest-even E4M3 of x / scale saturated at +-448
// (csrc/quantization/w8a8/fp8/nvidia/quant_utils.cuh scaled_vec_conversion:
// __nv_cvt_float_to_fp8(a / scale, __NV_SATFINITE, ...)) and multiplies by the scale when it
// reads the cache. Layers without scales (Gated DeltaNet layers, which have no KV cache) are left
// alone.
class Fp8KvCache {
 public:
  explicit Fp8KvCache(std::map<std::int64_t, KvCacheScales> scales);
  // The scales of decoder layer `layer`, or null when its cache is not quantized.
  const KvCacheScales* scales(std::int64_t layer) const;
  const std::map<std::int64_t, KvCacheScales>& layers() const { return scales_; }
  // values <- e4m3(values / scale) * scale, in place.
  static void round_trip(std::span<float> values, float scale);

 private:
  std::map<std::int64_t, KvCacheScales> scales_;
};

}  // namespace pq::runtime
