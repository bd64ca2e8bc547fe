#pragma once

#include <string>

#include "model/model_spec.h"

namespace pq::probe {

// The name of the activation a Linear reads. Linears that multiply the very same rows share it,
// and with it one GPTQ Hessian and one NVFP4 global scale: q/k/v read the attention input
// ("model.layers.3.self_attn.qkv_proj"), gate/up the MLP input ("model.layers.3.mlp.gate_up_proj"),
// an expert's gate/up that expert's routed rows ("model.layers.3.mlp.experts.5.gate_up_proj"), a
// shared expert's gate/up the MLP input ("model.layers.3.mlp.shared_expert.gate_up_proj"), and a
// Gated DeltaNet layer's in_proj_qkv/z/b/a (Qwen3-Next: in_proj_qkvz/ba) the attention input
// ("model.layers.0.linear_attn.in_proj"). Every other Linear has its own input, keyed by its own
// name. The fusions are vLLM's packed_modules_mapping (qkv_proj <- q,k,v; gate_up_proj <-
// gate,up; MoE w13 <- w1,w3), format-facts.md A.3; vLLM splits the DeltaNet projections into
// in_proj_qkvz and in_proj_ba (qwen3_5-architecture-facts.md, packed_modules_mapping), but all
// four multiply the very same rows, so one Hessian and one global scale serve them.
std::string input_key(const model::Linear& linear);

}  // namespace pq::probe
