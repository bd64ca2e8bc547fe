#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "model/config.h"

namespace pq::model {

// Architecture knowledge as data. A profile lists every tensor a checkpoint of its family holds,
// as name patterns with expected shapes; build_model_spec() expands the patterns over the
// config's layers and experts and matches them one to one against the checkpoint.
//
// Pattern placeholders: "{layer}" expands over the layer stack of the rule's component
// (component_layers(): the decoder layers for kText, "mtp.layers.N" for kMtp, the vision blocks
// for kVision), and "{expert}" over 0..num_experts-1 (only inside a layer pattern). A rule without
// placeholders names one tensor. Shapes are dimension expressions (model/dimension.h) such as
// "num_attention_heads*head_dim".

// Decides per layer whether a rule applies (e.g. only MoE layers, only untied checkpoints).
// A plain function so profiles stay tables; captureless lambdas convert to it.
using RulePredicate = bool (*)(const ModelConfig& config, std::int64_t layer);

inline bool always(const ModelConfig&, std::int64_t) {
  return true;
}
inline bool never(const ModelConfig&, std::int64_t) {
  return false;
}

// Whether the quantizer may choose a format for a Linear.
enum class Candidacy {
  kCandidate,  // every projection inside attention, linear-attention and MLP blocks
  // Kept in its stored dtype: routers and shared-expert gates (vLLM builds them with
  // quant_config=None), and the vision tower's Linears, which are listed (with
  // Component::kVision) so that one format for the whole tower can be applied to them, but are
  // never weighed against the text model's Linears.
  kPassthrough,
  kOptIn,  // kept unless the user asks (lm_head: SpecOptions::quantize_lm_head)
};

// Which part of the model a tensor belongs to. Text-only families use kText throughout; the
// multimodal and speculative parts of Qwen3.5/3.6 checkpoints are kVision ("model.visual.*") and
// kMtp ("mtp.*"), which later stages may handle apart from the body (the upstream method keeps
// the vision tower BF16 by default: qwen3_5-architecture-facts.md §8).
enum class Component { kText, kMtp, kVision };

inline constexpr Component kComponents[] = {Component::kText, Component::kMtp, Component::kVision};

std::string_view component_name(Component component);

// Layers of the stack "{layer}" expands over in rules of `component`: num_hidden_layers,
// mtp_num_hidden_layers, or the vision tower's depth (0 without one).
std::int64_t component_layers(const ModelConfig& config, Component component);

// Where a routed expert's Linear lives when the checkpoint packs all experts of a layer into one
// 3-D tensor [num_experts, rows, in] (Qwen3.5/3.6 "mlp.experts.gate_up_proj" [E, 2I, H] holds
// gate in rows [0, I) and up in rows [I, 2I): qwen3_5-architecture-facts.md §6.3). Expert e's
// Linear is rows [row_offset, row_offset + out) of matrix e.
struct PackedWeight {
  std::string_view tensor;      // name pattern of the 3-D tensor (may use "{layer}")
  std::string_view rows;        // dimension expression for its dim 1
  std::string_view row_offset;  // dimension expression, "0" for the first Linear in it
};

// One nn.Linear: `module` is its HF module name pattern; the checkpoint holds
// "<module>.weight" of shape [out, in] (or a slice of a packed tensor, see `packed`) and, where
// `has_bias` says so, "<module>.bias" [out].
struct LinearRule {
  std::string_view module;
  std::string_view role;  // e.g. "q_proj", "expert_down_proj", "router", "lm_head"
  std::string_view out_features;
  std::string_view in_features;
  // Module-name pattern of the fused module vLLM loads this Linear into (its
  // packed_modules_mapping, or the fused MoE layer); Linears sharing one expansion must share a
  // format. Empty: the Linear stands alone.
  std::string_view group = {};
  Candidacy candidacy = Candidacy::kCandidate;
  RulePredicate present = always;
  RulePredicate has_bias = never;
  Component component = Component::kText;
  // Set for per-expert Linears ("{expert}" in `module`) stored in a packed 3-D tensor. A
  // checkpoint may store the same Linears one tensor per expert instead ("<module>.weight", as
  // the exporter writes them and vLLM's Qwen3.5 loader accepts): the inventory takes either.
  std::optional<PackedWeight> packed = std::nullopt;
  // The formats (formats registry names) vLLM can serve this Linear in, where its architecture
  // allows fewer than every format its shape takes; empty: no such limit. The cost stage offers
  // and the exporter accepts only these.
  std::span<const std::string_view> formats = {};
  // The module name pattern vLLM's quantization config lookups see for this Linear, where it
  // differs from `module` (MiniMax-M2's experts: the checkpoint's "block_sparse_moe.experts.E.w1"
  // is looked up as "mlp.experts.E.gate_proj", minimax_m2-architecture-facts.md §8.2, §8.4).
  // Empty: `module`. Tensors keep the checkpoint's names either way.
  std::string_view serving_module = {};
  // A second module name vLLM resolves this Linear's scheme under, where its loader also loads
  // the weight into another module: Gemma 4's k_proj on attention_k_eq_v layers is loaded as
  // v_proj too (vllm/model_executor/models/gemma4.py load_weights, gemma4-architecture-facts.md
  // §10), so the fused qkv_proj's v shard must find the same scheme (or be ignored with it).
  std::string_view serving_alias = {};
};

// A tensor that is not part of a Linear (embeddings, norms, conv kernels); kept as stored.
struct TensorRule {
  std::string_view name;
  std::string_view role;  // e.g. "embedding", "input_layernorm", "q_norm"
  std::vector<std::string_view> shape;
  RulePredicate present = always;
  Component component = Component::kText;
};

struct ArchitectureProfile {
  std::string_view family;                      // e.g. "qwen3_moe"
  std::vector<std::string_view> architectures;  // config.json "architectures"[0] values
  std::vector<TensorRule> tensors;
  std::vector<LinearRule> linears;
  // Dimension expression added to an MTP layer's index where "{layer}" expands in the names of
  // kMtp rules: DeepSeek-V3 stores MTP layer k as "model.layers.<num_hidden_layers + k>.*"
  // (deepseek_v3-architecture-facts.md §6). Empty: 0. Linear::layer keeps k.
  std::string_view mtp_layer_offset = {};
};

// All registered profiles. Adding a family is one file in profiles/ plus one line in the list in
// profile_registry.cpp (explicit, because a self-registering object in a static library is
// dropped by the linker when nothing references it).
std::span<const ArchitectureProfile* const> all_profiles();

// The profile registered for `architecture`, or nullptr.
const ArchitectureProfile* find_profile(std::string_view architecture);

// The profile for `architecture`, or pq::Error
// `<label>: unsupported architecture "X"; supported: A, B, ...`.
const ArchitectureProfile& require_profile(std::string_view architecture, std::string_view label);

std::vector<std::string> supported_architectures();

}  // namespace pq::model
