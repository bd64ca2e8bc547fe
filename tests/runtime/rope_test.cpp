#include "runtime/rope.h"

#include <gtest/gtest.h>

#include <cmath>
#include <numbers>
#include <random>

#include "common/error.h"
#include "runtime/model.h"
#include "runtime/tiny_models.h"

namespace pq::runtime {
namespace {

model::ModelConfig config_with_rope(const nlohmann::json& rope_scaling) {
  return model::ModelConfig::from_json(
      synthetic::tiny_config("LlamaForCausalLM", {{"head_dim", 128},
                                                  {"rope_theta", 500000.0},
                                                  {"max_position_embeddings", 131072},
                                                  {"rope_scaling", rope_scaling}}),
      "rope test");
}

TEST(Rope, DefaultAndLinearFrequencies) {
  const auto plain = rope_frequencies(config_with_rope(nullptr), 16);
  ASSERT_EQ(plain.inv_freq.size(), 64u);
  EXPECT_DOUBLE_EQ(plain.inv_freq[0], 1.0);
  EXPECT_NEAR(plain.inv_freq[32], std::pow(500000.0, -0.5), 1e-15);
  const auto linear = rope_frequencies(config_with_rope({{"type", "linear"}, {"factor", 4.0}}), 16);
  for (std::size_t i = 0; i < 64; ++i) EXPECT_DOUBLE_EQ(linear.inv_freq[i], plain.inv_freq[i] / 4);
}

// Llama 3.1's scaling (factor 8, low/high_freq_factor 1/4, original context 8192): wavelengths
// below 8192/4 keep their frequency, above 8192/1 are slowed by 8, in between interpolated.
TEST(Rope, Llama3KeepsHighFrequenciesAndSlowsLowOnes) {
  const auto plain = rope_frequencies(config_with_rope(nullptr), 16);
  const auto scaled =
      rope_frequencies(config_with_rope({{"rope_type", "llama3"},
                                         {"factor", 8.0},
                                         {"low_freq_factor", 1.0},
                                         {"high_freq_factor", 4.0},
                                         {"original_max_position_embeddings", 8192}}),
                       16);
  int kept = 0, slowed = 0, blended = 0;
  for (std::size_t i = 0; i < 64; ++i) {
    const double wavelength = 2 * std::numbers::pi / plain.inv_freq[i];
    if (wavelength < 8192.0 / 4) {
      EXPECT_DOUBLE_EQ(scaled.inv_freq[i], plain.inv_freq[i]);
      ++kept;
    } else if (wavelength > 8192.0) {
      EXPECT_DOUBLE_EQ(scaled.inv_freq[i], plain.inv_freq[i] / 8);
      ++slowed;
    } else {
      EXPECT_LT(scaled.inv_freq[i], plain.inv_freq[i]);
      EXPECT_GT(scaled.inv_freq[i], plain.inv_freq[i] / 8);
      ++blended;
    }
  }
  EXPECT_GT(kept, 0);
  EXPECT_GT(slowed, 0);
  EXPECT_GT(blended, 0);
}

TEST(Rope, DynamicChangesOnlyBeyondTheTrainedContext) {
  const auto config = config_with_rope({{"type", "dynamic"}, {"factor", 2.0}});
  const auto plain = rope_frequencies(config_with_rope(nullptr), 16);
  EXPECT_EQ(rope_frequencies(config, 1000).inv_freq, plain.inv_freq);
  // base' = base * (factor * L / max - (factor - 1))^(dim / (dim - 2)), L = 2 * max here.
  const auto longer = rope_frequencies(config, 2 * 131072);
  const double base = 500000.0 * std::pow(3.0, 128.0 / 126.0);
  EXPECT_NEAR(longer.inv_freq[1] / std::pow(base, -2.0 / 128), 1.0, 1e-12);
}

TEST(Rope, YarnAttentionFactorAndFrequencyBlend) {
  const auto plain = rope_frequencies(config_with_rope(nullptr), 16);
  const auto yarn =
      rope_frequencies(config_with_rope({{"rope_type", "yarn"}, {"factor", 4.0}}), 16);
  EXPECT_NEAR(yarn.attention_factor, 0.1 * std::log(4.0) + 1.0, 1e-12);
  EXPECT_DOUBLE_EQ(yarn.inv_freq[0], plain.inv_freq[0]);          // fastest: extrapolated
  EXPECT_NEAR(yarn.inv_freq[63], plain.inv_freq[63] / 4, 1e-18);  // slowest: interpolated
}

TEST(Rope, BackwardIsTheInverseRotation) {
  const auto config = config_with_rope(nullptr);
  const RopeTable table(config, 8);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<float> x(8 * 2 * 128);
  for (float& v : x) v = normal(rng);
  std::vector<float> y = x;
  table.apply(y.data(), 8, 2, 0);
  double changed = 0.0;
  for (std::size_t i = 0; i < x.size(); ++i)
    changed = std::max(changed, double(std::abs(y[i] - x[i])));
  EXPECT_GT(changed, 0.1);
  table.apply_backward(y.data(), 8, 2, 0);
  for (std::size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(y[i], x[i], 1e-5);
}

// The hybrid families rotate the first head_dim * partial_rotary_factor dims of each head,
// pairing i with i + rotary_dim / 2 at frequencies base^(-2i / rotary_dim); the rest pass through
// (facts §5 step 3).
TEST(Rope, PartialRotaryOfTheHybridFamilies) {
  auto json = synthetic::tiny_config(
      "Qwen3NextForCausalLM",
      {{"model_type", "qwen3_next"}, {"head_dim", 16}, {"partial_rotary_factor", 0.25}});
  const model::ModelConfig config = model::ModelConfig::from_json(json, "x");
  EXPECT_EQ(rotary_dim(config), 4);
  const RopeFrequencies freqs = rope_frequencies(config, 8);
  ASSERT_EQ(freqs.inv_freq.size(), 2u);
  EXPECT_NEAR(freqs.inv_freq[1], std::pow(config.rope_theta, -0.5), 1e-12);
  const RopeTable table(config, 8);
  std::vector<float> x(16), y(16);
  for (int i = 0; i < 16; ++i) x[i] = static_cast<float>(i + 1);
  y = x;
  table.apply(y.data(), 1, 1, 5);
  for (int i = 0; i < 2; ++i) {
    const double angle = 5.0 * freqs.inv_freq[i];
    EXPECT_NEAR(y[i], x[i] * std::cos(angle) - x[i + 2] * std::sin(angle), 1e-5);
    EXPECT_NEAR(y[i + 2], x[i + 2] * std::cos(angle) + x[i] * std::sin(angle), 1e-5);
  }
  for (int i = 4; i < 16; ++i) EXPECT_EQ(y[i], x[i]);
}

TEST(Rope, RefusesPartialRotary) {
  auto json = synthetic::tiny_config("LlamaForCausalLM", {{"partial_rotary_factor", 0.5}});
  EXPECT_THROW(rope_frequencies(model::ModelConfig::from_json(json, "x"), 4), Error);
}

// Misshapen or missing tensors are one-line errors naming the tensor.
TEST(ModelLoading, ErrorsNameTheTensor) {
  auto tiny = synthetic::make_tiny_model(synthetic::tiny_config("LlamaForCausalLM"), 1);
  tiny.weights.set("model.layers.1.mlp.up_proj.weight", {3, 16}, std::vector<float>(48));
  Model model(tiny.config, tiny.weights);
  try {
    model.logits(std::vector<std::int32_t>{1, 2});
    FAIL() << "expected pq::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.1.mlp.up_proj.weight"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(model.logits(std::vector<std::int32_t>{1, 40}), Error);  // id >= vocab
  auto qwen3 = synthetic::tiny_config("Qwen3ForCausalLM");
  auto llama_weights = synthetic::make_tiny_model(synthetic::tiny_config("LlamaForCausalLM"), 1);
  Model without_qk_norm(model::ModelConfig::from_json(qwen3, "qwen3"), llama_weights.weights);
  EXPECT_THROW(without_qk_norm.logits(std::vector<std::int32_t>{1}), Error);
  auto gelu = synthetic::tiny_config("LlamaForCausalLM", {{"hidden_act", "gelu"}});
  EXPECT_THROW(Model(model::ModelConfig::from_json(gelu, "gelu"), llama_weights.weights), Error);
  auto gpt2 = synthetic::tiny_config("GPT2LMHeadModel");
  EXPECT_THROW(Model(model::ModelConfig::from_json(gpt2, "gpt2"), llama_weights.weights), Error);
}

}  // namespace
}  // namespace pq::runtime
