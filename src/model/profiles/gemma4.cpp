#include <deque>
#include <string>

#include "model/profiles/decoder_blocks.h"
#include "model/profiles/profiles.h"

namespace pq::model::profiles {

namespace {

// Names, shapes and groups from ../shared/docs/gemma4-architecture-facts.md (sections given as §),
// read from transformers models/gemma4/modeling_gemma4.py and vLLM
// vllm/model_executor/models/gemma4.py and gemma4_mm.py. The text model sits under
// "model.language_model." (Gemma4ForConditionalGeneration, §9).

bool sliding_layer(const ModelConfig& config, std::int64_t layer) {
  return config.is_sliding_attention_layer(layer);
}
bool full_layer(const ModelConfig& config, std::int64_t layer) {
  return !config.is_sliding_attention_layer(layer);
}
bool full_layer_with_v_proj(const ModelConfig& config, std::int64_t layer) {
  return full_layer(config, layer) && config.has_v_proj(layer);
}
bool full_layer_without_v_proj(const ModelConfig& config, std::int64_t layer) {
  return full_layer(config, layer) && !config.has_v_proj(layer);
}
bool moe_layer(const ModelConfig& config, std::int64_t layer) {
  return config.is_moe_layer(layer);
}
bool standardized_tower(const ModelConfig& config, std::int64_t) {
  return config.vision && config.vision->standardize;
}

constexpr std::string_view kLayer = "model.language_model.layers.{layer}.";
constexpr std::string_view kVisionLayer = "model.vision_tower.encoder.layers.{layer}.";

// `prefix` + `rest`, kept for the life of the program (rules hold string_views; a deque never
// moves what it holds). Called only while the profile's static tables are built.
std::string_view pattern(std::string_view prefix, std::string_view rest) {
  static std::deque<std::string> patterns;
  return patterns.emplace_back(std::string(prefix) + std::string(rest));
}

// vLLM serves the routed experts of a layer as one FusedMoE module under one scheme (§10, §11);
// its compressed-tensors MoE methods take the formats the Qwen3.5-MoE profile lists
// (qwen3_5.cpp, kExpertFormats: NVFP4, NVFP4A16, MXFP4, MXFP4A16, FP8_E4M3 W8A8, BF16).
constexpr std::string_view kExpertFormats[] = {"NVFP4",    "NVFP4A16", "MXFP4",
                                               "MXFP4A16", "FP8_E4M3", "BF16"};

std::vector<TensorRule> text_tensors() {
  std::vector<TensorRule> rules = {
      {.name = "model.language_model.embed_tokens.weight",
       .role = "embedding",
       .shape = {"vocab_size", "hidden_size"}},
      {.name = "model.language_model.norm.weight", .role = "final_norm", .shape = {"hidden_size"}},
  };
  // Four RMSNorms per layer, weights used as stored (no 1 + w, §3), and the layer's output scale
  // layer_scalar [1] (§2 step 3).
  const auto layer = [&](std::string_view name, std::string_view role,
                         std::vector<std::string_view> shape, RulePredicate present) {
    rules.push_back({.name = pattern(kLayer, name),
                     .role = role,
                     .shape = std::move(shape),
                     .present = present});
  };
  layer("input_layernorm.weight", "input_layernorm", {"hidden_size"}, always);
  layer("post_attention_layernorm.weight", "post_attention_layernorm", {"hidden_size"}, always);
  layer("pre_feedforward_layernorm.weight", "pre_feedforward_layernorm", {"hidden_size"}, always);
  layer("post_feedforward_layernorm.weight", "post_feedforward_layernorm", {"hidden_size"}, always);
  layer("layer_scalar", "layer_scalar", {"1"}, always);
  layer("self_attn.q_norm.weight", "q_norm", {"head_dim"}, sliding_layer);
  layer("self_attn.k_norm.weight", "k_norm", {"head_dim"}, sliding_layer);
  layer("self_attn.q_norm.weight", "q_norm", {"global_head_dim"}, full_layer);
  layer("self_attn.k_norm.weight", "k_norm", {"global_head_dim"}, full_layer);
  // The MoE block's own norms (dense branch _1, expert branch _2, the experts' input _2) and the
  // router's per-dimension input scale and per-expert output scale (§3, §6).
  layer("pre_feedforward_layernorm_2.weight", "pre_feedforward_layernorm_2", {"hidden_size"},
        moe_layer);
  layer("post_feedforward_layernorm_1.weight", "post_feedforward_layernorm_1", {"hidden_size"},
        moe_layer);
  layer("post_feedforward_layernorm_2.weight", "post_feedforward_layernorm_2", {"hidden_size"},
        moe_layer);
  layer("router.scale", "router_scale", {"hidden_size"}, moe_layer);
  layer("router.per_expert_scale", "router_per_expert_scale", {"num_experts"}, moe_layer);
  return rules;
}

std::vector<LinearRule> text_linears() {
  const auto at = [](std::string_view rest) { return pattern(kLayer, rest); };
  const std::string_view qkv = at("self_attn.qkv_proj");
  const std::string_view gate_up = at("mlp.gate_up_proj");
  const std::string_view experts = at("experts");
  // Sliding layers: head_dim and num_key_value_heads; full layers: global_head_dim and the full
  // layers' KV heads, and no v_proj with attention_k_eq_v (§4.1). q, k and v form vLLM's qkv_proj
  // (packed_modules_mapping, §10); on k_eq_v layers vLLM loads k_proj into the V slot too, so
  // the group is {q, k}.
  std::vector<LinearRule> rules = {
      {.module = at("self_attn.q_proj"),
       .role = "q_proj",
       .out_features = "num_attention_heads*head_dim",
       .in_features = "hidden_size",
       .group = qkv,
       .present = sliding_layer},
      {.module = at("self_attn.q_proj"),
       .role = "q_proj",
       .out_features = "num_attention_heads*global_head_dim",
       .in_features = "hidden_size",
       .group = qkv,
       .present = full_layer},
      {.module = at("self_attn.k_proj"),
       .role = "k_proj",
       .out_features = "num_key_value_heads*head_dim",
       .in_features = "hidden_size",
       .group = qkv,
       .present = sliding_layer},
      {.module = at("self_attn.k_proj"),
       .role = "k_proj",
       .out_features = "full_attention_key_value_heads*global_head_dim",
       .in_features = "hidden_size",
       .group = qkv,
       .present = full_layer_with_v_proj},
      // vLLM loads it as v_proj too: its scheme is looked up under both names (§10).
      {.module = at("self_attn.k_proj"),
       .role = "k_proj",
       .out_features = "full_attention_key_value_heads*global_head_dim",
       .in_features = "hidden_size",
       .group = qkv,
       .present = full_layer_without_v_proj,
       .serving_alias = at("self_attn.v_proj")},
      {.module = at("self_attn.v_proj"),
       .role = "v_proj",
       .out_features = "num_key_value_heads*head_dim",
       .in_features = "hidden_size",
       .group = qkv,
       .present = sliding_layer},
      {.module = at("self_attn.v_proj"),
       .role = "v_proj",
       .out_features = "full_attention_key_value_heads*global_head_dim",
       .in_features = "hidden_size",
       .group = qkv,
       .present = full_layer_with_v_proj},
      {.module = at("self_attn.o_proj"),
       .role = "o_proj",
       .out_features = "hidden_size",
       .in_features = "num_attention_heads*head_dim",
       .present = sliding_layer},
      {.module = at("self_attn.o_proj"),
       .role = "o_proj",
       .out_features = "hidden_size",
       .in_features = "num_attention_heads*global_head_dim",
       .present = full_layer},
      // GeGLU MLP on every layer; in the MoE model it runs beside the experts (§5, §6).
      {.module = at("mlp.gate_proj"),
       .role = "gate_proj",
       .out_features = "intermediate_size",
       .in_features = "hidden_size",
       .group = gate_up},
      {.module = at("mlp.up_proj"),
       .role = "up_proj",
       .out_features = "intermediate_size",
       .in_features = "hidden_size",
       .group = gate_up},
      {.module = at("mlp.down_proj"),
       .role = "down_proj",
       .out_features = "hidden_size",
       .in_features = "intermediate_size"},
      // vLLM's GateLinear, built without quant_config (§10).
      {.module = at("router.proj"),
       .role = "router",
       .out_features = "num_experts",
       .in_features = "hidden_size",
       .candidacy = Candidacy::kPassthrough,
       .present = moe_layer},
  };
  // vLLM builds the experts as the FusedMoE module "<layer>.moe.experts" (Gemma4MoE under the
  // prefix "moe", its FusedMoE under "experts") and loads per-expert tensors
  // "experts.E.<proj>.*" into it after renaming them ".moe.experts.E." (gemma4.py
  // _weight_iterator); hf_to_vllm_mapper only moves the prefix "model.language_model." (§10).
  // compressed-tensors resolves the fused module's scheme under expert 0's unfused names, so
  // targets name the experts "moe.experts.E.<proj>" (serving_module).
  // Experts packed as experts.gate_up_proj [E, 2I, H] (gate rows [0, I), up rows [I, 2I)) and
  // experts.down_proj [E, H, I], no ".weight" suffix (§6 step 3, §9). vLLM's loader also takes
  // per-expert 2-D tensors "experts.E.{gate,up,down}_proj.*" (§10), as the exporter writes them.
  const std::string_view packed_gate_up = at("experts.gate_up_proj");
  const std::string_view packed_down = at("experts.down_proj");
  rules.push_back({.module = at("experts.{expert}.gate_proj"),
                   .role = "expert_gate_proj",
                   .out_features = "moe_intermediate_size",
                   .in_features = "hidden_size",
                   .group = experts,
                   .present = moe_layer,
                   .packed = PackedWeight{packed_gate_up, "2*moe_intermediate_size", "0"},
                   .formats = kExpertFormats,
                   .serving_module = at("moe.experts.{expert}.gate_proj")});
  rules.push_back(
      {.module = at("experts.{expert}.up_proj"),
       .role = "expert_up_proj",
       .out_features = "moe_intermediate_size",
       .in_features = "hidden_size",
       .group = experts,
       .present = moe_layer,
       .packed = PackedWeight{packed_gate_up, "2*moe_intermediate_size", "moe_intermediate_size"},
       .formats = kExpertFormats,
       .serving_module = at("moe.experts.{expert}.up_proj")});
  rules.push_back({.module = at("experts.{expert}.down_proj"),
                   .role = "expert_down_proj",
                   .out_features = "hidden_size",
                   .in_features = "moe_intermediate_size",
                   .group = experts,
                   .present = moe_layer,
                   .packed = PackedWeight{packed_down, "hidden_size", "0"},
                   .formats = kExpertFormats,
                   .serving_module = at("moe.experts.{expert}.down_proj")});
  return rules;
}

// The vision tower and its embedder (§9), passed through: norms, the patch embedder's position
// table and the standardization vectors as tensors, its Linears (ClippableLinear wrappers store
// ".linear.weight") listed so that one format for the whole tower can be chosen (BF16 by
// default; vLLM quantizes the large tower in no case that applies here, §10).
constexpr std::string_view kWidth = "vision_config.hidden_size";

std::vector<TensorRule> vision_tensors() {
  const auto at = [](std::string_view rest) { return pattern(kVisionLayer, rest); };
  std::vector<TensorRule> rules = {
      {.name = "model.vision_tower.patch_embedder.position_embedding_table",
       .role = "position_embedding",
       .shape = {"2", "vision_config.num_position_embeddings", kWidth}},
      {.name = "model.vision_tower.std_bias",
       .role = "std_bias",
       .shape = {kWidth},
       .present = standardized_tower},
      {.name = "model.vision_tower.std_scale",
       .role = "std_scale",
       .shape = {kWidth},
       .present = standardized_tower},
      {.name = at("input_layernorm.weight"), .role = "input_layernorm", .shape = {kWidth}},
      {.name = at("post_attention_layernorm.weight"),
       .role = "post_attention_layernorm",
       .shape = {kWidth}},
      {.name = at("pre_feedforward_layernorm.weight"),
       .role = "pre_feedforward_layernorm",
       .shape = {kWidth}},
      {.name = at("post_feedforward_layernorm.weight"),
       .role = "post_feedforward_layernorm",
       .shape = {kWidth}},
      {.name = at("self_attn.q_norm.weight"),
       .role = "q_norm",
       .shape = {"vision_config.head_dim"}},
      {.name = at("self_attn.k_norm.weight"),
       .role = "k_norm",
       .shape = {"vision_config.head_dim"}},
  };
  for (TensorRule& rule : rules) rule.component = Component::kVision;
  return rules;
}

std::vector<LinearRule> vision_linears() {
  const auto at = [](std::string_view rest) { return pattern(kVisionLayer, rest); };
  constexpr std::string_view kQueries = "vision_config.num_attention_heads*vision_config.head_dim";
  constexpr std::string_view kKeys = "vision_config.num_key_value_heads*vision_config.head_dim";
  constexpr std::string_view kInner = "vision_config.intermediate_size";
  std::vector<LinearRule> rules = {
      {.module = at("self_attn.q_proj.linear"),
       .role = "q_proj",
       .out_features = kQueries,
       .in_features = kWidth},
      {.module = at("self_attn.k_proj.linear"),
       .role = "k_proj",
       .out_features = kKeys,
       .in_features = kWidth},
      {.module = at("self_attn.v_proj.linear"),
       .role = "v_proj",
       .out_features = kKeys,
       .in_features = kWidth},
      {.module = at("self_attn.o_proj.linear"),
       .role = "o_proj",
       .out_features = kWidth,
       .in_features = kQueries},
      {.module = at("mlp.gate_proj.linear"),
       .role = "gate_proj",
       .out_features = kInner,
       .in_features = kWidth},
      {.module = at("mlp.up_proj.linear"),
       .role = "up_proj",
       .out_features = kInner,
       .in_features = kWidth},
      {.module = at("mlp.down_proj.linear"),
       .role = "down_proj",
       .out_features = kWidth,
       .in_features = kInner},
      // A Linear over patch_size^2 RGB pixels (§9).
      {.module = "model.vision_tower.patch_embedder.input_proj",
       .role = "patch_embed",
       .out_features = kWidth,
       .in_features =
           "vision_config.in_channels*vision_config.patch_size*vision_config.patch_size"},
      // The scale-free RMSNorm's projection of the tower's output into the text width (§9).
      {.module = "model.embed_vision.embedding_projection",
       .role = "embedding_projection",
       .out_features = "vision_config.out_hidden_size",
       .in_features = kWidth},
  };
  for (LinearRule& rule : rules) {
    rule.candidacy = Candidacy::kPassthrough;
    rule.component = Component::kVision;
  }
  return rules;
}

}  // namespace

// Gemma4ForConditionalGeneration (google/gemma-4-31B-it dense, gemma-4-26B-A4B MoE; §1): 5:1
// sliding/full attention layers with q/k/v norms, sandwich norms around attention and MLP,
// GeGLU, a per-layer output scale, a tied head with a final soft-cap, and on MoE models a
// routed-expert block beside the dense MLP. The vision tower is passed through.
const ArchitectureProfile& gemma4() {
  static const ArchitectureProfile profile{
      .family = "gemma4",
      .architectures = {"Gemma4ForConditionalGeneration"},
      .tensors = concat(text_tensors(), vision_tensors()),
      .linears = concat(text_linears(), lm_head(), vision_linears()),
  };
  return profile;
}

}  // namespace pq::model::profiles
