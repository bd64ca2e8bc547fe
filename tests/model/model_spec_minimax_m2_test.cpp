// The inventory of MiniMax-M2 (../shared/models/minimax_m2-tiny-random, native FP8 128x128 block
// weights), with expected figures worked out by hand from its config.json and
// ../shared/docs/minimax_m2-architecture-facts.md (§).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/json_reader.h"
#include "io/safetensors.h"
#include "model/inspect_report.h"
#include "model/model_spec.h"
#include "support/test_support.h"

namespace pq::model {
namespace {

using ::testing::HasSubstr;

std::filesystem::path checkpoint_dir() {
  return test::shared_dir() / "models" / "minimax_m2-tiny-random";
}

std::vector<TensorDesc> tensor_list(const io::Checkpoint& checkpoint) {
  std::vector<TensorDesc> tensors;
  for (const std::string& name : checkpoint.tensor_names()) {
    const io::TensorInfo& info = checkpoint.info(name);
    tensors.push_back({name, info.dtype, info.shape});
  }
  return tensors;
}

template <typename Build>
std::string error_of(Build build) {
  try {
    build();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

// Config (§1): num_local_experts 8 of width intermediate_size 256 on every layer, rotary_dim 32
// of head_dim 64, quantization_config fp8 with [128, 128] blocks.
TEST(MiniMaxM2Spec, ConfigReadsTheMiniMaxFields) {
  PQ_REQUIRE_SHARED();
  const ModelConfig c = ModelConfig::load(checkpoint_dir());
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.num_experts_per_tok, 2);
  EXPECT_EQ(c.moe_intermediate_size, 256);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_DOUBLE_EQ(c.partial_rotary_factor, 0.5);
  EXPECT_TRUE(c.fp8_block_weights);
  for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) EXPECT_TRUE(c.is_moe_layer(l));
}

TEST(MiniMaxM2Spec, ConfigRefusesVariantsTheFactsDoNotDescribe) {
  PQ_REQUIRE_SHARED();
  const nlohmann::json base = read_json_file(checkpoint_dir() / "config.json");
  const auto error_with = [&](const char* key, nlohmann::json value) {
    nlohmann::json j = base;
    j[key] = std::move(value);
    return error_of([&] { ModelConfig::from_json(j, "config.json"); });
  };
  EXPECT_THAT(error_with("qk_norm_type", "per_head"), HasSubstr("qk_norm_type"));
  EXPECT_THAT(error_with("scoring_func", "softmax"), HasSubstr("scoring_func"));
  nlohmann::json quantization = base["quantization_config"];
  quantization["weight_block_size"] = {1, 128};
  EXPECT_THAT(error_with("quantization_config", quantization),
              HasSubstr("quantization_config.weight_block_size"));
}

// Per layer (§9): q/k/v (one qkv_proj group) and o_proj, a passthrough F32 router, 8 experts x
// {w1, w3, w2} in one group named as vLLM's fused MoE module (§8.2); lm_head opt-in. Every
// attention and expert weight is FP8 with its scale (§6).
TEST(MiniMaxM2Spec, InventoryOfTheTinyCheckpoint) {
  PQ_REQUIRE_SHARED();
  const io::Checkpoint checkpoint = io::Checkpoint::open(checkpoint_dir());
  const ModelSpec spec = load_model_spec(checkpoint_dir());
  EXPECT_EQ(spec.family, "minimax_m2");
  const std::int64_t per_layer = 4 + 1 + 8 * 3;
  EXPECT_EQ(std::ssize(spec.linears), 4 * per_layer + 1);
  EXPECT_EQ(spec.num_candidate_linears(), 4 * (4 + 8 * 3));
  EXPECT_EQ(spec.num_tensors(), checkpoint.tensor_names().size());
  std::int64_t stored = 0;
  for (const std::string& name : checkpoint.tensor_names()) stored += checkpoint.info(name).numel();
  EXPECT_EQ(spec.num_params(), stored);

  std::int64_t fp8 = 0;
  for (const Linear& linear : spec.linears) {
    SCOPED_TRACE(linear.name);
    const bool quantized_at_source = linear.role != "router" && linear.role != "lm_head";
    EXPECT_EQ(linear.is_fp8_source(), quantized_at_source);
    EXPECT_EQ(linear.allows("FP8_SOURCE"), quantized_at_source);
    EXPECT_TRUE(linear.allows("NVFP4"));
    if (!quantized_at_source) continue;
    ++fp8;
    EXPECT_EQ(linear.dtype, io::DType::F8_E4M3);
    EXPECT_EQ(*linear.scale_tensor, linear.name + ".weight_scale_inv");
    EXPECT_EQ(linear.scale_dtype, io::DType::F32);
  }
  EXPECT_EQ(fp8, 4 * (4 + 8 * 3));

  const Linear* w1 = spec.find_linear("model.layers.2.block_sparse_moe.experts.5.w1");
  ASSERT_NE(w1, nullptr);
  EXPECT_EQ(w1->role, "expert_gate_proj");
  EXPECT_EQ(w1->serving_name, "model.layers.2.mlp.experts.5.gate_proj");
  EXPECT_EQ(spec.find_linear("model.layers.2.block_sparse_moe.experts.5.w3")->serving_name,
            "model.layers.2.mlp.experts.5.up_proj");
  EXPECT_EQ(spec.find_linear("model.layers.2.block_sparse_moe.experts.5.w2")->serving_name,
            "model.layers.2.mlp.experts.5.down_proj");
  const Linear* router = spec.find_linear("model.layers.1.block_sparse_moe.gate");
  ASSERT_NE(router, nullptr);
  EXPECT_FALSE(router->is_candidate);
  EXPECT_EQ(router->dtype, io::DType::F32);
  EXPECT_EQ(router->serving_name, "model.layers.1.mlp.gate");
  EXPECT_EQ(spec.find_linear("model.layers.1.self_attn.q_proj")->serving_name,
            "model.layers.1.self_attn.q_proj");

  ASSERT_EQ(spec.groups.size(), 8u);
  for (const SiblingGroup& group : spec.groups) {
    const bool experts = group.name.ends_with(".mlp.experts");
    EXPECT_TRUE(experts || group.name.ends_with(".self_attn.qkv_proj")) << group.name;
    EXPECT_EQ(group.members.size(), experts ? 24u : 3u) << group.name;
  }
  const auto passthrough = spec.passthrough_tensors();
  EXPECT_NE(std::find(passthrough.begin(), passthrough.end(),
                      "model.layers.0.block_sparse_moe.e_score_correction_bias"),
            passthrough.end());
  EXPECT_NE(
      std::find(passthrough.begin(), passthrough.end(), "model.layers.0.self_attn.q_norm.weight"),
      passthrough.end());

  const std::string text = inspect_text(spec);
  EXPECT_THAT(text, HasSubstr("MiniMaxM2ForCausalLM (profile minimax_m2)"));
  EXPECT_THAT(text, HasSubstr("fp8 source    112 Linears stored as 128x128 block-scaled FP8"));
  const auto json = inspect_json(spec);
  EXPECT_EQ(json["linears"][0]["fp8_source_scale"],
            "model.layers.0.self_attn.q_proj.weight_scale_inv");
}

// A block scale that is missing, misshapen or of the wrong dtype is a one-line error naming it.
TEST(MiniMaxM2Spec, BadBlockScalesAreRefused) {
  PQ_REQUIRE_SHARED();
  const io::Checkpoint checkpoint = io::Checkpoint::open(checkpoint_dir());
  const ModelConfig config = ModelConfig::load(checkpoint_dir());
  const std::string scale = "model.layers.3.block_sparse_moe.experts.6.w2.weight_scale_inv";
  const auto error_with = [&](auto edit) {
    std::vector<TensorDesc> tensors = tensor_list(checkpoint);
    edit(tensors);
    return error_of([&] { build_model_spec(config, tensors, "ckpt"); });
  };
  const auto find = [&](std::vector<TensorDesc>& tensors) {
    return std::find_if(tensors.begin(), tensors.end(),
                        [&](const TensorDesc& t) { return t.name == scale; });
  };
  EXPECT_THAT(error_with([&](auto& t) { t.erase(find(t)); }),
              HasSubstr("missing tensor \"" + scale + "\""));
  EXPECT_THAT(error_with([&](auto& t) {
                find(t)->shape = {2, 1};
              }),
              HasSubstr("has shape [2, 1], expected [1, 2]"));
  EXPECT_THAT(error_with([&](auto& t) { find(t)->dtype = io::DType::F8_E4M3; }),
              HasSubstr("a block scale must be F32 or BF16"));
  // Without quantization_config an F8_E4M3 weight is not taken for a source weight.
  ModelConfig plain = config;
  plain.fp8_block_weights = false;
  EXPECT_THAT(error_of([&] { build_model_spec(plain, tensor_list(checkpoint), "ckpt"); }),
              HasSubstr("has dtype F8_E4M3"));
}

}  // namespace
}  // namespace pq::model
