#include "runtime/tiny_models.h"

#include <fmt/format.h>

#include <random>

namespace pq::runtime::synthetic {

nlohmann::json tiny_config(const std::string& architecture, const nlohmann::json& overrides) {
  nlohmann::json c = {
      {"architectures", nlohmann::json::array({architecture})},
      {"hidden_size", 16},
      {"intermediate_size", 24},
      {"num_hidden_layers", 2},
      {"num_attention_heads", 4},
      {"num_key_value_heads", 2},
      {"head_dim", 4},
      {"vocab_size", 40},
      {"max_position_embeddings", 64},
      {"rms_norm_eps", 1e-5},
      {"rope_theta", 10000.0},
      {"tie_word_embeddings", false},
      {"hidden_act", "silu"},
  };
  if (architecture == "Qwen3MoeForCausalLM") {
    c["num_experts"] = 4;
    c["num_experts_per_tok"] = 2;
    c["moe_intermediate_size"] = 12;
    c["norm_topk_prob"] = true;
  }
  if (overrides.is_object()) c.merge_patch(overrides);
  return c;
}

TinyModel make_tiny_model(const nlohmann::json& config_json, std::uint32_t seed, float weight_std) {
  TinyModel m{config_json, model::ModelConfig::from_json(config_json, "tiny config"), {}};
  const model::ModelConfig& c = m.config;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const auto random = [&](const std::string& name, std::vector<std::int64_t> shape, float mean,
                          float stddev) {
    std::int64_t numel = 1;
    for (auto d : shape) numel *= d;
    std::vector<float> values(numel);
    for (float& v : values) v = mean + stddev * normal(rng);
    m.weights.set(name, std::move(shape), std::move(values));
  };
  const std::int64_t h = c.hidden_size;
  const std::int64_t q = c.num_attention_heads * c.head_dim;
  const std::int64_t kv = c.num_key_value_heads * c.head_dim;
  const bool qwen3 = c.architecture.rfind("Qwen3", 0) == 0;
  const bool qkv_bias = c.architecture == "Qwen2ForCausalLM" || c.attention_bias;
  random("model.embed_tokens.weight", {c.vocab_size, h}, 0.0f, 1.0f);
  random("model.norm.weight", {h}, 1.0f, 0.1f);
  if (!c.tie_word_embeddings) random("lm_head.weight", {c.vocab_size, h}, 0.0f, weight_std);
  const auto mlp = [&](const std::string& prefix, std::int64_t inter) {
    random(prefix + "gate_proj.weight", {inter, h}, 0.0f, weight_std);
    random(prefix + "up_proj.weight", {inter, h}, 0.0f, weight_std);
    random(prefix + "down_proj.weight", {h, inter}, 0.0f, weight_std);
  };
  for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    random(p + "input_layernorm.weight", {h}, 1.0f, 0.1f);
    random(p + "post_attention_layernorm.weight", {h}, 1.0f, 0.1f);
    random(p + "self_attn.q_proj.weight", {q, h}, 0.0f, weight_std);
    random(p + "self_attn.k_proj.weight", {kv, h}, 0.0f, weight_std);
    random(p + "self_attn.v_proj.weight", {kv, h}, 0.0f, weight_std);
    random(p + "self_attn.o_proj.weight", {h, q}, 0.0f, weight_std);
    if (qkv_bias) {
      random(p + "self_attn.q_proj.bias", {q}, 0.0f, weight_std);
      random(p + "self_attn.k_proj.bias", {kv}, 0.0f, weight_std);
      random(p + "self_attn.v_proj.bias", {kv}, 0.0f, weight_std);
    }
    if (qwen3) {
      random(p + "self_attn.q_norm.weight", {c.head_dim}, 1.0f, 0.1f);
      random(p + "self_attn.k_norm.weight", {c.head_dim}, 1.0f, 0.1f);
    }
    if (c.is_moe_layer(l)) {
      random(p + "mlp.gate.weight", {c.num_experts, h}, 0.0f, weight_std);
      for (std::int64_t e = 0; e < c.num_experts; ++e) {
        mlp(fmt::format("{}mlp.experts.{}.", p, e), c.moe_intermediate_size);
      }
    } else {
      mlp(p + "mlp.", c.intermediate_size);
    }
  }
  return m;
}

}  // namespace pq::runtime::synthetic
