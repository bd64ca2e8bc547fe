#include "model/profiles/decoder_blocks.h"
#include "model/profiles/profiles.h"

namespace pq::model::profiles {

// Qwen2ForCausalLM (transformers models/qwen2/modeling_qwen2.py, Qwen2Attention): q/k/v always
// carry biases (bias=True, not configurable), o_proj and the MLP never do.
const ArchitectureProfile& qwen2() {
  static const ArchitectureProfile profile{
      .family = "qwen2",
      .architectures = {"Qwen2ForCausalLM"},
      .tensors = decoder_norms_and_embedding(),
      .linears = concat(attention(always, never), dense_mlp(always, never), lm_head()),
  };
  return profile;
}

}  // namespace pq::model::profiles
