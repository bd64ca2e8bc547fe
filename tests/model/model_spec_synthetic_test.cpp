// ModelSpec on hand-written tensor lists: the layouts the shared checkpoints do not cover
// (untied lm_head, Mistral, Qwen2 biases, mixed dense/MoE layers) and every rejection.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>

#include "common/error.h"
#include "model/dimension.h"
#include "model/inspect_report.h"
#include "model/model_spec.h"

namespace pq::model {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;

// A small decoder: hidden 32, 4 heads / 2 KV heads of 8, FFN 48, vocab 100, 2 layers.
json tiny_config(std::string_view architecture) {
  return {{"architectures", {architecture}},
          {"hidden_size", 32},
          {"intermediate_size", 48},
          {"num_hidden_layers", 2},
          {"num_attention_heads", 4},
          {"num_key_value_heads", 2},
          {"head_dim", 8},
          {"vocab_size", 100},
          {"tie_word_embeddings", false}};
}

ModelConfig parse(const json& config) {
  return ModelConfig::from_json(config, "config.json");
}

// The Hugging Face tensor list of a Llama-style decoder with the sizes of tiny_config,
// written out independently of the profiles.
std::vector<TensorDesc> llama_tensors(bool untied, bool qk_norms = false) {
  std::vector<TensorDesc> t = {{"model.embed_tokens.weight", io::DType::BF16, {100, 32}},
                               {"model.norm.weight", io::DType::BF16, {32}}};
  if (untied) t.push_back({"lm_head.weight", io::DType::BF16, {100, 32}});
  for (int layer = 0; layer < 2; ++layer) {
    const std::string p = "model.layers." + std::to_string(layer) + ".";
    t.push_back({p + "input_layernorm.weight", io::DType::BF16, {32}});
    t.push_back({p + "post_attention_layernorm.weight", io::DType::BF16, {32}});
    t.push_back({p + "self_attn.q_proj.weight", io::DType::BF16, {32, 32}});
    t.push_back({p + "self_attn.k_proj.weight", io::DType::BF16, {16, 32}});
    t.push_back({p + "self_attn.v_proj.weight", io::DType::BF16, {16, 32}});
    t.push_back({p + "self_attn.o_proj.weight", io::DType::BF16, {32, 32}});
    t.push_back({p + "mlp.gate_proj.weight", io::DType::BF16, {48, 32}});
    t.push_back({p + "mlp.up_proj.weight", io::DType::BF16, {48, 32}});
    t.push_back({p + "mlp.down_proj.weight", io::DType::BF16, {32, 48}});
    if (qk_norms) {
      t.push_back({p + "self_attn.q_norm.weight", io::DType::BF16, {8}});
      t.push_back({p + "self_attn.k_norm.weight", io::DType::BF16, {8}});
    }
  }
  return t;
}

// Per layer: 32x32 + 2 x 16x32 + 32x32 + 3 x 48x32 = 7,680 Linear weights + 64 norm weights.
constexpr std::int64_t kLayerParams = 7'680 + 64;
constexpr std::int64_t kEmbeddingParams = 100 * 32;

void add_bias(std::vector<TensorDesc>& tensors, const std::string& module, std::int64_t size) {
  tensors.push_back({module + ".bias", io::DType::BF16, {size}});
}

std::string error_of(const ModelConfig& config, const std::vector<TensorDesc>& tensors,
                     const SpecOptions& options = {}) {
  try {
    build_model_spec(config, tensors, "ckpt", options);
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

std::string error_of(const ArchitectureProfile& profile, const ModelConfig& config,
                     const std::vector<TensorDesc>& tensors) {
  try {
    build_model_spec(profile, config, tensors, "ckpt");
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

TEST(ModelSpecSynthetic, LlamaUntiedListsLmHeadAsOptInCandidate) {
  const ModelConfig config = parse(tiny_config("LlamaForCausalLM"));
  const auto tensors = llama_tensors(/*untied=*/true);
  const ModelSpec spec = build_model_spec(config, tensors, "ckpt");
  EXPECT_EQ(spec.family, "llama");
  EXPECT_FALSE(spec.tie_word_embeddings);
  // 2 layers x 7 Linears + lm_head, which comes last and is not a candidate by default.
  ASSERT_EQ(spec.linears.size(), 15u);
  const Linear& head = spec.linears.back();
  EXPECT_EQ(head.name, "lm_head");
  EXPECT_EQ(head.role, "lm_head");
  EXPECT_FALSE(head.layer.has_value());
  EXPECT_EQ(head.out_features, 100);
  EXPECT_EQ(head.in_features, 32);
  EXPECT_FALSE(head.is_candidate);
  EXPECT_EQ(spec.num_candidate_linears(), 14);
  EXPECT_EQ(spec.groups.size(), 4u);
  // The untied lm_head is stored, so it counts: 2 layers + embedding + lm_head + final norm.
  EXPECT_EQ(spec.num_params(), 2 * kLayerParams + 2 * kEmbeddingParams + 32);
  const auto passthrough = spec.passthrough_tensors();
  EXPECT_NE(std::find(passthrough.begin(), passthrough.end(), "lm_head.weight"), passthrough.end());

  const ModelSpec opted = build_model_spec(config, tensors, "ckpt", {.quantize_lm_head = true});
  EXPECT_TRUE(opted.linears.back().is_candidate);
  EXPECT_EQ(opted.num_candidate_linears(), 15);
}

TEST(ModelSpecSynthetic, LlamaBiasesFollowConfigSwitches) {
  json config = tiny_config("LlamaForCausalLM");
  config["attention_bias"] = true;
  config["mlp_bias"] = true;
  auto tensors = llama_tensors(/*untied=*/true);
  for (int layer = 0; layer < 2; ++layer) {
    const std::string p = "model.layers." + std::to_string(layer) + ".";
    add_bias(tensors, p + "self_attn.q_proj", 32);
    add_bias(tensors, p + "self_attn.k_proj", 16);
    add_bias(tensors, p + "self_attn.v_proj", 16);
    add_bias(tensors, p + "self_attn.o_proj", 32);
    add_bias(tensors, p + "mlp.gate_proj", 48);
    add_bias(tensors, p + "mlp.up_proj", 48);
    add_bias(tensors, p + "mlp.down_proj", 32);
  }
  const ModelSpec spec = build_model_spec(parse(config), tensors, "ckpt");
  for (const Linear& linear : spec.linears) {
    EXPECT_EQ(linear.bias_tensor.has_value(), linear.role != "lm_head") << linear.name;
  }
  EXPECT_EQ(spec.params_by_role().at("bias"), 2 * (32 + 16 + 16 + 32 + 48 + 48 + 32));
}

TEST(ModelSpecSynthetic, MistralHasNoBiases) {
  const ModelConfig config = parse(tiny_config("MistralForCausalLM"));
  auto tensors = llama_tensors(/*untied=*/true);
  const ModelSpec spec = build_model_spec(config, tensors, "ckpt");
  EXPECT_EQ(spec.family, "mistral");
  EXPECT_EQ(spec.linears.size(), 15u);
  EXPECT_EQ(spec.num_params(), 2 * kLayerParams + 2 * kEmbeddingParams + 32);
  // Mistral never has biases, even when a config carries attention_bias.
  add_bias(tensors, "model.layers.0.self_attn.q_proj", 32);
  EXPECT_THAT(error_of(config, tensors),
              HasSubstr("unexpected tensor \"model.layers.0.self_attn.q_proj.bias\""));
}

TEST(ModelSpecSynthetic, Qwen2HasQkvBiasesOnly) {
  json config = tiny_config("Qwen2ForCausalLM");
  config["tie_word_embeddings"] = true;
  auto tensors = llama_tensors(/*untied=*/false);
  for (int layer = 0; layer < 2; ++layer) {
    const std::string p = "model.layers." + std::to_string(layer) + ".self_attn.";
    add_bias(tensors, p + "q_proj", 32);
    add_bias(tensors, p + "k_proj", 16);
    add_bias(tensors, p + "v_proj", 16);
  }
  const ModelSpec spec = build_model_spec(parse(config), tensors, "ckpt");
  EXPECT_EQ(spec.family, "qwen2");
  EXPECT_EQ(spec.linears.size(), 14u);
  const Linear* q = spec.find_linear("model.layers.1.self_attn.q_proj");
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(q->bias_tensor, "model.layers.1.self_attn.q_proj.bias");
  EXPECT_FALSE(spec.find_linear("model.layers.1.self_attn.o_proj")->bias_tensor.has_value());
  EXPECT_FALSE(spec.find_linear("model.layers.1.mlp.up_proj")->bias_tensor.has_value());
  // Biases are passthrough tensors with role "bias", counted in the parameters.
  EXPECT_EQ(spec.params_by_role().at("bias"), 2 * (32 + 16 + 16));
  EXPECT_EQ(spec.num_params(), 2 * (kLayerParams + 64) + kEmbeddingParams + 32);
  EXPECT_EQ(spec.passthrough_tensors().size(), 2u + 2 * 2 + 6);

  tensors.erase(std::find_if(tensors.begin(), tensors.end(), [](const TensorDesc& t) {
    return t.name == "model.layers.1.self_attn.k_proj.bias";
  }));
  EXPECT_EQ(error_of(parse(config), tensors),
            "ckpt: missing tensor \"model.layers.1.self_attn.k_proj.bias\" (required by "
            "Qwen2ForCausalLM)");
}

TEST(ModelSpecSynthetic, Qwen3MoeMixesDenseAndSparseLayers) {
  json config = tiny_config("Qwen3MoeForCausalLM");
  config["num_hidden_layers"] = 3;
  config["num_experts"] = 4;
  config["num_experts_per_tok"] = 2;
  config["moe_intermediate_size"] = 16;
  config["decoder_sparse_step"] = 1;
  config["mlp_only_layers"] = {1};  // layer 1 keeps a dense MLP of width intermediate_size
  std::vector<TensorDesc> tensors = {{"model.embed_tokens.weight", io::DType::BF16, {100, 32}},
                                     {"model.norm.weight", io::DType::BF16, {32}},
                                     {"lm_head.weight", io::DType::BF16, {100, 32}}};
  for (int layer = 0; layer < 3; ++layer) {
    const std::string p = "model.layers." + std::to_string(layer) + ".";
    for (const char* norm : {"input_layernorm", "post_attention_layernorm"}) {
      tensors.push_back({p + norm + ".weight", io::DType::BF16, {32}});
    }
    tensors.push_back({p + "self_attn.q_norm.weight", io::DType::BF16, {8}});
    tensors.push_back({p + "self_attn.k_norm.weight", io::DType::BF16, {8}});
    tensors.push_back({p + "self_attn.q_proj.weight", io::DType::BF16, {32, 32}});
    tensors.push_back({p + "self_attn.k_proj.weight", io::DType::BF16, {16, 32}});
    tensors.push_back({p + "self_attn.v_proj.weight", io::DType::BF16, {16, 32}});
    tensors.push_back({p + "self_attn.o_proj.weight", io::DType::BF16, {32, 32}});
    if (layer == 1) {
      tensors.push_back({p + "mlp.gate_proj.weight", io::DType::BF16, {48, 32}});
      tensors.push_back({p + "mlp.up_proj.weight", io::DType::BF16, {48, 32}});
      tensors.push_back({p + "mlp.down_proj.weight", io::DType::BF16, {32, 48}});
      continue;
    }
    tensors.push_back({p + "mlp.gate.weight", io::DType::BF16, {4, 32}});
    for (int e = 0; e < 4; ++e) {
      const std::string x = p + "mlp.experts." + std::to_string(e) + ".";
      tensors.push_back({x + "gate_proj.weight", io::DType::BF16, {16, 32}});
      tensors.push_back({x + "up_proj.weight", io::DType::BF16, {16, 32}});
      tensors.push_back({x + "down_proj.weight", io::DType::BF16, {32, 16}});
    }
  }
  const ModelSpec spec = build_model_spec(parse(config), tensors, "ckpt");
  // Layers 0 and 2: 4 attention + router + 4 x 3 experts = 17; layer 1: 7; lm_head: 1.
  EXPECT_EQ(spec.linears.size(), 17u + 7u + 17u + 1u);
  EXPECT_EQ(spec.num_candidate_linears(), 16 + 7 + 16);
  // Groups in model order: qkv 0, experts 0, qkv 1, gate_up 1, qkv 2, experts 2.
  std::vector<std::string> names;
  for (const SiblingGroup& group : spec.groups) names.push_back(group.name);
  EXPECT_EQ(names, (std::vector<std::string>{
                       "model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.experts",
                       "model.layers.1.self_attn.qkv_proj", "model.layers.1.mlp.gate_up_proj",
                       "model.layers.2.self_attn.qkv_proj", "model.layers.2.mlp.experts"}));
  EXPECT_EQ(spec.groups[5].members.size(), 12u);
  // Experts are listed expert by expert, as checkpoints store them.
  const Linear& first_expert = spec.linears[spec.groups[1].members[0]];
  const Linear& fourth = spec.linears[spec.groups[1].members[3]];
  EXPECT_EQ(first_expert.name, "model.layers.0.mlp.experts.0.gate_proj");
  EXPECT_EQ(fourth.name, "model.layers.0.mlp.experts.1.gate_proj");
  EXPECT_EQ(fourth.role, "expert_gate_proj");
  EXPECT_EQ(fourth.expert, 1);
}

TEST(ModelSpecSynthetic, RejectsUnsupportedArchitecture) {
  EXPECT_EQ(error_of(parse(tiny_config("GPT2LMHeadModel")), llama_tensors(true)),
            "ckpt: unsupported architecture \"GPT2LMHeadModel\"; supported: "
            "DeepseekV3ForCausalLM, Gemma4ForConditionalGeneration, LlamaForCausalLM, "
            "MiniMaxM2ForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
            "Qwen3MoeForCausalLM, "
            "Qwen3NextForCausalLM, Qwen3_5ForConditionalGeneration, "
            "Qwen3_5MoeForConditionalGeneration");
  // The name is quoted as JSON: a line break in it once split the one-line error.
  EXPECT_THAT(error_of(parse(tiny_config("Llama\nFor\x1b[31m")), llama_tensors(true)),
              HasSubstr("unsupported architecture \"Llama\\nFor\\u001b[31m\"; supported"));
}

// Integer fields are exact JSON integers within bounds, checked before anything is sized by them:
// 256.5 was read as 256, 1e30 as INT64_MIN, and 2^31 head_dim or 2^62 layers ran out of memory.
TEST(ModelSpecSynthetic, RejectsNonIntegerAndOutOfRangeDimensions) {
  const auto error_for = [](const char* key, const json& value) {
    json config = tiny_config("Qwen3ForCausalLM");
    config[key] = value;
    try {
      parse(config);
    } catch (const Error& error) {
      return std::string(error.what());
    }
    return std::string();
  };
  EXPECT_EQ(error_for("hidden_size", 256.5),
            "config.json: field \"hidden_size\" must be an integer, got 256.5");
  EXPECT_EQ(error_for("vocab_size", 1e30),
            "config.json: field \"vocab_size\" must be an integer, got 1e+30");
  EXPECT_EQ(error_for("head_dim", std::int64_t{1} << 31),
            "config.json: field \"head_dim\" is 2147483648, outside [1, 1048576]");
  EXPECT_EQ(error_for("num_hidden_layers", std::int64_t{1} << 62),
            "config.json: field \"num_hidden_layers\" is 4611686018427387904, outside [1, 16384]");
  EXPECT_EQ(error_for("num_attention_heads", -4),
            "config.json: field \"num_attention_heads\" is -4, outside [1, 16384]");
  EXPECT_EQ(error_for("vocab_size", std::uint64_t{18446744073709551615u}),
            "config.json: field \"vocab_size\" is 18446744073709551615, outside [1, 16777216]");
  EXPECT_EQ(error_for("eos_token_id", json::array({1, "2"})),
            "config.json: field \"eos_token_id\" must be an integer, got \"2\"");
  EXPECT_EQ(error_for("hidden_size", "32"),
            "config.json: field \"hidden_size\" must be an integer, got \"32\"");
  EXPECT_EQ(error_for("hidden_size", 32), "");
}

// Floating-point fields that made NaN logits (a negative rms_norm_eps, rope_theta <= 0, a zero
// rope_scaling factor) and fields the runtime read with nlohmann's value(), which threw its
// type_error (an "internal error") for another type; found by fuzz/mutate_inputs.py.
TEST(ModelSpecSynthetic, RejectsValuesThatBreakTheRuntime) {
  const auto error_for = [](const char* key, const json& value) {
    json config = tiny_config("Qwen3ForCausalLM");
    config[key] = value;
    try {
      parse(config);
    } catch (const Error& error) {
      return std::string(error.what());
    }
    return std::string();
  };
  EXPECT_EQ(error_for("rms_norm_eps", -1.0), "config.json: rms_norm_eps -1 is outside [0, 1]");
  EXPECT_EQ(error_for("rms_norm_eps", 1e300), "config.json: rms_norm_eps 1e+300 is outside [0, 1]");
  EXPECT_EQ(error_for("rms_norm_eps", 0.0), "");
  EXPECT_EQ(error_for("rope_theta", 0.0), "config.json: rope_theta 0 is not positive");
  EXPECT_EQ(error_for("rope_theta", -10000), "config.json: rope_theta -10000 is not positive");
  EXPECT_EQ(error_for("rope_scaling", {{"rope_type", "linear"}, {"factor", 0.0}}),
            "config.json: rope_scaling factor 0 is not positive");
  EXPECT_EQ(error_for("rope_scaling", {{"rope_type", "yarn"}, {"factor", 4.0}, {"beta_slow", 0}}),
            "config.json: rope_scaling beta_fast 32 and beta_slow 0 must be positive");
  EXPECT_EQ(error_for("rope_scaling",
                      {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", -1.0}}),
            "config.json: rope_scaling low_freq_factor -1 is not positive");
  EXPECT_EQ(error_for("rope_scaling", {{"type", "linear"}, {"factor", "2"}}),
            "config.json: field \"rope_scaling.factor\" has the wrong type");
  EXPECT_EQ(error_for("rope_scaling", {{"rope_type", "yarn"}, {"mscale", "1"}}),
            "config.json: field \"rope_scaling.mscale\" has the wrong type");
  EXPECT_EQ(error_for("rope_scaling", {{"rope_type", "yarn"}, {"truncate", 1}}),
            "config.json: field \"rope_scaling.truncate\" has the wrong type");
  EXPECT_EQ(error_for("rope_scaling", {{"rope_type", "longrope\n"}}),
            "config.json: unsupported rope_scaling type \"longrope\\n\"");
  EXPECT_EQ(error_for("hidden_act", 5), "config.json: field \"hidden_act\" has the wrong type");
  EXPECT_EQ(error_for("partial_rotary_factor", "half"),
            "config.json: field \"partial_rotary_factor\" has the wrong type");
  EXPECT_EQ(error_for("max_window_layers", "28"),
            "config.json: field \"max_window_layers\" must be an integer, got \"28\"");
  json yarn = tiny_config("Qwen3ForCausalLM");
  yarn["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  yarn["rope_theta"] = 1.0;
  EXPECT_THROW(parse(yarn), Error);
  yarn["rope_theta"] = 1e6;
  const ModelConfig parsed = parse(yarn);
  EXPECT_TRUE(parsed.rope_scaling.truncate);
  EXPECT_EQ(parsed.hidden_act, "silu");
  EXPECT_FALSE(parsed.max_window_layers.has_value());
}

TEST(ModelSpecSynthetic, RejectsMissingTensor) {
  auto tensors = llama_tensors(/*untied=*/true);
  tensors.erase(std::find_if(tensors.begin(), tensors.end(), [](const TensorDesc& t) {
    return t.name == "model.layers.1.mlp.up_proj.weight";
  }));
  EXPECT_EQ(error_of(parse(tiny_config("LlamaForCausalLM")), tensors),
            "ckpt: missing tensor \"model.layers.1.mlp.up_proj.weight\" (required by "
            "LlamaForCausalLM)");
}

TEST(ModelSpecSynthetic, RejectsUnexpectedTensors) {
  auto tensors = llama_tensors(/*untied=*/true);
  tensors.push_back({"model.layers.0.self_attn.rotary_emb.inv_freq", io::DType::F32, {4}});
  tensors.push_back({"model.layers.9.mlp.up_proj.weight", io::DType::BF16, {48, 32}});
  EXPECT_EQ(error_of(parse(tiny_config("LlamaForCausalLM")), tensors),
            "ckpt: unexpected tensor \"model.layers.0.self_attn.rotary_emb.inv_freq\" (2 "
            "tensor(s) not part of the LlamaForCausalLM layout)");
  // A tied config with a stored lm_head contradicts itself.
  json tied = tiny_config("LlamaForCausalLM");
  tied["tie_word_embeddings"] = true;
  EXPECT_THAT(error_of(parse(tied), llama_tensors(/*untied=*/true)),
              HasSubstr("unexpected tensor \"lm_head.weight\""));
}

TEST(ModelSpecSynthetic, RejectsShapeThatDisagreesWithConfig) {
  auto tensors = llama_tensors(/*untied=*/true);
  for (TensorDesc& t : tensors) {
    if (t.name == "model.layers.1.self_attn.k_proj.weight") t.shape = {32, 32};
  }
  EXPECT_EQ(error_of(parse(tiny_config("LlamaForCausalLM")), tensors),
            "ckpt: tensor \"model.layers.1.self_attn.k_proj.weight\" has shape [32, 32], "
            "expected [num_key_value_heads*head_dim=16, hidden_size=32] from config.json");
  // Qwen3 q_norm is per head: [head_dim].
  json qwen3 = tiny_config("Qwen3ForCausalLM");
  auto qwen3_tensors = llama_tensors(/*untied=*/true, /*qk_norms=*/true);
  for (TensorDesc& t : qwen3_tensors) {
    if (t.name == "model.layers.0.self_attn.q_norm.weight") t.shape = {32};
  }
  EXPECT_EQ(error_of(parse(qwen3), qwen3_tensors),
            "ckpt: tensor \"model.layers.0.self_attn.q_norm.weight\" has shape [32], expected "
            "[head_dim=8] from config.json");
}

TEST(ModelSpecSynthetic, RejectsDuplicateAndQuantizedTensors) {
  auto duplicated = llama_tensors(/*untied=*/true);
  duplicated.push_back(duplicated[3]);
  EXPECT_THAT(error_of(parse(tiny_config("LlamaForCausalLM")), duplicated),
              HasSubstr("appears twice"));
  auto quantized = llama_tensors(/*untied=*/true);
  for (TensorDesc& t : quantized) {
    if (t.name == "model.layers.0.mlp.down_proj.weight") t.dtype = io::DType::I8;
  }
  EXPECT_EQ(error_of(parse(tiny_config("LlamaForCausalLM")), quantized),
            "ckpt: tensor \"model.layers.0.mlp.down_proj.weight\" has dtype I8; a Linear weight "
            "must be unquantized floating point or block-scaled FP8 (quantization_config "
            "quant_method \"fp8\")");
}

TEST(ModelSpecSynthetic, RejectsZeroWidthFromConfig) {
  json config = tiny_config("LlamaForCausalLM");
  config.erase("intermediate_size");  // optional in ModelConfig, so it parses as 0
  EXPECT_EQ(error_of(parse(config), llama_tensors(true)),
            "ckpt: tensor \"model.layers.0.mlp.gate_proj.weight\" would have dimension "
            "intermediate_size = 0; check config.json");
}

// A profile written for this test, in the layout of Qwen3.5/3.6 MoE checkpoints
// (qwen3_5-architecture-facts.md §6.3): all experts of a layer packed into
// mlp.experts.gate_up_proj [E, 2I, H] (gate rows [0, I), up rows [I, 2I)) and
// mlp.experts.down_proj [E, H, I]. Attention and norms are left out to keep the list short.
ArchitectureProfile packed_moe_profile() {
  constexpr std::string_view kExperts = "model.layers.{layer}.mlp.experts";
  constexpr std::string_view kGateUp = "model.layers.{layer}.mlp.experts.gate_up_proj";
  return {
      .family = "packed_moe_test",
      .architectures = {"PackedMoeTestForCausalLM"},
      .tensors = {{.name = "model.embed_tokens.weight",
                   .role = "embedding",
                   .shape = {"vocab_size", "hidden_size"}}},
      .linears = {{.module = "model.layers.{layer}.mlp.gate",
                   .role = "router",
                   .out_features = "num_experts",
                   .in_features = "hidden_size",
                   .candidacy = Candidacy::kPassthrough},
                  {.module = "model.layers.{layer}.mlp.experts.{expert}.gate_proj",
                   .role = "expert_gate_proj",
                   .out_features = "moe_intermediate_size",
                   .in_features = "hidden_size",
                   .group = kExperts,
                   .packed = PackedWeight{kGateUp, "2*moe_intermediate_size", "0"}},
                  {.module = "model.layers.{layer}.mlp.experts.{expert}.up_proj",
                   .role = "expert_up_proj",
                   .out_features = "moe_intermediate_size",
                   .in_features = "hidden_size",
                   .group = kExperts,
                   .packed =
                       PackedWeight{kGateUp, "2*moe_intermediate_size", "moe_intermediate_size"}},
                  {.module = "model.layers.{layer}.mlp.experts.{expert}.down_proj",
                   .role = "expert_down_proj",
                   .out_features = "hidden_size",
                   .in_features = "moe_intermediate_size",
                   .group = kExperts,
                   .packed = PackedWeight{"model.layers.{layer}.mlp.experts.down_proj",
                                          "hidden_size", "0"}}},
  };
}

ModelConfig packed_moe_config() {
  json config = tiny_config("PackedMoeTestForCausalLM");
  config["num_experts"] = 4;
  config["num_experts_per_tok"] = 2;
  config["moe_intermediate_size"] = 16;
  return parse(config);
}

std::vector<TensorDesc> packed_moe_tensors() {
  std::vector<TensorDesc> tensors = {{"model.embed_tokens.weight", io::DType::BF16, {100, 32}}};
  for (int layer = 0; layer < 2; ++layer) {
    const std::string p = "model.layers." + std::to_string(layer) + ".mlp.";
    tensors.push_back({p + "gate.weight", io::DType::BF16, {4, 32}});
    tensors.push_back({p + "experts.gate_up_proj", io::DType::BF16, {4, 32, 32}});
    tensors.push_back({p + "experts.down_proj", io::DType::BF16, {4, 32, 16}});
  }
  return tensors;
}

TEST(ModelSpecPacked, ExpertLinearsAreSlicesOfPackedTensors) {
  const ModelSpec spec =
      build_model_spec(packed_moe_profile(), packed_moe_config(), packed_moe_tensors(), "ckpt");
  // 2 layers x (router + 4 experts x 3 projections).
  EXPECT_EQ(spec.linears.size(), 26u);
  EXPECT_EQ(spec.num_candidate_linears(), 24);
  EXPECT_EQ(spec.num_tensors(), 7u);
  // Embedding 100x32 + 2 x (router 4x32 + gate_up 4x32x32 + down 4x32x16): each stored element
  // once, although every packed tensor holds 8 or 4 Linears.
  EXPECT_EQ(spec.num_params(), 3'200 + 2 * (128 + 4'096 + 2'048));
  const Linear* up = spec.find_linear("model.layers.1.mlp.experts.2.up_proj");
  ASSERT_NE(up, nullptr);
  EXPECT_EQ(up->weight_tensor, "model.layers.1.mlp.experts.gate_up_proj");
  ASSERT_TRUE(up->slice.has_value());
  EXPECT_EQ(up->slice->index, 2);
  EXPECT_EQ(up->slice->row_begin, 16);
  EXPECT_EQ(up->slice->row_end, 32);
  EXPECT_EQ(up->out_features, 16);
  EXPECT_EQ(up->in_features, 32);
  EXPECT_EQ(up->group, "model.layers.1.mlp.experts");
  const Linear* gate = spec.find_linear("model.layers.1.mlp.experts.2.gate_proj");
  ASSERT_NE(gate, nullptr);
  EXPECT_EQ(gate->slice->row_begin, 0);
  EXPECT_EQ(gate->slice->row_end, 16);
  ASSERT_EQ(spec.groups.size(), 2u);
  EXPECT_EQ(spec.groups[1].members.size(), 12u);

  const auto json = inspect_json(spec);
  const auto& entry = json.at("linears").at(spec.linears.size() - 2);  // layer 1, expert 3, up
  EXPECT_EQ(entry.at("name"), "model.layers.1.mlp.experts.3.up_proj");
  EXPECT_EQ(entry.at("weight"), "model.layers.1.mlp.experts.gate_up_proj");
  EXPECT_EQ(entry.at("slice").at("index"), 3);
  EXPECT_EQ(entry.at("slice").at("row_begin"), 16);
  EXPECT_EQ(entry.at("slice").at("row_end"), 32);
}

TEST(ModelSpecPacked, RejectsPackedShapeAndIncompleteSlicing) {
  auto tensors = packed_moe_tensors();
  tensors[2].shape = {4, 30, 32};  // model.layers.0.mlp.experts.gate_up_proj
  EXPECT_EQ(error_of(packed_moe_profile(), packed_moe_config(), tensors),
            "ckpt: tensor \"model.layers.0.mlp.experts.gate_up_proj\" has shape [4, 30, 32], "
            "expected [num_experts=4, 2*moe_intermediate_size=32, hidden_size=32] from "
            "config.json");
  // A profile that forgets the up half would leave half of each gate_up tensor unaccounted.
  ArchitectureProfile gate_only = packed_moe_profile();
  gate_only.linears.erase(gate_only.linears.begin() + 2);
  EXPECT_EQ(error_of(gate_only, packed_moe_config(), packed_moe_tensors()),
            "ckpt: the PackedMoeTestForCausalLM profile slices 2048 of the 4096 elements of "
            "packed tensor \"model.layers.0.mlp.experts.gate_up_proj\"");
}

TEST(Dimension, EvaluatesSumsOfProductsOverConfigFields) {
  json raw = tiny_config("LlamaForCausalLM");
  raw["linear_num_key_heads"] = 16;  // a field ModelConfig does not parse
  const ModelConfig config = parse(raw);
  EXPECT_EQ(evaluate_dimension("hidden_size", config, "x"), 32);
  EXPECT_EQ(evaluate_dimension("num_attention_heads*head_dim", config, "x"), 32);
  EXPECT_EQ(evaluate_dimension("2 * intermediate_size + 1", config, "x"), 97);
  EXPECT_EQ(evaluate_dimension("linear_num_key_heads*head_dim", config, "x"), 128);
  EXPECT_EQ(explain_dimension("num_key_value_heads*head_dim", config, "x"),
            "num_key_value_heads*head_dim=16");
  EXPECT_EQ(explain_dimension("4", config, "x"), "4");
  // head_dim falls back to hidden_size / num_attention_heads when config.json omits it.
  raw.erase("head_dim");
  EXPECT_EQ(evaluate_dimension("head_dim", parse(raw), "x"), 8);
}

TEST(Dimension, RejectsUnknownFieldsAndMalformedExpressions) {
  const ModelConfig config = parse(tiny_config("LlamaForCausalLM"));
  EXPECT_THROW(
      {
        try {
          evaluate_dimension("num_widgets*2", config, "profile");
        } catch (const Error& e) {
          EXPECT_STREQ(e.what(),
                       "profile: config has no integer field \"num_widgets\" (needed for "
                       "\"num_widgets*2\")");
          throw;
        }
      },
      Error);
  EXPECT_THROW(evaluate_dimension("hidden_size*", config, "profile"), Error);
  EXPECT_THROW(evaluate_dimension("hidden_size-1", config, "profile"), Error);
  EXPECT_THROW(evaluate_dimension("", config, "profile"), Error);
  EXPECT_THROW(evaluate_dimension("99999999999*99999999999", config, "profile"), Error);
}

TEST(Profiles, EveryArchitectureIsRegisteredOnce) {
  const auto names = supported_architectures();
  EXPECT_EQ(names,
            (std::vector<std::string>{
                "DeepseekV3ForCausalLM", "Gemma4ForConditionalGeneration", "LlamaForCausalLM",
                "MiniMaxM2ForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Qwen3NextForCausalLM",
                "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"}));
  for (const std::string& name : names) {
    const ArchitectureProfile* profile = find_profile(name);
    ASSERT_NE(profile, nullptr) << name;
    EXPECT_FALSE(profile->linears.empty()) << name;
  }
  EXPECT_EQ(find_profile("GPT2LMHeadModel"), nullptr);
}

}  // namespace
}  // namespace pq::model
