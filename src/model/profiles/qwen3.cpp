#include "model/profiles/decoder_blocks.h"
#include "model/profiles/profiles.h"

namespace pq::model::profiles {

// Qwen3ForCausalLM (transformers models/qwen3/modeling_qwen3.py): the Llama layout plus per-head
// q_norm/k_norm; q/k/v/o carry biases when config.attention_bias is set, the MLP never does.
const ArchitectureProfile& qwen3() {
  static const ArchitectureProfile profile{
      .family = "qwen3",
      .architectures = {"Qwen3ForCausalLM"},
      .tensors = concat(decoder_norms_and_embedding(), qk_norms()),
      .linears =
          concat(attention(attention_bias, attention_bias), dense_mlp(always, never), lm_head()),
  };
  return profile;
}

}  // namespace pq::model::profiles
