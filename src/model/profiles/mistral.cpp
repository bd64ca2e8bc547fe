#include "model/profiles/decoder_blocks.h"
#include "model/profiles/profiles.h"

namespace pq::model::profiles {

// MistralForCausalLM (transformers models/mistral/modeling_mistral.py): the Llama layout with
// no biases at all; sliding-window attention changes nothing on disk.
const ArchitectureProfile& mistral() {
  static const ArchitectureProfile profile{
      .family = "mistral",
      .architectures = {"MistralForCausalLM"},
      .tensors = decoder_norms_and_embedding(),
      .linears = concat(attention(never, never), dense_mlp(always, never), lm_head()),
  };
  return profile;
}

}  // namespace pq::model::profiles
