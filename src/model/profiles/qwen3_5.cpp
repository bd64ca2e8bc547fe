#include "model/profiles/decoder_blocks.h"
#include "model/profiles/hybrid_blocks.h"
#include "model/profiles/profiles.h"

namespace pq::model::profiles {

namespace {

// The vision tower "model.visual.*" (qwen3_5-architecture-facts.md §8): a conv patch embedding,
// learned position embeddings, vision_config.depth pre-norm blocks and a merger that joins
// spatial_merge_size^2 patches into one text-width token. Its Linears all carry biases; they are
// listed so that one format for the whole tower can be chosen (BF16 by default, as upstream), but
// never weighed against the text model's.
constexpr std::string_view kWidth = "vision_config.hidden_size";
constexpr std::string_view kMerged =
    "vision_config.hidden_size*vision_config.spatial_merge_size*vision_config.spatial_merge_size";

std::vector<TensorRule> vision_tensors() {
  std::vector<TensorRule> rules = {
      {.name = "model.visual.patch_embed.proj.weight",
       .role = "patch_embed",
       .shape = {kWidth, "vision_config.in_channels", "vision_config.temporal_patch_size",
                 "vision_config.patch_size", "vision_config.patch_size"}},
      {.name = "model.visual.patch_embed.proj.bias", .role = "bias", .shape = {kWidth}},
      {.name = "model.visual.pos_embed.weight",
       .role = "pos_embed",
       .shape = {"vision_config.num_position_embeddings", kWidth}},
      // LayerNorms (weight and bias).
      {.name = "model.visual.blocks.{layer}.norm1.weight", .role = "norm1", .shape = {kWidth}},
      {.name = "model.visual.blocks.{layer}.norm1.bias", .role = "bias", .shape = {kWidth}},
      {.name = "model.visual.blocks.{layer}.norm2.weight", .role = "norm2", .shape = {kWidth}},
      {.name = "model.visual.blocks.{layer}.norm2.bias", .role = "bias", .shape = {kWidth}},
      {.name = "model.visual.merger.norm.weight", .role = "merger_norm", .shape = {kWidth}},
      {.name = "model.visual.merger.norm.bias", .role = "bias", .shape = {kWidth}},
  };
  for (TensorRule& rule : rules) rule.component = Component::kVision;
  return rules;
}

std::vector<LinearRule> vision_linears() {
  std::vector<LinearRule> rules = {
      {.module = "model.visual.blocks.{layer}.attn.qkv",
       .role = "attn_qkv",
       .out_features = "3*vision_config.hidden_size",
       .in_features = kWidth},
      {.module = "model.visual.blocks.{layer}.attn.proj",
       .role = "attn_proj",
       .out_features = kWidth,
       .in_features = kWidth},
      {.module = "model.visual.blocks.{layer}.mlp.linear_fc1",
       .role = "mlp_fc1",
       .out_features = "vision_config.intermediate_size",
       .in_features = kWidth},
      {.module = "model.visual.blocks.{layer}.mlp.linear_fc2",
       .role = "mlp_fc2",
       .out_features = kWidth,
       .in_features = "vision_config.intermediate_size"},
      {.module = "model.visual.merger.linear_fc1",
       .role = "merger_fc1",
       .out_features = kMerged,
       .in_features = kMerged},
      {.module = "model.visual.merger.linear_fc2",
       .role = "merger_fc2",
       .out_features = "vision_config.out_hidden_size",
       .in_features = kMerged},
  };
  for (LinearRule& rule : rules) {
    rule.candidacy = Candidacy::kPassthrough;
    rule.has_bias = always;
    rule.component = Component::kVision;
  }
  return rules;
}

// Both wrappers nest the text model under model.language_model and store Qwen3.5's split Gated
// DeltaNet projections (§4.1, §9).
constexpr HybridLayout kDense{.text_prefix = "model.language_model.", .body_mlp = BodyMlp::kDense};
// vLLM serves the routed experts as one fused MoE module whose compressed-tensors methods
// (compressed_tensors_moe.py get_moe_method) the upstream quantizer limits, in its
// vllm_qwen3_5_packed_moe profile, to NVFP4, FP8_E4M3, FP8_E5M2, BF16 and MXFP4 on ".mlp.experts"
// (method-facts.md §4). In this registry: NVFP4 (W4A4 or A16), MXFP4 (W4A4 or A16), FP8_E4M3
// (W8A8; the MoE FP8 method needs quantized activations, so FP8_E4M3A16 is not served) and BF16.
constexpr std::string_view kExpertFormats[] = {"NVFP4",    "NVFP4A16", "MXFP4",
                                               "MXFP4A16", "FP8_E4M3", "BF16"};
constexpr HybridLayout kMoe{.text_prefix = "model.language_model.",
                            .body_mlp = BodyMlp::kMoe,
                            .packed_experts = true,
                            .expert_formats = kExpertFormats};

}  // namespace

// Qwen3_5ForConditionalGeneration (Qwen3.5 / Qwen3.6 dense, e.g. Qwen3.6-27B): every layer has a
// dense MLP; text model, MTP head and vision tower (transformers models/qwen3_5, §1, §9).
const ArchitectureProfile& qwen3_5() {
  static const ArchitectureProfile profile{
      .family = "qwen3_5",
      .architectures = {"Qwen3_5ForConditionalGeneration"},
      .tensors = concat(hybrid_tensors(kDense), vision_tensors()),
      .linears = concat(hybrid_linears(kDense), vision_linears()),
  };
  return profile;
}

// Qwen3_5MoeForConditionalGeneration (e.g. Qwen3.6-35B-A3B): every layer is a sparse MoE block
// with a shared expert, the body's experts packed, the MTP head's per expert (§6.3).
const ArchitectureProfile& qwen3_5_moe() {
  static const ArchitectureProfile profile{
      .family = "qwen3_5_moe",
      .architectures = {"Qwen3_5MoeForConditionalGeneration"},
      .tensors = concat(hybrid_tensors(kMoe), vision_tensors()),
      .linears = concat(hybrid_linears(kMoe), vision_linears()),
  };
  return profile;
}

}  // namespace pq::model::profiles
