// config.json of the hybrid families (Qwen3-Next, Qwen3.5/3.6): the text model's fields under
// text_config, the Gated DeltaNet, MTP and vision fields, and the strict reader's one-line errors
// for them (../shared/docs/qwen3_5-architecture-facts.md §1).
#include <gtest/gtest.h>

#include <functional>

#include "common/error.h"
#include "common/json_reader.h"
#include "model/config.h"
#include "support/test_support.h"

namespace pq::model {
namespace {

using nlohmann::json;

std::filesystem::path shared_model(const char* name) {
  return test::shared_dir() / "models" / name;
}

json qwen3_5_config() {
  return read_json_file(shared_model("qwen3_5-tiny-random") / "config.json");
}

std::string config_error(const json& config) {
  try {
    ModelConfig::from_json(config, "config.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

TEST(ModelConfigHybrid, ReadsTheTextConfigAndTheVisionTower) {
  PQ_REQUIRE_SHARED();
  const ModelConfig c = ModelConfig::from_json(qwen3_5_config(), "config.json");
  EXPECT_EQ(c.architecture, "Qwen3_5ForConditionalGeneration");
  EXPECT_EQ(c.model_type, "qwen3_5");
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.num_hidden_layers, 8);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.intermediate_size, 128);
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_EQ(c.eos_token_ids, std::vector<std::int64_t>{236});
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e7);
  EXPECT_DOUBLE_EQ(c.partial_rotary_factor, 0.25);
  EXPECT_EQ(c.rope_scaling.type, "default");
  EXPECT_TRUE(c.attn_output_gate);
  EXPECT_EQ(c.mtp_num_hidden_layers, 1);
  EXPECT_EQ(c.num_experts, 0);
  ASSERT_EQ(c.layer_types.size(), 8u);
  EXPECT_TRUE(c.is_linear_attention_layer(2));
  EXPECT_FALSE(c.is_linear_attention_layer(3));
  EXPECT_FALSE(c.is_linear_attention_layer(8));
  ASSERT_TRUE(c.linear_attention.has_value());
  EXPECT_EQ(c.linear_attention->conv_kernel_dim, 4);
  EXPECT_EQ(c.linear_attention->key_head_dim, 32);
  EXPECT_EQ(c.linear_attention->value_head_dim, 32);
  EXPECT_EQ(c.linear_attention->num_key_heads, 2);
  EXPECT_EQ(c.linear_attention->num_value_heads, 6);
  ASSERT_TRUE(c.vision.has_value());
  EXPECT_EQ(c.vision->depth, 2);
  EXPECT_EQ(c.vision->hidden_size, 32);
  EXPECT_EQ(c.vision->out_hidden_size, 64);
  EXPECT_EQ(c.vision->spatial_merge_size, 2);

  const ModelConfig moe = ModelConfig::load(shared_model("qwen3_5-moe-tiny-random"));
  EXPECT_EQ(moe.num_experts, 8);
  EXPECT_EQ(moe.num_experts_per_tok, 2);
  EXPECT_EQ(moe.moe_intermediate_size, 64);
  EXPECT_EQ(moe.shared_expert_intermediate_size, 64);
  EXPECT_TRUE(moe.norm_topk_prob);  // Qwen3.5-MoE always renormalises (§6.2)
  EXPECT_TRUE(moe.is_moe_layer(3));
}

// The strict reader's rules hold inside text_config, and its keys are named with their path.
TEST(ModelConfigHybrid, RejectsBadHybridFieldsInOneLine) {
  PQ_REQUIRE_SHARED();
  const auto error_with = [](const std::function<void(json&)>& edit) {
    json config = qwen3_5_config();
    edit(config);
    return config_error(config);
  };
  EXPECT_EQ(error_with([](json& c) { c["text_config"].erase("hidden_size"); }),
            "config.json: missing required field \"text_config.hidden_size\"");
  EXPECT_EQ(error_with([](json& c) { c["text_config"]["linear_num_value_heads"] = 6.5; }),
            "config.json: field \"text_config.linear_num_value_heads\" must be an integer, got "
            "6.5");
  EXPECT_EQ(error_with([](json& c) { c["text_config"]["linear_num_value_heads"] = 5; }),
            "config.json: text_config.linear_num_value_heads 5 is not a multiple of "
            "text_config.linear_num_key_heads 2");
  EXPECT_EQ(error_with([](json& c) { c["text_config"]["layer_types"].erase(0); }),
            "config.json: field \"text_config.layer_types\" has 7 entries for 8 layers");
  EXPECT_EQ(error_with([](json& c) { c["text_config"]["layer_types"][2] = "mamba\n"; }),
            "config.json: field \"text_config.layer_types\" has \"mamba\\n\" at index 2; known: "
            "full_attention, sliding_attention, linear_attention");
  EXPECT_EQ(error_with([](json& c) { c["text_config"]["partial_rotary_factor"] = 0.5; }),
            "config.json: field \"text_config.partial_rotary_factor\" is 0.5 but "
            "\"text_config.rope_parameters.partial_rotary_factor\" is 0.25");
  EXPECT_EQ(error_with([](json& c) { c["text_config"]["rope_scaling"] = json::object(); }),
            "config.json: both \"text_config.rope_parameters\" and \"text_config.rope_scaling\" "
            "are given");
  EXPECT_EQ(error_with([](json& c) { c["text_config"]["rope_parameters"]["factor"] = "2"; }),
            "config.json: field \"text_config.rope_parameters.factor\" has the wrong type");
  EXPECT_EQ(error_with([](json& c) {
              c["text_config"]["rope_parameters"] = {{"full_attention", {{"rope_theta", 1e6}}}};
            }),
            "config.json: field \"text_config.rope_parameters\" holds parameters per layer type "
            "(\"full_attention\"), which are not supported");
  EXPECT_EQ(error_with([](json& c) { c["text_config"]["tie_word_embeddings"] = true; }),
            "config.json: field \"tie_word_embeddings\" is false but "
            "\"text_config.tie_word_embeddings\" is true");
  EXPECT_EQ(error_with([](json& c) { c.erase("vision_config"); }),
            "config.json: missing required field \"vision_config\"");
  EXPECT_EQ(error_with([](json& c) { c["vision_config"]["depth"] = std::int64_t{1} << 40; }),
            "config.json: field \"vision_config.depth\" is 1099511627776, outside [1, 16384]");
  EXPECT_EQ(error_with([](json& c) { c["text_config"] = 3; }),
            "config.json: field \"text_config\" is not an object");
  EXPECT_EQ(error_with([](json& c) { c["text_config"]["mtp_num_hidden_layers"] = -1; }),
            "config.json: field \"text_config.mtp_num_hidden_layers\" is -1, outside [0, 16384]");
}

TEST(ModelConfigHybrid, LayerTypesFromTheFullAttentionInterval) {
  PQ_REQUIRE_SHARED();
  json config = qwen3_5_config();
  config["text_config"].erase("layer_types");
  config["text_config"]["full_attention_interval"] = 2;
  const ModelConfig c = ModelConfig::from_json(config, "config.json");
  ASSERT_EQ(c.layer_types.size(), 8u);
  for (std::int64_t i = 0; i < 8; ++i) EXPECT_EQ(c.is_linear_attention_layer(i), i % 2 == 0) << i;
  // A Llama-style config has none: every layer is the family's attention.
  EXPECT_TRUE(ModelConfig::load(shared_model("qwen3-dense-tiny")).layer_types.empty());
}

}  // namespace
}  // namespace pq::model
