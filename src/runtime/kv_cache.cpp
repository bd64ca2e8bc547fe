// The FP8 key/value cache of vLLM, simulated for the KL measurements.
#include "runtime/kv_cache.h"

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/error.h"
#include "formats/element.h"

namespace pq::runtime {

float fp8_kv_cache_scale(float amax) {
  PQ_CHECK(std::isfinite(amax) && amax > 0.0f,
           "an FP8 KV cache scale needs a positive finite amax, got {}", amax);
  return amax / formats::element_info(formats::ElementType::E4M3).max_finite;
}

Fp8KvCache::Fp8KvCache(std::map<std::int64_t, KvCacheScales> scales) : scales_(std::move(scales)) {
  for (const auto& [layer, s] : scales_) {
    PQ_CHECK(std::isfinite(s.key) && s.key > 0.0f && std::isfinite(s.value) && s.value > 0.0f,
             "layer {}: FP8 KV cache scales must be positive and finite (k_scale {}, v_scale {})",
             layer, s.key, s.value);
  }
}

const KvCacheScales* Fp8KvCache::scales(std::int64_t layer) const {
  const auto it = scales_.find(layer);
  return it == scales_.end() ? nullptr : &it->second;
}

void Fp8KvCache::round_trip(std::span<float> values, float scale) {
  std::vector<std::uint8_t> codes(values.size());
  for (float& v : values) v /= scale;
  formats::encode_elements(formats::ElementType::E4M3, values, codes);
  formats::decode_elements(formats::ElementType::E4M3, codes, values);
  for (float& v : values) v *= scale;
}

}  // namespace pq::runtime
