#include "model/profiles/decoder_blocks.h"
#include "model/profiles/profiles.h"

namespace pq::model::profiles {

namespace {

// vLLM builds the MoE block under the prefix "model.layers.N.mlp" (stored as the attribute
// block_sparse_moe) and fuses all experts of a layer into one FusedMoE module under one scheme
// (minimax_m2-architecture-facts.md §8.2, §8.4): one sibling group per layer, named as vLLM
// names that module.
constexpr std::string_view kExperts = "model.layers.{layer}.mlp.experts";

}  // namespace

// MiniMaxM2ForCausalLM (MiniMax-M2 / M2.5 / M2.7; minimax_m2-architecture-facts.md). Every layer
// is full attention with a "per_layer" q/k norm over the whole projection ([nH * D] and
// [nKV * D], §3) and a sparse MoE block without shared expert: a sigmoid router
// block_sparse_moe.gate [E, H] (F32 on disk) with the selection bias e_score_correction_bias [E]
// (F32), and per-expert w1 (gate) / w3 (up) [I, H] and w2 (down) [H, I] (§4, §5). The published
// checkpoints store q/k/v/o and the experts as 128x128 block-scaled FP8 (§6), which the inventory
// takes with their scales. The config's MTP keys have no tensors behind them (§7). The router
// stays unquantized: vLLM builds it with quant_config None (§8.2).
const ArchitectureProfile& minimax_m2() {
  static const std::vector<TensorRule> norms = {
      {.name = "model.layers.{layer}.self_attn.q_norm.weight",
       .role = "q_norm",
       .shape = {"num_attention_heads*head_dim"}},
      {.name = "model.layers.{layer}.self_attn.k_norm.weight",
       .role = "k_norm",
       .shape = {"num_key_value_heads*head_dim"}},
      {.name = "model.layers.{layer}.block_sparse_moe.e_score_correction_bias",
       .role = "router_selection_bias",
       .shape = {"num_experts"}},
  };
  static const std::vector<LinearRule> sparse_mlp = {
      {.module = "model.layers.{layer}.block_sparse_moe.gate",
       .role = "router",
       .out_features = "num_experts",
       .in_features = "hidden_size",
       .candidacy = Candidacy::kPassthrough,
       .serving_module = "model.layers.{layer}.mlp.gate"},
      // w1 = gate, w3 = up, w2 = down (§5: vLLM's ckpt_gate_proj_name "w1", ckpt_up_proj_name
      // "w3", ckpt_down_proj_name "w2"); compressed-tensors looks the fused layer's scheme up
      // under vLLM's names "mlp.experts.E.{gate,up,down}_proj" (§8.4).
      {.module = "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1",
       .role = "expert_gate_proj",
       .out_features = "moe_intermediate_size",
       .in_features = "hidden_size",
       .group = kExperts,
       .serving_module = "model.layers.{layer}.mlp.experts.{expert}.gate_proj"},
      {.module = "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3",
       .role = "expert_up_proj",
       .out_features = "moe_intermediate_size",
       .in_features = "hidden_size",
       .group = kExperts,
       .serving_module = "model.layers.{layer}.mlp.experts.{expert}.up_proj"},
      {.module = "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2",
       .role = "expert_down_proj",
       .out_features = "hidden_size",
       .in_features = "moe_intermediate_size",
       .group = kExperts,
       .serving_module = "model.layers.{layer}.mlp.experts.{expert}.down_proj"},
  };
  static const ArchitectureProfile profile{
      .family = "minimax_m2",
      .architectures = {"MiniMaxM2ForCausalLM"},
      .tensors = concat(decoder_norms_and_embedding(), norms),
      .linears = concat(attention(never, never), sparse_mlp, lm_head()),
  };
  return profile;
}

}  // namespace pq::model::profiles
