#pragma once

#include <vector>

#include "model/profile.h"

// Building blocks shared by the Llama-style decoder families (Llama, Mistral, Qwen2, Qwen3,
// Qwen3-MoE): they differ only in which projections carry biases, in Qwen3's per-head q/k norms
// and in the MLP of MoE layers. Tensor names and shapes follow transformers'
// models/<family>/modeling_<family>.py (nn.Linear(in, out) stores its weight as [out, in]).
namespace pq::model::profiles {

// model.embed_tokens [vocab, hidden], model.norm [hidden], and per layer input_layernorm and
// post_attention_layernorm [hidden].
std::vector<TensorRule> decoder_norms_and_embedding();

// Qwen3's per-head RMSNorm on queries and keys: self_attn.q_norm / k_norm [head_dim]
// (transformers models/qwen3/modeling_qwen3.py, Qwen3Attention).
std::vector<TensorRule> qk_norms();

// self_attn.{q,k,v,o}_proj; q/k/v form vLLM's qkv_proj (packed_modules_mapping in
// vllm/model_executor/models/llama.py and qwen2.py/qwen3.py).
std::vector<LinearRule> attention(RulePredicate qkv_bias, RulePredicate o_bias);

// mlp.{gate,up,down}_proj of width intermediate_size; gate/up form vLLM's gate_up_proj.
std::vector<LinearRule> dense_mlp(RulePredicate present, RulePredicate bias);

// lm_head [vocab, hidden], stored only when tie_word_embeddings is false.
std::vector<LinearRule> lm_head();

// Predicates on the config's bias switches (transformers LlamaConfig / Qwen3Config fields).
bool attention_bias(const ModelConfig& config, std::int64_t layer);
bool mlp_bias(const ModelConfig& config, std::int64_t layer);

// Joins rule lists; profiles assemble their tables from the blocks above.
template <typename Rule, typename... More>
std::vector<Rule> concat(std::vector<Rule> first, const More&... more) {
  (first.insert(first.end(), more.begin(), more.end()), ...);
  return first;
}

}  // namespace pq::model::profiles
