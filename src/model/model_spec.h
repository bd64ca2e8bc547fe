#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/layer_kind.h"
#include "io/dtype.h"
#include "model/config.h"
#include "model/profile.h"

namespace pq::io {
class Checkpoint;
}

namespace pq::model {

// What the inventory needs to know about one checkpoint tensor; io::Checkpoint supplies it, and
// tests can write lists by hand.
struct TensorDesc {
  std::string name;
  io::DType dtype = io::DType::BF16;
  std::vector<std::int64_t> shape;

  std::int64_t numel() const;
};

// Where a Linear's weight sits when one tensor holds several Linears: Qwen3.5/3.6 store all
// experts of a layer as "mlp.experts.gate_up_proj" [E, 2I, H], so expert e's gate_proj is rows
// [0, I) and its up_proj rows [I, 2I) of matrix e (qwen3_5-architecture-facts.md §6.3).
struct TensorSlice {
  std::int64_t index = 0;  // position along dim 0 of the 3-D tensor
  std::int64_t row_begin = 0;
  std::int64_t row_end = 0;
};

// One Linear of the model: the unit the quantizer assigns a format to.
struct Linear {
  std::string name;  // HF module name, e.g. "model.layers.3.self_attn.q_proj"
  // The name vLLM's quantization config targets and ignore list must use (LinearRule::
  // serving_module); equal to `name` for every family but MiniMax-M2's experts.
  std::string serving_name;
  // LinearRule::serving_alias expanded: another name vLLM looks this Linear's scheme up under.
  std::optional<std::string> serving_alias;
  std::string role;                  // profile role, e.g. "q_proj", "expert_up_proj", "router"
  std::string weight_tensor;         // checkpoint tensor holding the weight
  std::optional<TensorSlice> slice;  // set when weight_tensor holds more than this Linear
  std::int64_t out_features = 0;
  std::int64_t in_features = 0;
  io::DType dtype = io::DType::BF16;
  // Index in its component's layer stack (decoder layer, mtp.layers.N, vision block); absent
  // outside a stack (lm_head, mtp.fc, the vision merger).
  std::optional<std::int64_t> layer;
  std::optional<std::int64_t> expert;  // set for routed-expert projections
  std::optional<std::string> bias_tensor;
  // The "<weight>_scale_inv" block scale of a weight stored as block-scaled FP8
  // (io/fp8_block.h): the Linear may keep its source bytes (format FP8_SOURCE).
  std::optional<std::string> scale_tensor;
  io::DType scale_dtype = io::DType::F32;  // its dtype, F32 or BF16
  std::optional<std::string> group;  // sibling group name (SiblingGroup::name); absent if alone
  bool is_candidate = false;
  Component component = Component::kText;
  // LinearRule::formats: the only formats vLLM serves this Linear in; empty: no such limit.
  std::vector<std::string> formats;

  std::int64_t numel() const { return out_features * in_features; }
  bool is_fp8_source() const { return scale_tensor.has_value(); }
  // Whether the architecture lets vLLM serve this Linear in `format` (its shape aside), and, for
  // FP8_SOURCE, whether it is stored as block-scaled FP8 at source.
  bool allows(std::string_view format) const;
  // The vLLM module class holding it: FusedMoE for a routed expert, ParallelLMHead for lm_head,
  // a fused (QKV / merged) Linear for a member of a sibling group, else a plain Linear.
  LayerKind layer_kind() const;
};

// Linears that vLLM loads as one module and that therefore need one quantization scheme
// (format-facts.md A.3: qkv_proj <- q,k,v; gate_up_proj <- gate,up; and every expert projection
// of one MoE layer, since the fused MoE layer takes a single scheme, method-facts.md §5).
struct SiblingGroup {
  std::string name;                  // e.g. "model.layers.3.self_attn.qkv_proj"
  std::vector<std::size_t> members;  // indices into ModelSpec::linears, in model order
};

// A checkpoint tensor that is not a Linear weight: embeddings, norms, biases.
struct OtherTensor {
  std::string name;
  std::string role;  // TensorRule::role, or "bias"
  std::vector<std::int64_t> shape;
  io::DType dtype = io::DType::BF16;
  std::optional<std::int64_t> layer;
  Component component = Component::kText;

  std::int64_t numel() const;
};

struct SpecOptions {
  // Make lm_head a quantization candidate (off by default: it is the most sensitive Linear and
  // tied checkpoints have none to quantize).
  bool quantize_lm_head = false;
};

// The inventory of a checkpoint: every tensor accounted for exactly once, either as a Linear
// weight or its FP8 block scale (linears) or as another tensor (others: embeddings, norms,
// biases).
struct ModelSpec {
  std::string architecture;
  std::string family;
  bool tie_word_embeddings = false;
  // Component by component (text, mtp, vision); in each, layer by layer in profile order, then
  // the Linears outside the layer stack (lm_head last of the text ones).
  std::vector<Linear> linears;
  std::vector<OtherTensor> others;
  std::vector<SiblingGroup> groups;

  std::int64_t num_params() const;  // every stored tensor once (a tied lm_head is not stored)
  std::size_t num_tensors() const;  // checkpoint tensors the inventory accounts for
  std::int64_t num_candidate_linears() const;
  // Parameters per role: Linear weights by Linear role, other tensors by their role.
  std::map<std::string, std::int64_t> params_by_role() const;
  std::map<std::string, std::int64_t> params_by_dtype() const;  // keyed by safetensors dtype name
  // Names of every tensor that stays in its stored dtype: other tensors plus the weights of
  // non-candidate Linears.
  std::vector<std::string> passthrough_tensors() const;
  const Linear* find_linear(std::string_view name) const;
  // The text decoder layers that keep a key/value cache (self-attention layers; not Gated
  // DeltaNet ones, nor the MTP head's), each with its attention module, e.g. 3 ->
  // "model.layers.3.self_attn": the module whose k_scale / v_scale an FP8 KV cache stores.
  std::map<std::int64_t, std::string> kv_cache_modules() const;
};

// Builds the inventory from a config and the checkpoint's tensor list, strictly: an unsupported
// architecture, a missing or unexpected tensor, a duplicate name or a shape that disagrees with
// the config is a pq::Error naming `label` (usually the checkpoint directory) and the tensor.
ModelSpec build_model_spec(const ModelConfig& config, std::span<const TensorDesc> tensors,
                           const std::string& label, const SpecOptions& options = {});
// The same with an explicit profile instead of the one registered for config.architecture.
ModelSpec build_model_spec(const ArchitectureProfile& profile, const ModelConfig& config,
                           std::span<const TensorDesc> tensors, const std::string& label,
                           const SpecOptions& options = {});
ModelSpec build_model_spec(const ModelConfig& config, const io::Checkpoint& checkpoint,
                           const SpecOptions& options = {});
// Reads config.json and the safetensors headers of `model_dir`.
ModelSpec load_model_spec(const std::filesystem::path& model_dir, const SpecOptions& options = {});

// The source weight of one Linear decoded to f32, [out, in] (a block-scaled FP8 source
// dequantized); a slice of a packed 3-D tensor when the Linear shares its tensor (Qwen3.5 packed
// experts). pq::Error naming the tensor when it holds Inf or NaN.
std::vector<float> read_source_weight(const io::Checkpoint& checkpoint, const Linear& linear);

}  // namespace pq::model
