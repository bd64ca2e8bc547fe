// The simulated FP8 KV cache (runtime::Fp8KvCache) and the observer's view of what attention
// layers cache.
#include "runtime/kv_cache.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <map>
#include <set>
#include <span>
#include <vector>

#include "common/error.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "model/model_spec.h"
#include "runtime/model.h"
#include "runtime/tiny_models.h"
#include "support/test_support.h"

namespace pq::runtime {
namespace {

// E4M3 has 3 mantissa bits: between 1 and 2 its step is 0.125, between 256 and 448 it is 32.
// Ties go to the even code, beyond 448 it saturates (vLLM's __NV_SATFINITE conversion).
TEST(Fp8KvCache, RoundTripIsNearestEvenE4m3OfTheScaledValueSaturated) {
  const float scale = 0.5f;
  std::vector<float> values = {1.0f, 1.0625f, 1.1875f, -1.2f, 300.0f, 1000.0f, -1e6f, 0.0f};
  for (float& v : values) v *= scale;
  Fp8KvCache::round_trip(values, scale);
  const std::vector<float> expected = {1.0f, 1.0f, 1.25f, -1.25f, 288.0f, 448.0f, -448.0f, 0.0f};
  ASSERT_EQ(values.size(), expected.size());
  for (std::size_t i = 0; i < values.size(); ++i) EXPECT_EQ(values[i], expected[i] * scale) << i;
}

TEST(Fp8KvCache, ScaleMapsAmaxToE4m3Maximum) {
  EXPECT_EQ(fp8_kv_cache_scale(448.0f), 1.0f);
  EXPECT_EQ(fp8_kv_cache_scale(22.4f), 22.4f / 448.0f);
  EXPECT_THROW(fp8_kv_cache_scale(0.0f), Error);
  EXPECT_THROW(fp8_kv_cache_scale(std::numeric_limits<float>::quiet_NaN()), Error);
  EXPECT_THROW(Fp8KvCache({{0, {1.0f, -1.0f}}}), Error);
}

// Largest |key| and |value| cached per layer, and the width each layer reports.
class KvAmax final : public LinearObserver {
 public:
  void on_linear(const LinearActivity&) override {}
  void on_kv_cache(const KvCacheActivity& kv) override {
    auto& [key, value] = amax[kv.layer];
    for (std::int64_t i = 0; i < kv.rows * kv.width; ++i) {
      key = std::max(key, std::abs(kv.keys[i]));
      value = std::max(value, std::abs(kv.values[i]));
    }
    width[kv.layer] = kv.width;
  }
  std::map<std::int64_t, std::pair<float, float>> amax;
  std::map<std::int64_t, std::int64_t> width;
};

// The FP8 cache built from a forward pass's amax per layer.
Fp8KvCache cache_from(const KvAmax& observed) {
  std::map<std::int64_t, KvCacheScales> scales;
  for (const auto& [layer, amax] : observed.amax) {
    scales[layer] = {fp8_kv_cache_scale(amax.first), fp8_kv_cache_scale(amax.second)};
  }
  return Fp8KvCache(scales);
}

// Max |a - b| and max |a| over two logit vectors.
std::pair<double, double> max_difference(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0.0, magnitude = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, static_cast<double>(std::abs(a[i] - b[i])));
    magnitude = std::max(magnitude, static_cast<double>(std::abs(a[i])));
  }
  return {diff, magnitude};
}

// Decoding with the cache (Model::extend) quantizes each token's keys and values as the full
// forward does: the FP8 cache is elementwise under static scales, so both give the same logits,
// and those differ from the bf16 cache's.
TEST(Fp8KvCache, CachedDecodingMatchesTheFullForwardAndDiffersFromNoQuantization) {
  synthetic::TinyModel tiny =
      synthetic::make_tiny_model(synthetic::tiny_config("Qwen3ForCausalLM", {}), 77, 0.3f);
  std::vector<std::int32_t> tokens;
  for (int t = 0; t < 12; ++t) tokens.push_back((t * 13 + 5) % 40);
  Model plain(tiny.config, tiny.weights, {.keep_layers_resident = true});
  KvAmax observed;
  std::vector<Sequence> batch = {{tokens, {}}};
  plain.forward(
      batch, [](std::int64_t, const float*, std::int64_t) {}, &observed);
  ASSERT_EQ(static_cast<std::int64_t>(observed.amax.size()), tiny.config.num_hidden_layers);
  const Fp8KvCache cache = cache_from(observed);
  Model quantized(tiny.config, tiny.weights, {.kv_cache = &cache, .keep_layers_resident = true});
  const std::vector<float> full = quantized.logits(tokens);
  const std::vector<float> unquantized = plain.logits(tokens);
  DecodeState state;
  std::vector<float> cached;
  for (std::size_t t = 0; t < tokens.size(); t += 4) {
    const auto logits = quantized.extend(state, std::span(tokens).subspan(t, 4));
    cached.insert(cached.end(), logits.begin(), logits.end());
  }
  ASSERT_EQ(cached.size(), full.size());
  const auto [max_diff, max_logit] = max_difference(full, cached);
  const double effect = max_difference(full, unquantized).first;
  EXPECT_LE(max_diff, 1e-5 * max_logit);
  EXPECT_GT(effect, 100 * max_diff);
}

// Gemma 4 caches on both layer types, each with its own geometry (sliding: head_dim and
// num_key_value_heads; full: global_head_dim and, with attention_k_eq_v, the full layers' KV heads
// and V = v_norm(k_proj x)), as vLLM's Gemma4Attention gives its Attention (gemma4.py, read at
// 001cabc1be16). The FP8 cache applies on every layer of the full forward and of cached decoding.
// (The two paths' logits are not compared under the FP8 cache: their float32 attention sums
// differ in the last bits, which flips isolated E4M3 roundings, measured 0.052 of a largest logit
// 10.6 over 24 tokens against the cache's own effect 0.58; without the cache they agree to 1e-6,
// Gemma4Fixture.CachedDecodingMatchesFullForward.)
TEST(Fp8KvCache, Gemma4CachesOnEveryLayerWithItsOwnGeometry) {
  PQ_REQUIRE_SHARED();
  const auto dir = test::shared_dir() / "models" / "gemma4-tiny-random";
  const auto checkpoint = io::Checkpoint::open(dir);
  const CheckpointWeightSource weights(checkpoint);
  const auto config = model::ModelConfig::load(dir);
  const model::ModelSpec spec = model::load_model_spec(dir);
  ASSERT_TRUE(config.gemma4.has_value());
  Model plain(config, weights, {.keep_layers_resident = true});
  KvAmax observed;
  std::vector<std::int32_t> tokens;
  for (int t = 0; t < 24; ++t) tokens.push_back((t * 7919 + 11) % 500);
  std::vector<Sequence> batch = {{tokens, {}}};
  plain.forward(
      batch, [](std::int64_t, const float*, std::int64_t) {}, &observed);
  const auto modules = spec.kv_cache_modules();
  ASSERT_EQ(static_cast<std::int64_t>(modules.size()), config.num_hidden_layers);
  ASSERT_EQ(observed.amax.size(), modules.size());
  std::set<model::LayerType> types;
  for (const auto& [layer, module] : modules) {
    ASSERT_TRUE(observed.amax.contains(layer)) << module;
    EXPECT_EQ(observed.width.at(layer),
              config.attention_key_value_heads(layer) * config.attention_head_dim(layer))
        << module;
    types.insert(config.layer_types.at(layer));
  }
  EXPECT_EQ(types.size(), 2u);  // sliding and full layers both cache

  // Full forward: rounding the cache of either layer type alone changes the logits.
  const Fp8KvCache cache = cache_from(observed);
  const std::vector<float> unquantized = plain.logits(tokens);
  for (const model::LayerType type :
       {model::LayerType::kSlidingAttention, model::LayerType::kFullAttention}) {
    std::map<std::int64_t, KvCacheScales> scales;
    for (const auto& [layer, layer_scales] : cache.layers()) {
      if (config.layer_types.at(layer) == type) scales[layer] = layer_scales;
    }
    const Fp8KvCache partial(scales);
    Model model(config, weights, {.kv_cache = &partial, .keep_layers_resident = true});
    const auto [effect, max_logit] = max_difference(model.logits(tokens), unquantized);
    EXPECT_GT(effect, 1e-3 * max_logit) << static_cast<int>(type);
  }

  // Cached decoding: every key and value a layer keeps is its FP8 round trip under that layer's
  // scales (a fixed point of it), which the bf16 cache's are not.
  const auto decode = [&](Model& model) {
    DecodeState state;
    std::size_t begin = 0;
    for (const std::size_t length : {5, 1, 1, 4, 13}) {
      model.extend(state, std::span(tokens).subspan(begin, length));
      begin += length;
    }
    return state;
  };
  const auto fixed_points = [](std::vector<float> values, float scale) {
    const std::vector<float> stored = values;
    Fp8KvCache::round_trip(values, scale);
    return values == stored;
  };
  Model quantized(config, weights, {.kv_cache = &cache, .keep_layers_resident = true});
  const DecodeState fp8 = decode(quantized);
  const DecodeState bf16 = decode(plain);
  for (const auto& [layer, scales] : cache.layers()) {
    const std::size_t size = tokens.size() * static_cast<std::size_t>(observed.width.at(layer));
    ASSERT_EQ(fp8.keys.at(layer).size(), size) << layer;
    ASSERT_EQ(fp8.values.at(layer).size(), size) << layer;
    EXPECT_TRUE(fixed_points(fp8.keys[layer], scales.key)) << layer;
    EXPECT_TRUE(fixed_points(fp8.values[layer], scales.value)) << layer;
    EXPECT_FALSE(fixed_points(bf16.keys.at(layer), scales.key)) << layer;
    EXPECT_FALSE(fixed_points(bf16.values.at(layer), scales.value)) << layer;
  }
  // Layer 0 sees the same inputs either way: its FP8 cache is the round trip of the bf16 one.
  std::vector<float> expected = bf16.keys.at(0);
  Fp8KvCache::round_trip(expected, cache.scales(0)->key);
  EXPECT_EQ(fp8.keys.at(0), expected);
}

// Gated DeltaNet layers have no KV cache: on the hybrid Qwen3.5 checkpoint only the full-attention
// layers report one, exactly the layers of ModelSpec::kv_cache_modules.
TEST(Fp8KvCache, HybridModelCachesOnlyOnFullAttentionLayers) {
  PQ_REQUIRE_SHARED();
  const auto dir = test::shared_dir() / "models" / "qwen3_5-tiny-random";
  const auto checkpoint = io::Checkpoint::open(dir);
  const CheckpointWeightSource weights(checkpoint);
  const auto config = model::ModelConfig::load(dir);
  const model::ModelSpec spec = model::load_model_spec(dir);
  Model model(config, weights);
  KvAmax observed;
  std::vector<std::int32_t> tokens;
  for (int t = 0; t < 16; ++t) tokens.push_back((t * 7919 + 11) % 200);
  std::vector<Sequence> batch = {{tokens, {}}};
  model.forward(
      batch, [](std::int64_t, const float*, std::int64_t) {}, &observed);
  const auto modules = spec.kv_cache_modules();
  ASSERT_EQ(observed.amax.size(), modules.size());
  EXPECT_LT(static_cast<std::int64_t>(modules.size()), config.num_hidden_layers);
  for (const auto& [layer, module] : modules) {
    EXPECT_TRUE(observed.amax.contains(layer)) << module;
    EXPECT_EQ(config.layer_types.at(layer), model::LayerType::kFullAttention) << module;
  }
}

}  // namespace
}  // namespace pq::runtime
