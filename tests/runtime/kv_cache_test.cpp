// The simulated FP8 KV cache (runtime::Fp8KvCache) and the observer's view of what attention
// layers cache.
#include "runtime/kv_cache.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <map>
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

// Largest |key| and |value| cached per layer.
class KvAmax final : public LinearObserver {
 public:
  void on_linear(const LinearActivity&) override {}
  void on_kv_cache(const KvCacheActivity& kv) override {
    auto& [key, value] = amax[kv.layer];
    for (std::int64_t i = 0; i < kv.rows * kv.width; ++i) {
      key = std::max(key, std::abs(kv.keys[i]));
      value = std::max(value, std::abs(kv.values[i]));
    }
  }
  std::map<std::int64_t, std::pair<float, float>> amax;
};

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
  std::map<std::int64_t, KvCacheScales> scales;
  for (const auto& [layer, amax] : observed.amax) {
    scales[layer] = {fp8_kv_cache_scale(amax.first), fp8_kv_cache_scale(amax.second)};
  }
  const Fp8KvCache cache(scales);
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
  double max_diff = 0.0, effect = 0.0, max_logit = 0.0;
  for (std::size_t i = 0; i < full.size(); ++i) {
    max_diff = std::max(max_diff, static_cast<double>(std::abs(full[i] - cached[i])));
    effect = std::max(effect, static_cast<double>(std::abs(full[i] - unquantized[i])));
    max_logit = std::max(max_logit, static_cast<double>(std::abs(full[i])));
  }
  EXPECT_LE(max_diff, 1e-5 * max_logit);
  EXPECT_GT(effect, 100 * max_diff);
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
