#include "model/profiles/decoder_blocks.h"
#include "model/profiles/profiles.h"

namespace pq::model::profiles {

namespace {

bool moe_layer(const ModelConfig& config, std::int64_t layer) {
  return config.is_moe_layer(layer);
}

bool dense_layer(const ModelConfig& config, std::int64_t layer) {
  return !config.is_moe_layer(layer);
}

// All routed experts of one layer form one sibling group: vLLM's FusedMoE layer holds them as
// w13 [E, 2I, H] and w2 [E, H, I] under a single quantization scheme (format-facts.md A.3,
// method-facts.md §5).
constexpr std::string_view kExperts = "model.layers.{layer}.mlp.experts";

}  // namespace

// Qwen3MoeForCausalLM (transformers models/qwen3_moe/modeling_qwen3_moe.py): Qwen3 attention;
// MoE layers (ModelConfig::is_moe_layer) hold a router mlp.gate [num_experts, hidden] without
// bias and per-expert SwiGLU MLPs of width moe_intermediate_size; the other layers a dense MLP
// of width intermediate_size. The router stays unquantized: vLLM builds it as
// ReplicatedLinear(quant_config=None) (vllm/model_executor/models/qwen3_moe.py).
const ArchitectureProfile& qwen3_moe() {
  static const std::vector<LinearRule> sparse_mlp = {
      {.module = "model.layers.{layer}.mlp.gate",
       .role = "router",
       .out_features = "num_experts",
       .in_features = "hidden_size",
       .candidacy = Candidacy::kPassthrough,
       .present = moe_layer},
      {.module = "model.layers.{layer}.mlp.experts.{expert}.gate_proj",
       .role = "expert_gate_proj",
       .out_features = "moe_intermediate_size",
       .in_features = "hidden_size",
       .group = kExperts,
       .present = moe_layer},
      {.module = "model.layers.{layer}.mlp.experts.{expert}.up_proj",
       .role = "expert_up_proj",
       .out_features = "moe_intermediate_size",
       .in_features = "hidden_size",
       .group = kExperts,
       .present = moe_layer},
      {.module = "model.layers.{layer}.mlp.experts.{expert}.down_proj",
       .role = "expert_down_proj",
       .out_features = "hidden_size",
       .in_features = "moe_intermediate_size",
       .group = kExperts,
       .present = moe_layer},
  };
  static const ArchitectureProfile profile{
      .family = "qwen3_moe",
      .architectures = {"Qwen3MoeForCausalLM"},
      .tensors = concat(decoder_norms_and_embedding(), qk_norms()),
      .linears = concat(attention(attention_bias, attention_bias), dense_mlp(dense_layer, never),
                        sparse_mlp, lm_head()),
  };
  return profile;
}

}  // namespace pq::model::profiles
