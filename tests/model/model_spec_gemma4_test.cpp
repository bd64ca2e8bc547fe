// The inventory of Gemma 4 (../shared/models/gemma4-tiny-random, the 31B layout, and
// gemma4-moe-tiny-random, the 26B-A4B layout), with expected figures worked out by hand from
// their config.json and ../shared/docs/gemma4-architecture-facts.md (§).
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

std::filesystem::path dense_dir() {
  return test::shared_dir() / "models" / "gemma4-tiny-random";
}
std::filesystem::path moe_dir() {
  return test::shared_dir() / "models" / "gemma4-moe-tiny-random";
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

bool contains(const std::vector<std::string>& names, const std::string& name) {
  return std::find(names.begin(), names.end(), name) != names.end();
}

// text_config (§1): layers SSSSSF x 2, sliding head_dim 32 with 2 KV heads, full layers
// global_head_dim 64 with num_global_key_value_heads 1 (attention_k_eq_v), per-layer-type RoPE
// (§4.3), GeGLU, soft-cap 30; the MoE checkpoint's 8 experts top-2 of width 32 on every layer.
TEST(Gemma4Spec, ConfigReadsTheGemma4Fields) {
  PQ_REQUIRE_SHARED();
  const ModelConfig c = ModelConfig::load(dense_dir());
  ASSERT_TRUE(c.gemma4.has_value());
  EXPECT_EQ(c.hidden_act, "gelu_pytorch_tanh");
  EXPECT_EQ(c.head_dim, 32);
  EXPECT_EQ(c.gemma4->global_head_dim, 64);
  EXPECT_EQ(c.gemma4->full_key_value_heads, 1);
  EXPECT_TRUE(c.gemma4->attention_k_eq_v);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e4);
  EXPECT_EQ(c.rope_scaling.type, "default");
  EXPECT_DOUBLE_EQ(c.gemma4->full_rope_theta, 1e6);
  EXPECT_DOUBLE_EQ(c.gemma4->full_partial_rotary_factor, 0.25);
  EXPECT_DOUBLE_EQ(c.gemma4->final_logit_softcapping, 30.0);
  EXPECT_EQ(c.sliding_window, 8);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.num_experts, 0);
  for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const bool full = l == 5 || l == 11;
    EXPECT_EQ(c.is_sliding_attention_layer(l), !full) << l;
    EXPECT_EQ(c.attention_head_dim(l), full ? 64 : 32) << l;
    EXPECT_EQ(c.attention_key_value_heads(l), full ? 1 : 2) << l;
    EXPECT_EQ(c.has_v_proj(l), !full) << l;
  }
  ASSERT_TRUE(c.vision.has_value());
  EXPECT_EQ(c.vision->depth, 2);
  EXPECT_EQ(c.vision->out_hidden_size, 64);

  const ModelConfig m = ModelConfig::load(moe_dir());
  EXPECT_EQ(m.num_experts, 8);
  EXPECT_EQ(m.num_experts_per_tok, 2);
  EXPECT_EQ(m.moe_intermediate_size, 32);
  EXPECT_EQ(m.intermediate_size, 64);
  for (std::int64_t l = 0; l < m.num_hidden_layers; ++l) EXPECT_TRUE(m.is_moe_layer(l));
}

// The on-device variants' features (§4.4, §7) and clipped-linear towers have no checkpoint to
// check against yet: refused in one line naming the field.
TEST(Gemma4Spec, ConfigRefusesTheOnDeviceVariants) {
  PQ_REQUIRE_SHARED();
  const nlohmann::json base = read_json_file(dense_dir() / "config.json");
  const auto error_with = [&](const char* object, const char* key, nlohmann::json value) {
    nlohmann::json j = base;
    j[object][key] = std::move(value);
    return error_of([&] { ModelConfig::from_json(j, "config.json"); });
  };
  EXPECT_THAT(error_with("text_config", "hidden_size_per_layer_input", 256),
              HasSubstr("text_config.hidden_size_per_layer_input"));
  EXPECT_THAT(error_with("text_config", "num_kv_shared_layers", 4),
              HasSubstr("text_config.num_kv_shared_layers"));
  EXPECT_THAT(error_with("vision_config", "use_clipped_linears", true),
              HasSubstr("vision_config.use_clipped_linears"));
  nlohmann::json rope = base["text_config"]["rope_parameters"];
  rope["full_attention"]["rope_type"] = "yarn";
  EXPECT_THAT(error_with("text_config", "rope_parameters", rope),
              HasSubstr("text_config.rope_parameters.full_attention.rope_type"));
}

// Dense (31B layout, §9): sliding layers q/k/v/o and gate/up/down (7 Linears), full layers no
// v_proj (6); the vision tower's 2 x 7 Linears, its patch embedder and the embedding projection
// pass through. Tied head: no lm_head.
TEST(Gemma4Spec, InventoryOfTheDenseCheckpoint) {
  PQ_REQUIRE_SHARED();
  const io::Checkpoint checkpoint = io::Checkpoint::open(dense_dir());
  const ModelSpec spec = load_model_spec(dense_dir());
  EXPECT_EQ(spec.family, "gemma4");
  EXPECT_EQ(spec.num_tensors(), checkpoint.tensor_names().size());
  std::int64_t stored = 0;
  for (const std::string& name : checkpoint.tensor_names()) stored += checkpoint.info(name).numel();
  EXPECT_EQ(spec.num_params(), stored);
  EXPECT_EQ(spec.num_candidate_linears(), 10 * 7 + 2 * 6);
  EXPECT_EQ(std::ssize(spec.linears), 10 * 7 + 2 * 6 + 2 * 7 + 2);
  EXPECT_EQ(spec.find_linear("model.language_model.layers.5.self_attn.v_proj"), nullptr);
  const Linear* q_full = spec.find_linear("model.language_model.layers.11.self_attn.q_proj");
  ASSERT_NE(q_full, nullptr);
  EXPECT_EQ(q_full->out_features, 4 * 64);
  EXPECT_EQ(spec.find_linear("model.language_model.layers.11.self_attn.o_proj")->in_features,
            4 * 64);
  EXPECT_EQ(spec.find_linear("model.language_model.layers.4.self_attn.k_proj")->out_features,
            2 * 32);
  for (const Linear& linear : spec.linears) {
    SCOPED_TRACE(linear.name);
    EXPECT_EQ(linear.is_candidate, linear.component == Component::kText);
    EXPECT_EQ(linear.serving_name, linear.name);
  }
  ASSERT_EQ(spec.groups.size(), 24u);
  for (const SiblingGroup& group : spec.groups) {
    SCOPED_TRACE(group.name);
    if (group.name.ends_with(".mlp.gate_up_proj")) {
      EXPECT_EQ(group.members.size(), 2u);
      continue;
    }
    ASSERT_TRUE(group.name.ends_with(".self_attn.qkv_proj"));
    const bool full = group.name == "model.language_model.layers.5.self_attn.qkv_proj" ||
                      group.name == "model.language_model.layers.11.self_attn.qkv_proj";
    EXPECT_EQ(group.members.size(), full ? 2u : 3u);
  }
  const auto passthrough = spec.passthrough_tensors();
  for (const char* name :
       {"model.language_model.layers.3.layer_scalar",
        "model.language_model.layers.5.self_attn.k_norm.weight",
        "model.language_model.embed_tokens.weight", "model.vision_tower.std_scale",
        "model.vision_tower.patch_embedder.position_embedding_table",
        "model.vision_tower.encoder.layers.1.self_attn.q_proj.linear.weight",
        "model.embed_vision.embedding_projection.weight"}) {
    EXPECT_TRUE(contains(passthrough, name)) << name;
  }
  EXPECT_THAT(inspect_text(spec), HasSubstr("Gemma4ForConditionalGeneration (profile gemma4)"));
}

// MoE (26B-A4B layout, §6, §9): beside the dense MLP a passthrough router and 8 experts x
// {gate, up, down} read as slices of the packed experts.gate_up_proj / experts.down_proj, all
// experts of a layer one group (vLLM's FusedMoE) limited to the fused-MoE formats.
TEST(Gemma4Spec, InventoryOfTheMoeCheckpoint) {
  PQ_REQUIRE_SHARED();
  const io::Checkpoint checkpoint = io::Checkpoint::open(moe_dir());
  const ModelSpec spec = load_model_spec(moe_dir());
  EXPECT_EQ(spec.num_tensors(), checkpoint.tensor_names().size());
  std::int64_t stored = 0;
  for (const std::string& name : checkpoint.tensor_names()) stored += checkpoint.info(name).numel();
  EXPECT_EQ(spec.num_params(), stored);
  const std::int64_t experts = 8 * 3;
  EXPECT_EQ(spec.num_candidate_linears(), 5 * (7 + experts) + (6 + experts));
  EXPECT_EQ(std::ssize(spec.linears), 5 * (8 + experts) + (7 + experts) + 2 * 7 + 2);

  const Linear* up = spec.find_linear("model.language_model.layers.2.experts.5.up_proj");
  ASSERT_NE(up, nullptr);
  EXPECT_EQ(up->weight_tensor, "model.language_model.layers.2.experts.gate_up_proj");
  ASSERT_TRUE(up->slice.has_value());
  EXPECT_EQ(up->slice->index, 5);
  EXPECT_EQ(up->slice->row_begin, 32);
  EXPECT_EQ(up->slice->row_end, 64);
  EXPECT_TRUE(up->allows("NVFP4"));
  EXPECT_FALSE(up->allows("INT4_W4A16"));
  const Linear* down = spec.find_linear("model.language_model.layers.0.experts.7.down_proj");
  ASSERT_NE(down, nullptr);
  EXPECT_EQ(down->weight_tensor, "model.language_model.layers.0.experts.down_proj");
  EXPECT_EQ(down->out_features, 64);
  EXPECT_EQ(down->in_features, 32);
  // vLLM resolves the FusedMoE module "<layer>.moe.experts" under expert 0's unfused names
  // (§10), and loads a k_eq_v layer's k_proj as v_proj too.
  EXPECT_EQ(up->serving_name, "model.language_model.layers.2.moe.experts.5.up_proj");
  EXPECT_EQ(down->serving_name, "model.language_model.layers.0.moe.experts.7.down_proj");
  const Linear* k_full = spec.find_linear("model.language_model.layers.5.self_attn.k_proj");
  ASSERT_NE(k_full, nullptr);
  EXPECT_EQ(k_full->serving_alias, "model.language_model.layers.5.self_attn.v_proj");
  EXPECT_FALSE(spec.find_linear("model.language_model.layers.4.self_attn.k_proj")->serving_alias);
  const Linear* router = spec.find_linear("model.language_model.layers.4.router.proj");
  ASSERT_NE(router, nullptr);
  EXPECT_FALSE(router->is_candidate);

  std::int64_t expert_groups = 0;
  for (const SiblingGroup& group : spec.groups) {
    if (!group.name.ends_with(".experts")) continue;
    ++expert_groups;
    EXPECT_EQ(group.members.size(), 24u) << group.name;
  }
  EXPECT_EQ(expert_groups, 6);
  EXPECT_EQ(spec.groups.size(), 18u);
  const auto passthrough = spec.passthrough_tensors();
  for (const char* name : {"model.language_model.layers.0.router.proj.weight",
                           "model.language_model.layers.0.router.scale",
                           "model.language_model.layers.0.router.per_expert_scale",
                           "model.language_model.layers.5.post_feedforward_layernorm_1.weight"}) {
    EXPECT_TRUE(contains(passthrough, name)) << name;
  }
}

}  // namespace
}  // namespace pq::model
