#include "model/profiles/hybrid_blocks.h"
#include "model/profiles/profiles.h"

namespace pq::model::profiles {

// Qwen3NextForCausalLM (e.g. Qwen3-Next-80B-A3B), the text-only predecessor of Qwen3.5: flat
// config, tensors under "model.", interleaved in_proj_qkvz / in_proj_ba, experts stored one
// tensor per expert in the body and the MTP head, MoE or dense layers as decoder_sparse_step and
// mlp_only_layers say (transformers models/qwen3_next; qwen3_5-architecture-facts.md §4.1, §9).
const ArchitectureProfile& qwen3_next() {
  static constexpr HybridLayout kLayout{
      .text_prefix = "model.", .fused_gdn_projections = true, .body_mlp = BodyMlp::kConfigDecides};
  static const ArchitectureProfile profile{
      .family = "qwen3_next",
      .architectures = {"Qwen3NextForCausalLM"},
      .tensors = hybrid_tensors(kLayout),
      .linears = hybrid_linears(kLayout),
  };
  return profile;
}

}  // namespace pq::model::profiles
