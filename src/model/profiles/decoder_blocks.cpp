#include "model/profiles/decoder_blocks.h"

namespace pq::model::profiles {

std::vector<TensorRule> decoder_norms_and_embedding() {
  return {
      {.name = "model.embed_tokens.weight",
       .role = "embedding",
       .shape = {"vocab_size", "hidden_size"}},
      {.name = "model.norm.weight", .role = "final_norm", .shape = {"hidden_size"}},
      {.name = "model.layers.{layer}.input_layernorm.weight",
       .role = "input_layernorm",
       .shape = {"hidden_size"}},
      {.name = "model.layers.{layer}.post_attention_layernorm.weight",
       .role = "post_attention_layernorm",
       .shape = {"hidden_size"}},
  };
}

std::vector<TensorRule> qk_norms() {
  return {
      {.name = "model.layers.{layer}.self_attn.q_norm.weight",
       .role = "q_norm",
       .shape = {"head_dim"}},
      {.name = "model.layers.{layer}.self_attn.k_norm.weight",
       .role = "k_norm",
       .shape = {"head_dim"}},
  };
}

std::vector<LinearRule> attention(RulePredicate qkv_bias, RulePredicate o_bias) {
  constexpr std::string_view kQkv = "model.layers.{layer}.self_attn.qkv_proj";
  return {
      {.module = "model.layers.{layer}.self_attn.q_proj",
       .role = "q_proj",
       .out_features = "num_attention_heads*head_dim",
       .in_features = "hidden_size",
       .group = kQkv,
       .has_bias = qkv_bias},
      {.module = "model.layers.{layer}.self_attn.k_proj",
       .role = "k_proj",
       .out_features = "num_key_value_heads*head_dim",
       .in_features = "hidden_size",
       .group = kQkv,
       .has_bias = qkv_bias},
      {.module = "model.layers.{layer}.self_attn.v_proj",
       .role = "v_proj",
       .out_features = "num_key_value_heads*head_dim",
       .in_features = "hidden_size",
       .group = kQkv,
       .has_bias = qkv_bias},
      {.module = "model.layers.{layer}.self_attn.o_proj",
       .role = "o_proj",
       .out_features = "hidden_size",
       .in_features = "num_attention_heads*head_dim",
       .has_bias = o_bias},
  };
}

std::vector<LinearRule> dense_mlp(RulePredicate present, RulePredicate bias) {
  constexpr std::string_view kGateUp = "model.layers.{layer}.mlp.gate_up_proj";
  return {
      {.module = "model.layers.{layer}.mlp.gate_proj",
       .role = "gate_proj",
       .out_features = "intermediate_size",
       .in_features = "hidden_size",
       .group = kGateUp,
       .present = present,
       .has_bias = bias},
      {.module = "model.layers.{layer}.mlp.up_proj",
       .role = "up_proj",
       .out_features = "intermediate_size",
       .in_features = "hidden_size",
       .group = kGateUp,
       .present = present,
       .has_bias = bias},
      {.module = "model.layers.{layer}.mlp.down_proj",
       .role = "down_proj",
       .out_features = "hidden_size",
       .in_features = "intermediate_size",
       .present = present,
       .has_bias = bias},
  };
}

std::vector<LinearRule> lm_head() {
  return {{.module = "lm_head",
           .role = "lm_head",
           .out_features = "vocab_size",
           .in_features = "hidden_size",
           .candidacy = Candidacy::kOptIn,
           .present = [](const ModelConfig& config, std::int64_t) {
             return !config.tie_word_embeddings;
           }}};
}

bool attention_bias(const ModelConfig& config, std::int64_t) {
  return config.attention_bias;
}
bool mlp_bias(const ModelConfig& config, std::int64_t) {
  return config.mlp_bias;
}

}  // namespace pq::model::profiles
