#pragma once

#include <span>
#include <string_view>
#include <vector>

#include "model/profile.h"

// Building blocks of the hybrid families, Qwen3-Next and Qwen3.5/3.6: "linear_attention" layers
// hold a Gated DeltaNet, "full_attention" layers a gated softmax attention (ModelConfig::
// layer_types), the MLP is dense or a sparse MoE block with a shared expert, and a
// multi-token-prediction head ("mtp.*") repeats one full-attention layer. Names and shapes follow
// ../shared/docs/qwen3_5-architecture-facts.md (sections given as §); sibling groups follow vLLM's
// packed_modules_mapping (§10).
namespace pq::model::profiles {

// Which body layers hold a sparse MoE block; the others hold a dense SwiGLU MLP.
enum class BodyMlp {
  kDense,         // Qwen3.5/3.6 dense: every layer
  kMoe,           // Qwen3.5/3.6-MoE: every layer
  kConfigDecides  // Qwen3-Next: ModelConfig::is_moe_layer (decoder_sparse_step, mlp_only_layers)
};

// How a hybrid checkpoint stores its text model and MTP head.
struct HybridLayout {
  // Prefix of embed_tokens, norm and layers.N: "model.language_model." in Qwen3.5/3.6 (§9),
  // "model." in Qwen3-Next.
  std::string_view text_prefix;
  // Qwen3-Next's in_proj_qkvz and in_proj_ba, interleaved per key-head group, instead of
  // Qwen3.5's in_proj_qkv, in_proj_z, in_proj_b and in_proj_a (§4.1).
  bool fused_gdn_projections = false;
  BodyMlp body_mlp = BodyMlp::kDense;
  // Body experts packed as mlp.experts.gate_up_proj [E, 2I, H] and mlp.experts.down_proj
  // [E, H, I] (Qwen3.5/3.6-MoE); otherwise one tensor per expert and projection. MTP experts are
  // always stored per expert (§6.3).
  bool packed_experts = false;
  // LinearRule::formats of every routed-expert projection, body and MTP head; empty: no limit.
  std::span<const std::string_view> expert_formats = {};
};

// Embedding, final norm, per-layer norms, q/k norms of full-attention layers, the Gated
// DeltaNet's conv1d, A_log, dt_bias and gated norm, and the MTP head's norms.
std::vector<TensorRule> hybrid_tensors(const HybridLayout& layout);

// Every Linear of the text model and the MTP head, lm_head included.
std::vector<LinearRule> hybrid_linears(const HybridLayout& layout);

}  // namespace pq::model::profiles
