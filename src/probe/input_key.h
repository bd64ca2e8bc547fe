#pragma once

#include <string>

#include "model/model_spec.h"

namespace pq::probe {

// The name of the activation a Linear reads. Linears that multiply the very same rows share it,
// and with it one GPTQ Hessian and one NVFP4 global scale: q/k/v read the attention input
// ("model.layers.3.self_attn.qkv_proj"), gate/up the MLP input ("model.layers.3.mlp.gate_up_proj"),
// an expert's gate/up that expert's routed rows ("model.layers.3.mlp.experts.5.gate_up_proj").
// Every other Linear has its own input, keyed by its own name. The fusions are vLLM's
// packed_modules_mapping (qkv_proj <- q,k,v; gate_up_proj <- gate,up; MoE w13 <- w1,w3),
// format-facts.md A.3.
std::string input_key(const model::Linear& linear);

}  // namespace pq::probe
