// The inventory of DeepSeek-V3 (../shared/models/deepseek_v3-tiny-random: native FP8 128x128
// block weights, the MTP layer stored as model.layers.4), with expected figures worked out by hand
// from its config.json and ../shared/docs/deepseek_v3-architecture-facts.md (§).
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
  return test::shared_dir() / "models" / "deepseek_v3-tiny-random";
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

// Config (§1, §12): 16 routed experts top-4 of width 128 in 4 groups (2 kept), scaled by 2.5; one
// shared expert; layer 0 dense (first_k_dense_replace 1); MLA ranks 64 / 32, heads 32 + 16 / 32;
// one MTP layer, built like a MoE body layer.
TEST(DeepSeekV3Spec, ConfigReadsTheDeepSeekFields) {
  PQ_REQUIRE_SHARED();
  const ModelConfig c = ModelConfig::load(checkpoint_dir());
  EXPECT_EQ(c.num_experts, 16);
  EXPECT_EQ(c.num_experts_per_tok, 4);
  EXPECT_EQ(c.moe_intermediate_size, 128);
  EXPECT_EQ(c.shared_expert_intermediate_size, 128);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_EQ(c.n_group, 4);
  EXPECT_EQ(c.topk_group, 2);
  EXPECT_DOUBLE_EQ(c.routed_scaling_factor, 2.5);
  ASSERT_TRUE(c.mla.has_value());
  EXPECT_EQ(c.mla->q_lora_rank, 64);
  EXPECT_EQ(c.mla->kv_lora_rank, 32);
  EXPECT_EQ(c.mla->qk_head_dim(), 48);
  EXPECT_EQ(c.mla->v_head_dim, 32);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.mtp_num_hidden_layers, 1);
  EXPECT_TRUE(c.fp8_block_weights);
  EXPECT_FALSE(c.is_moe_layer(0));
  for (std::int64_t l = 1; l <= 4; ++l) EXPECT_TRUE(c.is_moe_layer(l));
}

TEST(DeepSeekV3Spec, ConfigRefusesVariantsTheFactsDoNotDescribe) {
  PQ_REQUIRE_SHARED();
  const nlohmann::json base = read_json_file(checkpoint_dir() / "config.json");
  const auto error_with = [&](const char* key, nlohmann::json value) {
    nlohmann::json j = base;
    j[key] = std::move(value);
    return error_of([&] { ModelConfig::from_json(j, "config.json"); });
  };
  EXPECT_THAT(error_with("scoring_func", "softmax"), HasSubstr("scoring_func"));
  EXPECT_THAT(error_with("topk_method", "greedy"), HasSubstr("topk_method"));
  EXPECT_THAT(error_with("rope_interleave", false), HasSubstr("rope_interleave"));
  EXPECT_THAT(error_with("n_group", 3), HasSubstr("not a multiple of n_group 3"));
  nlohmann::json small_groups = base;
  small_groups["n_group"] = 8;
  small_groups["topk_group"] = 1;
  EXPECT_THAT(error_of([&] { ModelConfig::from_json(small_groups, "config.json"); }),
              HasSubstr("8 groups of 2 experts, 1 kept, cannot supply num_experts_per_tok 4"));
  EXPECT_EQ(error_with("first_k_dense_replace", 2), "no error");
}

// Per body layer (§3-§5, §9): q_a/q_b/kv_a/kv_b/o_proj with {q_a, kv_a} as vLLM's
// fused_qkv_a_proj; layer 0 a dense gate/up/down (gate_up_proj), layers 1-3 a passthrough router,
// 16 experts x 3 (one FusedMoE group) and a shared expert (gate_up_proj). The MTP layer
// model.layers.4 (component mtp, layer 0) the same plus passthrough eh_proj and shared_head.head;
// lm_head opt-in. Every decoder-layer Linear is FP8 with its scale (§7): 232 of them.
TEST(DeepSeekV3Spec, InventoryOfTheTinyCheckpoint) {
  PQ_REQUIRE_SHARED();
  const io::Checkpoint checkpoint = io::Checkpoint::open(checkpoint_dir());
  const ModelSpec spec = load_model_spec(checkpoint_dir());
  EXPECT_EQ(spec.family, "deepseek_v3");
  const std::int64_t attention = 5;
  const std::int64_t moe_layer = attention + 1 + 16 * 3 + 3;
  EXPECT_EQ(std::ssize(spec.linears), (attention + 3) + 3 * moe_layer + 1 + moe_layer + 2);
  EXPECT_EQ(spec.num_candidate_linears(), (attention + 3) + 4 * (moe_layer - 1));
  EXPECT_EQ(spec.num_tensors(), checkpoint.tensor_names().size());
  std::int64_t stored = 0;
  for (const std::string& name : checkpoint.tensor_names()) stored += checkpoint.info(name).numel();
  EXPECT_EQ(spec.num_params(), stored);

  std::int64_t fp8 = 0;
  for (const Linear& linear : spec.linears) {
    SCOPED_TRACE(linear.name);
    EXPECT_EQ(linear.is_fp8_source(), linear.is_candidate);
    EXPECT_EQ(linear.allows("FP8_SOURCE"), linear.is_candidate);
    if (!linear.is_fp8_source()) {
      EXPECT_EQ(linear.dtype, io::DType::BF16);
      continue;
    }
    ++fp8;
    EXPECT_EQ(linear.dtype, io::DType::F8_E4M3);
    EXPECT_EQ(*linear.scale_tensor, linear.name + ".weight_scale_inv");
    EXPECT_EQ(linear.scale_dtype, io::DType::F32);
  }
  EXPECT_EQ(fp8, 232);

  const Linear* kv_a = spec.find_linear("model.layers.2.self_attn.kv_a_proj_with_mqa");
  ASSERT_NE(kv_a, nullptr);
  EXPECT_EQ(kv_a->out_features, 48);
  EXPECT_EQ(kv_a->group, "model.layers.2.self_attn.fused_qkv_a_proj");
  EXPECT_EQ(spec.find_linear("model.layers.2.self_attn.q_a_proj")->group, kv_a->group);
  EXPECT_FALSE(spec.find_linear("model.layers.2.self_attn.q_b_proj")->group.has_value());
  EXPECT_EQ(spec.find_linear("model.layers.2.self_attn.kv_b_proj")->out_features, 4 * (32 + 32));
  EXPECT_EQ(spec.find_linear("model.layers.0.mlp.up_proj")->group,
            "model.layers.0.mlp.gate_up_proj");
  EXPECT_EQ(spec.find_linear("model.layers.3.mlp.shared_experts.gate_proj")->group,
            "model.layers.3.mlp.shared_experts.gate_up_proj");
  const Linear* router = spec.find_linear("model.layers.1.mlp.gate");
  ASSERT_NE(router, nullptr);
  EXPECT_FALSE(router->is_candidate);
  EXPECT_EQ(spec.find_linear("model.layers.0.mlp.gate"), nullptr);

  const Linear* mtp_expert = spec.find_linear("model.layers.4.mlp.experts.15.down_proj");
  ASSERT_NE(mtp_expert, nullptr);
  EXPECT_EQ(mtp_expert->component, Component::kMtp);
  EXPECT_EQ(mtp_expert->layer, 0);
  EXPECT_EQ(mtp_expert->group, "model.layers.4.mlp.experts");
  EXPECT_TRUE(mtp_expert->is_candidate);
  for (const char* name : {"model.layers.4.eh_proj", "model.layers.4.shared_head.head"}) {
    const Linear* linear = spec.find_linear(name);
    ASSERT_NE(linear, nullptr) << name;
    EXPECT_EQ(linear->component, Component::kMtp);
    EXPECT_FALSE(linear->is_candidate);
  }

  ASSERT_EQ(spec.groups.size(), 2u + 3u * 3u + 3u);
  for (const SiblingGroup& group : spec.groups) {
    const std::size_t members = group.name.ends_with(".mlp.experts") ? 48u : 2u;
    EXPECT_EQ(group.members.size(), members) << group.name;
  }
  const auto passthrough = spec.passthrough_tensors();
  for (const char* name :
       {"model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.4.embed_tokens.weight",
        "model.layers.4.enorm.weight", "model.layers.0.self_attn.kv_a_layernorm.weight"}) {
    EXPECT_NE(std::find(passthrough.begin(), passthrough.end(), name), passthrough.end()) << name;
  }

  const std::string text = inspect_text(spec);
  EXPECT_THAT(text, HasSubstr("DeepseekV3ForCausalLM (profile deepseek_v3)"));
  EXPECT_THAT(text, HasSubstr("fp8 source    232 Linears stored as 128x128 block-scaled FP8"));
}

// Without q_lora_rank (V2-Lite style) q_proj replaces q_a_proj / q_b_proj and kv_a_proj_with_mqa
// stands alone; the tiny checkpoint then holds tensors the profile does not expect.
TEST(DeepSeekV3Spec, WithoutQLoraTheQueryIsOneProjection) {
  PQ_REQUIRE_SHARED();
  nlohmann::json j = read_json_file(checkpoint_dir() / "config.json");
  j["q_lora_rank"] = nullptr;
  const ModelConfig config = ModelConfig::from_json(j, "config.json");
  EXPECT_EQ(config.mla->q_lora_rank, 0);
  const io::Checkpoint checkpoint = io::Checkpoint::open(checkpoint_dir());
  std::vector<TensorDesc> tensors;
  for (const std::string& name : checkpoint.tensor_names()) {
    const io::TensorInfo& info = checkpoint.info(name);
    tensors.push_back({name, info.dtype, info.shape});
  }
  EXPECT_THAT(error_of([&] { build_model_spec(config, tensors, "ckpt"); }),
              HasSubstr("missing tensor \"model.layers.0.self_attn.q_proj.weight\""));
}

}  // namespace
}  // namespace pq::model
