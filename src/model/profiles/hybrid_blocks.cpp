#include "model/profiles/hybrid_blocks.h"

#include <deque>
#include <mutex>
#include <string>

#include "model/profiles/decoder_blocks.h"

namespace pq::model::profiles {

namespace {

// `prefix` + `rest`, kept for the life of the program: rules hold string_views, and the same
// blocks are written under several prefixes (a deque never moves what it holds).
std::string_view pattern(std::string_view prefix, std::string_view rest) {
  static std::mutex mutex;
  static std::deque<std::string> patterns;
  const std::lock_guard lock(mutex);
  return patterns.emplace_back(std::string(prefix) + std::string(rest));
}

bool linear_attention_layer(const ModelConfig& config, std::int64_t layer) {
  return config.is_linear_attention_layer(layer);
}
bool full_attention_layer(const ModelConfig& config, std::int64_t layer) {
  return !config.is_linear_attention_layer(layer);
}
bool moe_layer(const ModelConfig& config, std::int64_t layer) {
  return config.is_moe_layer(layer);
}
bool dense_layer(const ModelConfig& config, std::int64_t layer) {
  return !config.is_moe_layer(layer);
}
// The MTP layer's MLP is sparse exactly when the model has experts (§7).
bool has_experts(const ModelConfig& config, std::int64_t) {
  return config.num_experts > 0;
}
bool has_no_experts(const ModelConfig& config, std::int64_t) {
  return config.num_experts == 0;
}
bool has_mtp(const ModelConfig& config, std::int64_t) {
  return config.mtp_num_hidden_layers > 0;
}

// One decoder layer's rules: the body's layers (whose layer type picks the token mixer) or the
// MTP head's (always full attention).
struct LayerPlan {
  std::string_view prefix;  // e.g. "model.language_model.layers.{layer}."
  Component component;
  RulePredicate full_attention;
  RulePredicate linear_attention;
  RulePredicate dense_mlp;
  RulePredicate sparse_mlp;
  bool packed_experts;
  std::span<const std::string_view> expert_formats;
};

LayerPlan body_plan(const HybridLayout& layout) {
  LayerPlan plan{.prefix = pattern(layout.text_prefix, "layers.{layer}."),
                 .component = Component::kText,
                 .full_attention = full_attention_layer,
                 .linear_attention = linear_attention_layer,
                 .dense_mlp = always,
                 .sparse_mlp = never,
                 .packed_experts = layout.packed_experts,
                 .expert_formats = layout.expert_formats};
  switch (layout.body_mlp) {
    case BodyMlp::kDense:
      break;
    case BodyMlp::kMoe:
      plan.dense_mlp = never;
      plan.sparse_mlp = always;
      break;
    case BodyMlp::kConfigDecides:
      plan.dense_mlp = dense_layer;
      plan.sparse_mlp = moe_layer;
      break;
  }
  return plan;
}

LayerPlan mtp_plan(const HybridLayout& layout) {
  return {.prefix = "mtp.layers.{layer}.",
          .component = Component::kMtp,
          .full_attention = always,
          .linear_attention = never,
          .dense_mlp = has_no_experts,
          .sparse_mlp = has_experts,
          .packed_experts = false,
          .expert_formats = layout.expert_formats};
}

// in_proj_b and in_proj_a have linear_num_value_heads rows each (32 in Qwen3.5/3.6-35B-A3B, 48 in
// Qwen3.6-27B); vLLM serves them as one MergedColumnParallelLinear in_proj_ba of 2 * Hv rows
// (qwen3_5.py packed_modules_mapping, gdn_linear_attn.py create_ba_proj). What stock vLLM can
// serve there, for every TP degree and on Hopper:
// - FP8_BLOCK: no. A merged layer's non-last member needs a multiple of 128 rows
//   (fp8_utils.py validate_fp8_block_shape; gdn_linear_attn.py: "ba_proj doesn't support
//   blockwise fp8 quantization"; sglang issue #19045: partition 8 not divisible by block_n 128).
// - NVFP4, NVFP4A16, MXFP4, MXFP4A16, INT4_W4A16, INT8_W8A16 and FP8_E4M3A16: no. On Hopper they
//   run through Marlin, whose output partition must be a multiple of 64 (marlin_utils.py
//   GPTQ_MARLIN_MIN_THREAD_N): 96 rows (27B) never are, 64 (35B) only at TP 1 (vLLM issue
//   #35924, fixed for the unquantized path by splitting the layer in PR #36199 / #36329).
// - MXFP8: no; its kernels need out % 128 == 0 (the format's own shape rule).
// - FP8_E4M3 (W8A8, per-channel scales), FP8_E4M3_TENSOR (W8A8, per-tensor) and BF16: yes.
//   cutlass scaled_mm on sm89+ needs 16-aligned dimensions only, channel scales load per shard
//   and per-tensor ones are requantised to their max (format-facts.md A.3.3).
// Together the two are about 0.01% of the parameters, so nothing is lost by the limit.
constexpr std::string_view kBetaAlphaFormats[] = {"BF16", "FP8_E4M3", "FP8_E4M3_TENSOR"};

// conv1d runs over q, k and v: 2 * key_dim + value_dim channels (§4.1).
constexpr std::string_view kConvChannels =
    "2*linear_num_key_heads*linear_key_head_dim+linear_num_value_heads*linear_value_head_dim";
constexpr std::string_view kValueDim = "linear_num_value_heads*linear_value_head_dim";

std::vector<TensorRule> layer_tensors(const LayerPlan& plan) {
  const auto rule = [&](std::string_view name, std::string_view role,
                        std::vector<std::string_view> shape, RulePredicate present) {
    return TensorRule{.name = pattern(plan.prefix, name),
                      .role = role,
                      .shape = std::move(shape),
                      .present = present,
                      .component = plan.component};
  };
  return {
      rule("input_layernorm.weight", "input_layernorm", {"hidden_size"}, always),
      rule("post_attention_layernorm.weight", "post_attention_layernorm", {"hidden_size"}, always),
      rule("self_attn.q_norm.weight", "q_norm", {"head_dim"}, plan.full_attention),
      rule("self_attn.k_norm.weight", "k_norm", {"head_dim"}, plan.full_attention),
      // Depthwise [channels, 1, kernel], no bias (§4.1).
      rule("linear_attn.conv1d.weight", "conv1d", {kConvChannels, "1", "linear_conv_kernel_dim"},
           plan.linear_attention),
      // Per value head; F32 or BF16 as stored (§9).
      rule("linear_attn.A_log", "A_log", {"linear_num_value_heads"}, plan.linear_attention),
      rule("linear_attn.dt_bias", "dt_bias", {"linear_num_value_heads"}, plan.linear_attention),
      // The gated RMSNorm, one weight of value-head width shared by all heads (§3.2).
      rule("linear_attn.norm.weight", "linear_attn_norm", {"linear_value_head_dim"},
           plan.linear_attention),
  };
}

std::vector<LinearRule> layer_linears(const LayerPlan& plan, bool fused_gdn_projections) {
  const auto linear = [&](std::string_view module, std::string_view role, std::string_view out,
                          std::string_view in, std::string_view group, RulePredicate present) {
    return LinearRule{.module = pattern(plan.prefix, module),
                      .role = role,
                      .out_features = out,
                      .in_features = in,
                      .group = group.empty() ? group : pattern(plan.prefix, group),
                      .present = present,
                      .component = plan.component};
  };
  // q_proj yields each head's query and, with attn_output_gate, its gate (§5).
  constexpr std::string_view kQueryRows =
      "num_attention_heads*head_dim+attn_output_gate*num_attention_heads*head_dim";
  std::vector<LinearRule> rules = {
      linear("self_attn.q_proj", "q_proj", kQueryRows, "hidden_size", "self_attn.qkv_proj",
             plan.full_attention),
      linear("self_attn.k_proj", "k_proj", "num_key_value_heads*head_dim", "hidden_size",
             "self_attn.qkv_proj", plan.full_attention),
      linear("self_attn.v_proj", "v_proj", "num_key_value_heads*head_dim", "hidden_size",
             "self_attn.qkv_proj", plan.full_attention),
      linear("self_attn.o_proj", "o_proj", "hidden_size", "num_attention_heads*head_dim", "",
             plan.full_attention),
  };
  for (LinearRule& rule : rules) rule.has_bias = attention_bias;
  if (fused_gdn_projections) {
    // vLLM loads each as the single tensor it is, interleaved layout and all (§10).
    rules.push_back(linear("linear_attn.in_proj_qkvz", "in_proj_qkvz",
                           "2*linear_num_key_heads*linear_key_head_dim+2*linear_num_value_heads*"
                           "linear_value_head_dim",
                           "hidden_size", "", plan.linear_attention));
    rules.push_back(linear("linear_attn.in_proj_ba", "in_proj_ba", "2*linear_num_value_heads",
                           "hidden_size", "", plan.linear_attention));
  } else {
    rules.push_back(linear("linear_attn.in_proj_qkv", "in_proj_qkv", kConvChannels, "hidden_size",
                           "linear_attn.in_proj_qkvz", plan.linear_attention));
    rules.push_back(linear("linear_attn.in_proj_z", "in_proj_z", kValueDim, "hidden_size",
                           "linear_attn.in_proj_qkvz", plan.linear_attention));
    for (const std::string_view projection : {"in_proj_b", "in_proj_a"}) {
      LinearRule rule =
          linear(pattern("linear_attn.", projection), projection, "linear_num_value_heads",
                 "hidden_size", "linear_attn.in_proj_ba", plan.linear_attention);
      rule.formats = kBetaAlphaFormats;
      rules.push_back(rule);
    }
  }
  rules.push_back(linear("linear_attn.out_proj", "out_proj", "hidden_size", kValueDim, "",
                         plan.linear_attention));

  // Dense SwiGLU (§6.1).
  rules.push_back(linear("mlp.gate_proj", "gate_proj", "intermediate_size", "hidden_size",
                         "mlp.gate_up_proj", plan.dense_mlp));
  rules.push_back(linear("mlp.up_proj", "up_proj", "intermediate_size", "hidden_size",
                         "mlp.gate_up_proj", plan.dense_mlp));
  rules.push_back(
      linear("mlp.down_proj", "down_proj", "hidden_size", "intermediate_size", "", plan.dense_mlp));

  // Sparse MoE block (§6.2). vLLM builds the router and the shared-expert gate unquantized.
  LinearRule router =
      linear("mlp.gate", "router", "num_experts", "hidden_size", "", plan.sparse_mlp);
  router.candidacy = Candidacy::kPassthrough;
  rules.push_back(router);
  rules.push_back(linear("mlp.shared_expert.gate_proj", "shared_expert_gate_proj",
                         "shared_expert_intermediate_size", "hidden_size",
                         "mlp.shared_expert.gate_up_proj", plan.sparse_mlp));
  rules.push_back(linear("mlp.shared_expert.up_proj", "shared_expert_up_proj",
                         "shared_expert_intermediate_size", "hidden_size",
                         "mlp.shared_expert.gate_up_proj", plan.sparse_mlp));
  rules.push_back(linear("mlp.shared_expert.down_proj", "shared_expert_down_proj", "hidden_size",
                         "shared_expert_intermediate_size", "", plan.sparse_mlp));
  LinearRule shared_gate = linear("mlp.shared_expert_gate", "shared_expert_gate", "1",
                                  "hidden_size", "", plan.sparse_mlp);
  shared_gate.candidacy = Candidacy::kPassthrough;
  rules.push_back(shared_gate);
  // Every expert projection of a layer: one fused MoE module in vLLM, one scheme.
  LinearRule gate = linear("mlp.experts.{expert}.gate_proj", "expert_gate_proj",
                           "moe_intermediate_size", "hidden_size", "mlp.experts", plan.sparse_mlp);
  LinearRule up = linear("mlp.experts.{expert}.up_proj", "expert_up_proj", "moe_intermediate_size",
                         "hidden_size", "mlp.experts", plan.sparse_mlp);
  LinearRule down = linear("mlp.experts.{expert}.down_proj", "expert_down_proj", "hidden_size",
                           "moe_intermediate_size", "mlp.experts", plan.sparse_mlp);
  for (LinearRule* expert : {&gate, &up, &down}) expert->formats = plan.expert_formats;
  if (plan.packed_experts) {
    // Expert e's gate is rows [0, I) of gate_up_proj[e], its up rows [I, 2I) (§6.3).
    const std::string_view gate_up = pattern(plan.prefix, "mlp.experts.gate_up_proj");
    gate.packed = PackedWeight{gate_up, "2*moe_intermediate_size", "0"};
    up.packed = PackedWeight{gate_up, "2*moe_intermediate_size", "moe_intermediate_size"};
    down.packed = PackedWeight{pattern(plan.prefix, "mlp.experts.down_proj"), "hidden_size", "0"};
  }
  rules.insert(rules.end(), {gate, up, down});
  return rules;
}

}  // namespace

std::vector<TensorRule> hybrid_tensors(const HybridLayout& layout) {
  const std::vector<TensorRule> single = {
      {.name = pattern(layout.text_prefix, "embed_tokens.weight"),
       .role = "embedding",
       .shape = {"vocab_size", "hidden_size"}},
      {.name = pattern(layout.text_prefix, "norm.weight"),
       .role = "final_norm",
       .shape = {"hidden_size"}},
      // The MTP head's zero-centred RMSNorms (§7); it shares the embedding and lm_head.
      {.name = "mtp.pre_fc_norm_embedding.weight",
       .role = "pre_fc_norm_embedding",
       .shape = {"hidden_size"},
       .present = has_mtp,
       .component = Component::kMtp},
      {.name = "mtp.pre_fc_norm_hidden.weight",
       .role = "pre_fc_norm_hidden",
       .shape = {"hidden_size"},
       .present = has_mtp,
       .component = Component::kMtp},
      {.name = "mtp.norm.weight",
       .role = "final_norm",
       .shape = {"hidden_size"},
       .present = has_mtp,
       .component = Component::kMtp},
  };
  return concat(single, layer_tensors(body_plan(layout)), layer_tensors(mtp_plan(layout)));
}

std::vector<LinearRule> hybrid_linears(const HybridLayout& layout) {
  // fc joins the normed embedding and hidden state, [H, 2H], embedding columns first (§7).
  const std::vector<LinearRule> mtp_fc = {{.module = "mtp.fc",
                                           .role = "fc",
                                           .out_features = "hidden_size",
                                           .in_features = "2*hidden_size",
                                           .present = has_mtp,
                                           .component = Component::kMtp}};
  return concat(layer_linears(body_plan(layout), layout.fused_gdn_projections), lm_head(),
                layer_linears(mtp_plan(layout), false), mtp_fc);
}

}  // namespace pq::model::profiles
