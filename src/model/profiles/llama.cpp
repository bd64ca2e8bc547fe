#include "model/profiles/decoder_blocks.h"
#include "model/profiles/profiles.h"

namespace pq::model::profiles {

// LlamaForCausalLM (transformers models/llama/modeling_llama.py): q/k/v/o carry biases when
// config.attention_bias is set, gate/up/down when config.mlp_bias is set.
const ArchitectureProfile& llama() {
  static const ArchitectureProfile profile{
      .family = "llama",
      .architectures = {"LlamaForCausalLM"},
      .tensors = decoder_norms_and_embedding(),
      .linears =
          concat(attention(attention_bias, attention_bias), dense_mlp(always, mlp_bias), lm_head()),
  };
  return profile;
}

}  // namespace pq::model::profiles
