#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace pq::model {

// RoPE frequency scaling as Hugging Face configs spell it ("rope_scaling"; transformers
// modeling_rope_utils.py). type "default" means none.
struct RopeScaling {
  std::string type = "default";  // default, linear, dynamic, llama3, yarn
  double factor = 1.0;
  double low_freq_factor = 1.0;                       // llama3
  double high_freq_factor = 4.0;                      // llama3
  std::int64_t original_max_position_embeddings = 0;  // llama3, yarn
  double beta_fast = 32.0;                            // yarn
  double beta_slow = 1.0;                             // yarn
  std::optional<double> attention_factor;             // yarn (mscale)
  std::optional<double> mscale;                       // yarn, DeepSeek-style configs
  std::optional<double> mscale_all_dim;               // yarn, DeepSeek-style configs
  bool truncate = true;                               // yarn: round the correction range
};

// The fields of a Hugging Face config.json that the inventory and the runtime use. Parsed once,
// strictly: a missing required field or a nonsensical value is a pq::Error naming the file.
struct ModelConfig {
  std::string architecture;  // architectures[0], e.g. "Qwen3ForCausalLM"
  std::string model_type;
  std::int64_t hidden_size = 0;
  std::int64_t intermediate_size = 0;
  std::int64_t num_hidden_layers = 0;
  std::int64_t num_attention_heads = 0;
  std::int64_t num_key_value_heads = 0;
  std::int64_t head_dim = 0;  // defaults to hidden_size / num_attention_heads
  std::int64_t vocab_size = 0;
  std::int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  double partial_rotary_factor = 1.0;  // share of head_dim that is rotated
  std::string hidden_act = "silu";
  // Qwen2/Qwen3: layers from this one on use the sliding window (transformers
  // configuration_qwen2.py layer_types); unset: none of them.
  std::optional<std::int64_t> max_window_layers;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v (and o for Llama) carry biases
  bool mlp_bias = false;
  std::optional<std::int64_t> sliding_window;  // set only when the config enables it
  std::string torch_dtype;
  std::optional<std::int64_t> bos_token_id;
  std::vector<std::int64_t> eos_token_ids;

  // Mixture of experts (Qwen3-MoE); num_experts == 0 for dense models.
  std::int64_t num_experts = 0;
  std::int64_t num_experts_per_tok = 0;
  std::int64_t moe_intermediate_size = 0;
  bool norm_topk_prob = false;
  std::int64_t decoder_sparse_step = 1;
  std::vector<std::int64_t> mlp_only_layers;

  nlohmann::json raw;  // the whole config.json, for fields a profile needs beyond these

  // True when layer `layer` has a sparse MoE block rather than a dense MLP
  // (transformers Qwen3MoeDecoderLayer: not in mlp_only_layers, experts > 0 and
  // (layer + 1) % decoder_sparse_step == 0).
  bool is_moe_layer(std::int64_t layer) const;

  static ModelConfig from_json(const nlohmann::json& json, const std::string& label);
  static ModelConfig load(const std::filesystem::path& model_dir);
};

}  // namespace pq::model
