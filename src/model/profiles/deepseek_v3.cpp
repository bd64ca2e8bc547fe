#include "model/profiles/decoder_blocks.h"
#include "model/profiles/profiles.h"

namespace pq::model::profiles {

namespace {

// Names and shapes: deepseek_v3-architecture-facts.md §3 (MLA), §4 (MLP and experts), §5
// (router), §6 (MTP layer). Sibling groups follow vLLM's DeepseekV2ForCausalLM
// (vllm/model_executor/models/deepseek_v2.py, read at 002d6073): packed_modules_mapping holds
// "gate_up_proj" <- [gate_proj, up_proj] and, when q_lora_rank is set, "fused_qkv_a_proj" <-
// [q_a_proj, kv_a_proj_with_mqa]; the routed experts of a layer are one FusedMoE (§8).

bool has_q_lora(const ModelConfig& config, std::int64_t) {
  return config.mla && config.mla->q_lora_rank > 0;
}
bool no_q_lora(const ModelConfig& config, std::int64_t layer) {
  return !has_q_lora(config, layer);
}
bool body_moe(const ModelConfig& config, std::int64_t layer) {
  return config.is_moe_layer(layer);
}
bool body_dense(const ModelConfig& config, std::int64_t layer) {
  return !config.is_moe_layer(layer);
}
bool has_shared_experts(const ModelConfig& config) {
  return config.shared_expert_intermediate_size > 0;
}
bool body_shared(const ModelConfig& config, std::int64_t layer) {
  return body_moe(config, layer) && has_shared_experts(config);
}
// MTP layer k is built like a body layer of index num_hidden_layers + k (vLLM's
// DeepSeekMultiTokenPredictorLayer builds a DeepseekV2DecoderLayer with that prefix, §8).
bool mtp_moe(const ModelConfig& config, std::int64_t k) {
  return config.is_moe_layer(config.num_hidden_layers + k);
}
bool mtp_dense(const ModelConfig& config, std::int64_t k) {
  return !mtp_moe(config, k);
}
bool mtp_shared(const ModelConfig& config, std::int64_t k) {
  return mtp_moe(config, k) && has_shared_experts(config);
}

struct LayerPredicates {
  Component component;
  RulePredicate moe, dense, shared;
};

constexpr LayerPredicates kBody{Component::kText, body_moe, body_dense, body_shared};
constexpr LayerPredicates kMtpLayer{Component::kMtp, mtp_moe, mtp_dense, mtp_shared};

constexpr std::string_view kQkvA = "model.layers.{layer}.self_attn.fused_qkv_a_proj";
constexpr std::string_view kGateUp = "model.layers.{layer}.mlp.gate_up_proj";
constexpr std::string_view kSharedGateUp = "model.layers.{layer}.mlp.shared_experts.gate_up_proj";
constexpr std::string_view kExperts = "model.layers.{layer}.mlp.experts";
constexpr std::string_view kQkHeads =
    "num_attention_heads*qk_nope_head_dim+num_attention_heads*qk_rope_head_dim";

std::vector<TensorRule> layer_tensors(const LayerPredicates& p) {
  return {
      {.name = "model.layers.{layer}.input_layernorm.weight",
       .role = "input_layernorm",
       .shape = {"hidden_size"},
       .component = p.component},
      {.name = "model.layers.{layer}.post_attention_layernorm.weight",
       .role = "post_attention_layernorm",
       .shape = {"hidden_size"},
       .component = p.component},
      {.name = "model.layers.{layer}.self_attn.q_a_layernorm.weight",
       .role = "q_a_layernorm",
       .shape = {"q_lora_rank"},
       .present = has_q_lora,
       .component = p.component},
      {.name = "model.layers.{layer}.self_attn.kv_a_layernorm.weight",
       .role = "kv_a_layernorm",
       .shape = {"kv_lora_rank"},
       .component = p.component},
      {.name = "model.layers.{layer}.mlp.gate.e_score_correction_bias",
       .role = "router_selection_bias",
       .shape = {"num_experts"},
       .present = p.moe,
       .component = p.component},
  };
}

std::vector<LinearRule> layer_linears(const LayerPredicates& p) {
  return {
      {.module = "model.layers.{layer}.self_attn.q_a_proj",
       .role = "q_a_proj",
       .out_features = "q_lora_rank",
       .in_features = "hidden_size",
       .group = kQkvA,
       .present = has_q_lora,
       .component = p.component},
      {.module = "model.layers.{layer}.self_attn.q_b_proj",
       .role = "q_b_proj",
       .out_features = kQkHeads,
       .in_features = "q_lora_rank",
       .present = has_q_lora,
       .component = p.component},
      {.module = "model.layers.{layer}.self_attn.q_proj",
       .role = "q_proj",
       .out_features = kQkHeads,
       .in_features = "hidden_size",
       .present = no_q_lora,
       .component = p.component},
      // Second member of fused_qkv_a_proj: its 576 rows are not a multiple of the 128-row FP8
      // block, which vLLM allows only for the last member (§8).
      {.module = "model.layers.{layer}.self_attn.kv_a_proj_with_mqa",
       .role = "kv_a_proj_with_mqa",
       .out_features = "kv_lora_rank+qk_rope_head_dim",
       .in_features = "hidden_size",
       .group = kQkvA,
       .present = has_q_lora,
       .component = p.component},
      {.module = "model.layers.{layer}.self_attn.kv_a_proj_with_mqa",
       .role = "kv_a_proj_with_mqa",
       .out_features = "kv_lora_rank+qk_rope_head_dim",
       .in_features = "hidden_size",
       .present = no_q_lora,
       .component = p.component},
      {.module = "model.layers.{layer}.self_attn.kv_b_proj",
       .role = "kv_b_proj",
       .out_features = "num_attention_heads*qk_nope_head_dim+num_attention_heads*v_head_dim",
       .in_features = "kv_lora_rank",
       .component = p.component},
      {.module = "model.layers.{layer}.self_attn.o_proj",
       .role = "o_proj",
       .out_features = "hidden_size",
       .in_features = "num_attention_heads*v_head_dim",
       .component = p.component},
      {.module = "model.layers.{layer}.mlp.gate_proj",
       .role = "gate_proj",
       .out_features = "intermediate_size",
       .in_features = "hidden_size",
       .group = kGateUp,
       .present = p.dense,
       .component = p.component},
      {.module = "model.layers.{layer}.mlp.up_proj",
       .role = "up_proj",
       .out_features = "intermediate_size",
       .in_features = "hidden_size",
       .group = kGateUp,
       .present = p.dense,
       .component = p.component},
      {.module = "model.layers.{layer}.mlp.down_proj",
       .role = "down_proj",
       .out_features = "hidden_size",
       .in_features = "intermediate_size",
       .present = p.dense,
       .component = p.component},
      // The router stays BF16: vLLM's GateLinear is unquantized (§5, §8).
      {.module = "model.layers.{layer}.mlp.gate",
       .role = "router",
       .out_features = "num_experts",
       .in_features = "hidden_size",
       .candidacy = Candidacy::kPassthrough,
       .present = p.moe,
       .component = p.component},
      {.module = "model.layers.{layer}.mlp.experts.{expert}.gate_proj",
       .role = "expert_gate_proj",
       .out_features = "moe_intermediate_size",
       .in_features = "hidden_size",
       .group = kExperts,
       .present = p.moe,
       .component = p.component},
      {.module = "model.layers.{layer}.mlp.experts.{expert}.up_proj",
       .role = "expert_up_proj",
       .out_features = "moe_intermediate_size",
       .in_features = "hidden_size",
       .group = kExperts,
       .present = p.moe,
       .component = p.component},
      {.module = "model.layers.{layer}.mlp.experts.{expert}.down_proj",
       .role = "expert_down_proj",
       .out_features = "hidden_size",
       .in_features = "moe_intermediate_size",
       .group = kExperts,
       .present = p.moe,
       .component = p.component},
      {.module = "model.layers.{layer}.mlp.shared_experts.gate_proj",
       .role = "shared_expert_gate_proj",
       .out_features = "shared_expert_intermediate_size",
       .in_features = "hidden_size",
       .group = kSharedGateUp,
       .present = p.shared,
       .component = p.component},
      {.module = "model.layers.{layer}.mlp.shared_experts.up_proj",
       .role = "shared_expert_up_proj",
       .out_features = "shared_expert_intermediate_size",
       .in_features = "hidden_size",
       .group = kSharedGateUp,
       .present = p.shared,
       .component = p.component},
      {.module = "model.layers.{layer}.mlp.shared_experts.down_proj",
       .role = "shared_expert_down_proj",
       .out_features = "hidden_size",
       .in_features = "shared_expert_intermediate_size",
       .present = p.shared,
       .component = p.component},
  };
}

// The MTP layer's own tensors besides a decoder layer's (§6): a stored copy of the embedding,
// enorm / hnorm before eh_proj, and shared_head (norm and a stored copy of lm_head). eh_proj and
// the head are BF16 on disk and vLLM builds them unquantized (§6, §8): passthrough.
std::vector<TensorRule> mtp_tensors() {
  return {
      {.name = "model.layers.{layer}.embed_tokens.weight",
       .role = "embedding",
       .shape = {"vocab_size", "hidden_size"},
       .component = Component::kMtp},
      {.name = "model.layers.{layer}.enorm.weight",
       .role = "pre_fc_norm_embedding",
       .shape = {"hidden_size"},
       .component = Component::kMtp},
      {.name = "model.layers.{layer}.hnorm.weight",
       .role = "pre_fc_norm_hidden",
       .shape = {"hidden_size"},
       .component = Component::kMtp},
      {.name = "model.layers.{layer}.shared_head.norm.weight",
       .role = "final_norm",
       .shape = {"hidden_size"},
       .component = Component::kMtp},
  };
}

std::vector<LinearRule> mtp_linears() {
  return {
      {.module = "model.layers.{layer}.eh_proj",
       .role = "mtp_eh_proj",
       .out_features = "hidden_size",
       .in_features = "2*hidden_size",
       .candidacy = Candidacy::kPassthrough,
       .component = Component::kMtp},
      {.module = "model.layers.{layer}.shared_head.head",
       .role = "mtp_head",
       .out_features = "vocab_size",
       .in_features = "hidden_size",
       .candidacy = Candidacy::kPassthrough,
       .component = Component::kMtp},
  };
}

}  // namespace

// DeepseekV3ForCausalLM (DeepSeek-V3 / V3.1 / R1; deepseek_v3-architecture-facts.md): MLA
// attention, first_k_dense_replace dense layers then MoE layers with a sigmoid, group-limited
// router (mlp.gate [E, H] BF16 and its selection bias e_score_correction_bias [E] F32), per-expert
// gate/up/down and ungated shared experts; the MTP layer is stored after the body as
// model.layers.<num_hidden_layers>. The published checkpoints hold every decoder-layer Linear as
// 128x128 block-scaled FP8 with weight_scale_inv (§7), which the inventory takes with their scales.
const ArchitectureProfile& deepseek_v3() {
  static const ArchitectureProfile profile{
      .family = "deepseek_v3",
      .architectures = {"DeepseekV3ForCausalLM"},
      .tensors = concat(
          std::vector<TensorRule>{
              {.name = "model.embed_tokens.weight",
               .role = "embedding",
               .shape = {"vocab_size", "hidden_size"}},
              {.name = "model.norm.weight", .role = "final_norm", .shape = {"hidden_size"}}},
          layer_tensors(kBody), layer_tensors(kMtpLayer), mtp_tensors()),
      .linears = concat(layer_linears(kBody), lm_head(), layer_linears(kMtpLayer), mtp_linears()),
      .mtp_layer_offset = "num_hidden_layers",
  };
  return profile;
}

}  // namespace pq::model::profiles
