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

// How a decoder layer mixes tokens (transformers config "layer_types").
enum class LayerType { kFullAttention, kSlidingAttention, kLinearAttention };

// The Gated DeltaNet of "linear_attention" layers (Qwen3-Next, Qwen3.5/3.6), with the defaults of
// their transformers config classes (qwen3_5-architecture-facts.md §1). Key and value dims are
// num_*_heads * *_head_dim; each key head serves num_value_heads / num_key_heads value heads.
struct LinearAttentionConfig {
  std::int64_t conv_kernel_dim = 4;
  std::int64_t key_head_dim = 128;
  std::int64_t value_head_dim = 128;
  std::int64_t num_key_heads = 16;
  std::int64_t num_value_heads = 32;
};

// The vision tower of Qwen3.5/3.6 or Gemma 4 ("vision_config"): what names and shapes its tensors
// (qwen3_5-architecture-facts.md §8, gemma4-architecture-facts.md §9).
struct VisionConfig {
  std::int64_t depth = 0;  // transformer blocks
  std::int64_t hidden_size = 0;
  std::int64_t intermediate_size = 0;
  std::int64_t out_hidden_size = 0;  // the merger's output: the text model's hidden_size
  std::int64_t in_channels = 0;
  std::int64_t patch_size = 0;
  std::int64_t temporal_patch_size = 0;
  std::int64_t spatial_merge_size = 0;  // the merger joins merge x merge patches
  std::int64_t num_position_embeddings = 0;
  // Gemma 4's tower (gemma4-architecture-facts.md §1.1, §9): attention geometry, and whether it
  // stores std_bias / std_scale.
  std::int64_t head_dim = 0;
  std::int64_t num_attention_heads = 0;
  std::int64_t num_key_value_heads = 0;
  bool standardize = false;
};

// What Gemma 4 text configs ("gemma4_text") add to the fields above
// (../shared/docs/gemma4-architecture-facts.md §1, §4, §8). Sliding layers use head_dim,
// num_key_value_heads and rope_theta / rope_scaling; full layers have their own head width, KV
// heads and "proportional" RoPE.
struct Gemma4Config {
  std::int64_t global_head_dim = 512;  // full layers' head width (class default 512, §1)
  // Full layers' KV heads: num_global_key_value_heads with attention_k_eq_v, else
  // num_key_value_heads (§4.1).
  std::int64_t full_key_value_heads = 0;
  bool attention_k_eq_v = false;  // full layers have no v_proj; V is v_norm(k_proj x) (§4.2)
  double full_rope_theta = 1e6;
  // Share of the global head's half-width with non-zero frequencies (§4.3).
  double full_partial_rotary_factor = 1.0;
  double final_logit_softcapping = 0.0;  // 0: none
};

// Multi-head latent attention (deepseek_v3-architecture-facts.md §3): queries through a
// low-rank q_a_proj / q_a_layernorm / q_b_proj (or one q_proj when q_lora_rank is null), keys and
// values from a compressed kv_lora_rank vector expanded per head by kv_b_proj, and one
// qk_rope_head_dim rotary key shared by all heads.
struct MlaConfig {
  std::int64_t q_lora_rank = 0;  // 0: q_proj [heads * qk_head_dim, hidden]
  std::int64_t kv_lora_rank = 0;
  std::int64_t qk_nope_head_dim = 0;
  std::int64_t qk_rope_head_dim = 0;
  std::int64_t v_head_dim = 0;
  std::int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
};

// The fields of a Hugging Face config.json that the inventory and the runtime use. Parsed once,
// strictly: a missing required field or a nonsensical value is a pq::Error naming the file.
// Multimodal configs (Qwen3.5/3.6) keep the text model's fields under "text_config"; they are
// read from there, and messages name them as "text_config.<key>".
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
  std::int64_t shared_expert_intermediate_size = 0;  // Qwen3-Next, Qwen3.5/3.6-MoE; 0: none
  // Group-limited expert choice (DeepSeek-V3, deepseek_v3-architecture-facts.md §5): the experts
  // form n_group contiguous groups, only the topk_group groups with the largest sums of their two
  // best biased scores compete, and the chosen weights are multiplied by routed_scaling_factor.
  // 1, 1, 1.0: no group limit and no scaling.
  std::int64_t n_group = 1;
  std::int64_t topk_group = 1;
  double routed_scaling_factor = 1.0;
  // The checkpoint stores Linear weights as block-scaled FP8 (quantization_config quant_method
  // "fp8" with weight_block_size [128, 128]: facts §1, §6).
  bool fp8_block_weights = false;

  // Per layer, from "layer_types"; for Qwen3-Next and Qwen3.5/3.6 without it, every
  // full_attention_interval-th layer is full attention and the others linear attention (facts
  // §1). Empty when the config gives neither: the family decides (full, or sliding as
  // max_window_layers and sliding_window say).
  std::vector<LayerType> layer_types;
  std::optional<LinearAttentionConfig> linear_attention;  // set when a layer is linear_attention
  // Full attention's q_proj also yields a per-head output gate: 2 * num_attention_heads *
  // head_dim rows (Qwen3-Next, Qwen3.5/3.6; facts §5).
  bool attn_output_gate = false;
  // Multi-head latent attention (DeepSeek-V3, deepseek_v3-architecture-facts.md §3) in place of
  // q/k/v projections; head_dim is then qk_rope_head_dim, the rotated part (as transformers'
  // DeepseekV3Config sets it).
  std::optional<MlaConfig> mla;
  // Decoder layers of the multi-token-prediction head, stored as "mtp.layers.N.*" (facts §7), or
  // for DeepSeek-V3 (num_nextn_predict_layers) as "model.layers.<num_hidden_layers + N>.*".
  std::int64_t mtp_num_hidden_layers = 0;
  std::optional<VisionConfig> vision;
  std::optional<Gemma4Config> gemma4;  // set for Gemma 4 text configs

  nlohmann::json raw;  // the whole config.json, for fields a profile needs beyond these

  // True when layer `layer` has a sparse MoE block rather than a dense MLP
  // (transformers Qwen3MoeDecoderLayer: not in mlp_only_layers, experts > 0 and
  // (layer + 1) % decoder_sparse_step == 0).
  bool is_moe_layer(std::int64_t layer) const;
  bool is_linear_attention_layer(std::int64_t layer) const;
  bool is_sliding_attention_layer(std::int64_t layer) const;
  // Gemma 4's per-layer attention geometry: the full layers' head_dim and KV heads differ from the
  // sliding ones (§4.1); other families use head_dim and num_key_value_heads throughout.
  std::int64_t attention_head_dim(std::int64_t layer) const;
  std::int64_t attention_key_value_heads(std::int64_t layer) const;
  // Whether the layer stores v_proj (not on Gemma 4's attention_k_eq_v full layers).
  bool has_v_proj(std::int64_t layer) const;

  static ModelConfig from_json(const nlohmann::json& json, const std::string& label);
  static ModelConfig load(const std::filesystem::path& model_dir);
};

}  // namespace pq::model
