// The inventory of the hybrid families: the two Qwen3.5/3.6 tiny checkpoints in ../shared/models
// and a Qwen3-Next checkpoint derived here from the MoE one, with the expected figures worked out
// by hand from their config.json files and ../shared/docs/qwen3_5-architecture-facts.md (§).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <map>
#include <set>

#include "common/json_reader.h"
#include "io/safetensors.h"
#include "io/safetensors_writer.h"
#include "model/inspect_report.h"
#include "model/model_spec.h"
#include "support/qwen3_next_checkpoint.h"
#include "support/test_support.h"

namespace pq::model {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;

std::filesystem::path shared_model(const char* name) {
  return test::shared_dir() / "models" / name;
}

// Linears of `role` that are candidates, per component.
std::map<Component, std::int64_t> candidates_of(const ModelSpec& spec, std::string_view role) {
  std::map<Component, std::int64_t> count;
  for (const Linear& linear : spec.linears) {
    if (linear.role == role && linear.is_candidate) ++count[linear.component];
  }
  return count;
}

const SiblingGroup* find_group(const ModelSpec& spec, std::string_view name) {
  const auto it = std::find_if(spec.groups.begin(), spec.groups.end(),
                               [&](const SiblingGroup& group) { return group.name == name; });
  return it == spec.groups.end() ? nullptr : &*it;
}

std::vector<std::string> member_names(const ModelSpec& spec, const SiblingGroup& group) {
  std::vector<std::string> names;
  for (std::size_t index : group.members) names.push_back(spec.linears[index].name);
  return names;
}

const OtherTensor* find_other(const ModelSpec& spec, std::string_view name) {
  const auto it = std::find_if(spec.others.begin(), spec.others.end(),
                               [&](const OtherTensor& tensor) { return tensor.name == name; });
  return it == spec.others.end() ? nullptr : &*it;
}

// Every checkpoint tensor is a candidate Linear's weight or a passthrough tensor, exactly once.
void expect_each_tensor_once(const ModelSpec& spec, const io::Checkpoint& checkpoint) {
  std::multiset<std::string> listed;
  std::set<std::string> candidate_weights;  // the slices of a packed tensor share it
  for (const Linear& linear : spec.linears) {
    if (linear.is_candidate) candidate_weights.insert(linear.weight_tensor);
  }
  listed.insert(candidate_weights.begin(), candidate_weights.end());
  for (const std::string& name : spec.passthrough_tensors()) listed.insert(name);
  const std::vector<std::string>& stored = checkpoint.tensor_names();
  EXPECT_EQ(std::vector<std::string>(listed.begin(), listed.end()), stored);
  EXPECT_EQ(spec.num_tensors(), stored.size());
}

// The Qwen3.5 tiny checkpoints (model card: ../shared/models/README.md): hidden 64, vocab 512,
// head_dim 64, 2 KV heads, linear_key_head_dim = linear_value_head_dim = 32, 2 key heads, conv
// kernel 4, one MTP layer, and a vision tower of width 32, 2 blocks, FFN 64, merge 2, output 64.
TEST(ModelSpecHybrid, Qwen3_5DenseTiny) {
  PQ_REQUIRE_SHARED();
  const auto dir = shared_model("qwen3_5-tiny-random");
  const ModelSpec spec = load_model_spec(dir);
  EXPECT_EQ(spec.architecture, "Qwen3_5ForConditionalGeneration");
  EXPECT_EQ(spec.family, "qwen3_5");
  EXPECT_FALSE(spec.tie_word_embeddings);
  // 8 layers (linear attention but 3 and 7), 6 heads, 6 value heads, dense FFN 128.
  // GDN layer: in_proj_qkv 320x64 (conv_dim 2*64+192) + z 192x64 + b, a 6x64 + out 64x192
  // = 45,824, conv1d 320x4 + A_log 6 + dt_bias 6 + norm 32 = 1,324, MLP 3 x 128x64 = 24,576,
  // norms 128: 71,852. Attention layer: q 768x64 (gated: 2 x 6 x 64) + k, v 128x64 + o 64x384
  // = 90,112, q/k norms 128, MLP 24,576, norms 128: 114,944. Text: 6 x 71,852 + 2 x 114,944
  // + embedding and lm_head 2 x 32,768 + norm 64 = 726,600. MTP: fc 64x128 + 3 norms of 64 + one
  // attention layer = 123,328. Vision: patch_embed 32x3x2x16x16 + 32, pos_embed 64x32, 2 blocks
  // of 8,544 (4 norm vectors, qkv 96x32, proj 32x32, fc1 64x32, fc2 32x64, biases), merger
  // 24,832 (norm, fc1 128x128, fc2 64x128, biases) = 93,152. Total 943,080 (the README's figure).
  EXPECT_EQ(spec.num_params(), 943'080);
  EXPECT_EQ(spec.num_tensors(), 157u);
  const auto json = inspect_json(spec);
  EXPECT_EQ(json.at("params_by_component"),
            (nlohmann::ordered_json{{"text", 726'600}, {"mtp", 123'328}, {"vision", 93'152}}));

  // Candidates: 6 x (5 GDN + 3 MLP) + 2 x (4 attention + 3 MLP) in the body, MTP fc + 4 + 3.
  EXPECT_EQ(spec.num_candidate_linears(), 70);
  using C = std::map<Component, std::int64_t>;
  for (const char* role : {"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"}) {
    EXPECT_EQ(candidates_of(spec, role), (C{{Component::kText, 6}})) << role;
  }
  for (const char* role : {"q_proj", "k_proj", "v_proj", "o_proj"}) {
    EXPECT_EQ(candidates_of(spec, role), (C{{Component::kText, 2}, {Component::kMtp, 1}})) << role;
  }
  for (const char* role : {"gate_proj", "up_proj", "down_proj"}) {
    EXPECT_EQ(candidates_of(spec, role), (C{{Component::kText, 8}, {Component::kMtp, 1}})) << role;
  }
  EXPECT_EQ(candidates_of(spec, "fc"), (C{{Component::kMtp, 1}}));
  // lm_head (opt-in) and the 10 vision Linears are listed but kept.
  EXPECT_EQ(spec.linears.size(), 81u);

  // Groups: per GDN layer in_proj_qkvz, in_proj_ba, gate_up_proj; per attention layer (MTP too)
  // qkv_proj and gate_up_proj.
  ASSERT_EQ(spec.groups.size(), 24u);
  const std::string l0 = "model.language_model.layers.0.";
  const SiblingGroup* qkvz = find_group(spec, l0 + "linear_attn.in_proj_qkvz");
  ASSERT_NE(qkvz, nullptr);
  EXPECT_EQ(member_names(spec, *qkvz), (std::vector<std::string>{l0 + "linear_attn.in_proj_qkv",
                                                                 l0 + "linear_attn.in_proj_z"}));
  const SiblingGroup* ba = find_group(spec, l0 + "linear_attn.in_proj_ba");
  ASSERT_NE(ba, nullptr);
  EXPECT_EQ(member_names(spec, *ba),
            (std::vector<std::string>{l0 + "linear_attn.in_proj_b", l0 + "linear_attn.in_proj_a"}));
  const SiblingGroup* mtp_qkv = find_group(spec, "mtp.layers.0.self_attn.qkv_proj");
  ASSERT_NE(mtp_qkv, nullptr);
  EXPECT_EQ(mtp_qkv->members.size(), 3u);
  EXPECT_EQ(find_group(spec, l0 + "self_attn.qkv_proj"), nullptr);  // layer 0 is linear

  const Linear* q3 = spec.find_linear("model.language_model.layers.3.self_attn.q_proj");
  ASSERT_NE(q3, nullptr);
  EXPECT_EQ(q3->out_features, 768);
  EXPECT_EQ(q3->group, "model.language_model.layers.3.self_attn.qkv_proj");
  const Linear* b0 = spec.find_linear(l0 + "linear_attn.in_proj_b");
  ASSERT_NE(b0, nullptr);
  EXPECT_EQ(b0->out_features, 6);  // one row per value head
  EXPECT_TRUE(b0->is_candidate);
  const Linear* fc = spec.find_linear("mtp.fc");
  ASSERT_NE(fc, nullptr);
  EXPECT_EQ(fc->component, Component::kMtp);
  EXPECT_EQ(fc->in_features, 128);
  EXPECT_FALSE(fc->layer.has_value());
  const Linear* mtp_down = spec.find_linear("mtp.layers.0.mlp.down_proj");
  ASSERT_NE(mtp_down, nullptr);
  EXPECT_EQ(mtp_down->layer, 0);
  EXPECT_EQ(mtp_down->component, Component::kMtp);

  // The vision tower: Linears with biases, never candidates; its other tensors as stored.
  const Linear* qkv = spec.find_linear("model.visual.blocks.1.attn.qkv");
  ASSERT_NE(qkv, nullptr);
  EXPECT_FALSE(qkv->is_candidate);
  EXPECT_EQ(qkv->component, Component::kVision);
  EXPECT_EQ(qkv->layer, 1);
  EXPECT_EQ(qkv->bias_tensor, "model.visual.blocks.1.attn.qkv.bias");
  EXPECT_FALSE(qkv->group.has_value());
  const Linear* merger = spec.find_linear("model.visual.merger.linear_fc2");
  ASSERT_NE(merger, nullptr);
  EXPECT_EQ(merger->out_features, 64);
  EXPECT_EQ(merger->in_features, 128);
  for (const char* name : {"model.visual.patch_embed.proj.weight", "model.visual.pos_embed.weight",
                           "model.visual.blocks.0.norm1.bias"}) {
    const OtherTensor* tensor = find_other(spec, name);
    ASSERT_NE(tensor, nullptr) << name;
    EXPECT_EQ(tensor->component, Component::kVision) << name;
  }
  const OtherTensor* conv = find_other(spec, l0 + "linear_attn.conv1d.weight");
  ASSERT_NE(conv, nullptr);
  EXPECT_EQ(conv->shape, (std::vector<std::int64_t>{320, 1, 4}));
  EXPECT_EQ(conv->role, "conv1d");
  const OtherTensor* a_log = find_other(spec, l0 + "linear_attn.A_log");
  ASSERT_NE(a_log, nullptr);
  EXPECT_EQ(a_log->dtype, io::DType::BF16);  // BF16 in this checkpoint, as in the 27B (§9)
  // Passthrough: 46 text tensors (embedding, norm, 16 layer norms, 6 x 4 GDN tensors, 2 x q/k
  // norms), 7 MTP norms, 23 vision tensors (13 non-Linear + 10 biases), lm_head, 10 vision weights.
  EXPECT_EQ(spec.passthrough_tensors().size(), 87u);
  const auto by_dtype = spec.params_by_dtype();
  ASSERT_EQ(by_dtype.size(), 1u);
  EXPECT_EQ(by_dtype.at("BF16"), 943'080);

  const io::Checkpoint checkpoint = io::Checkpoint::open(dir);
  expect_each_tensor_once(spec, checkpoint);
}

TEST(ModelSpecHybrid, Qwen3_5MoeTiny) {
  PQ_REQUIRE_SHARED();
  const auto dir = shared_model("qwen3_5-moe-tiny-random");
  const ModelSpec spec = load_model_spec(dir);
  EXPECT_EQ(spec.architecture, "Qwen3_5MoeForConditionalGeneration");
  EXPECT_EQ(spec.family, "qwen3_5_moe");
  // 4 layers (3 is full attention), 4 heads, 4 value heads, 8 experts of width 64, shared expert
  // 64. GDN: qkv 256x64 + z 128x64 + b, a 4x64 + out 64x128 = 33,280, conv 256x4 + A_log 4
  // + dt_bias 4 + norm 32 = 1,064. MoE block: router 8x64 + shared 3 x 64x64 + gate 1x64
  // + gate_up 8x128x64 + down 8x64x64 = 111,168. GDN layer 145,640; attention layer: q 512x64,
  // k, v 128x64, o 64x256 = 65,536 + 128 + 111,168 + 128 = 176,960. Text: 3 x 145,640 + 176,960
  // + 65,600 = 679,480; MTP: 8,192 + 192 + 176,960 = 185,344; vision 93,152. Total 957,976.
  EXPECT_EQ(spec.num_params(), 957'976);
  EXPECT_EQ(spec.num_tensors(), 146u);
  // A_log and linear_attn.norm are F32 on disk (3 x (4 + 32)).
  const auto by_dtype = spec.params_by_dtype();
  EXPECT_EQ(by_dtype.at("F32"), 108);
  EXPECT_EQ(by_dtype.at("BF16"), 957'868);
  const std::string l0 = "model.language_model.layers.0.";
  for (const std::string& name : {l0 + "linear_attn.A_log", l0 + "linear_attn.norm.weight"}) {
    const OtherTensor* tensor = find_other(spec, name);
    ASSERT_NE(tensor, nullptr) << name;
    EXPECT_EQ(tensor->dtype, io::DType::F32) << name;
  }
  EXPECT_EQ(find_other(spec, l0 + "linear_attn.dt_bias")->dtype, io::DType::BF16);

  // Candidates: 3 x (5 GDN + 3 shared + 24 experts) + (4 + 3 + 24) in the body; MTP fc + 4 + 3
  // + 24 per-expert Linears.
  EXPECT_EQ(spec.num_candidate_linears(), 159);
  using C = std::map<Component, std::int64_t>;
  for (const char* role : {"expert_gate_proj", "expert_up_proj", "expert_down_proj"}) {
    EXPECT_EQ(candidates_of(spec, role), (C{{Component::kText, 32}, {Component::kMtp, 8}})) << role;
  }
  for (const char* role :
       {"shared_expert_gate_proj", "shared_expert_up_proj", "shared_expert_down_proj"}) {
    EXPECT_EQ(candidates_of(spec, role), (C{{Component::kText, 4}, {Component::kMtp, 1}})) << role;
  }
  EXPECT_EQ(candidates_of(spec, "gate_proj"), C{});
  // Routers and shared-expert gates stay as vLLM builds them: unquantized.
  for (const char* name : {"mtp.layers.0.mlp.gate", "mtp.layers.0.mlp.shared_expert_gate",
                           "model.language_model.layers.2.mlp.shared_expert_gate"}) {
    const Linear* linear = spec.find_linear(name);
    ASSERT_NE(linear, nullptr) << name;
    EXPECT_FALSE(linear->is_candidate) << name;
    EXPECT_FALSE(linear->group.has_value()) << name;
  }
  // 159 + 5 routers + 5 shared-expert gates + lm_head + 10 vision Linears.
  EXPECT_EQ(spec.linears.size(), 180u);

  // Groups: per GDN layer in_proj_qkvz, in_proj_ba, shared gate_up and the experts; attention
  // layers (MTP too) qkv_proj, shared gate_up and the experts.
  ASSERT_EQ(spec.groups.size(), 18u);
  const SiblingGroup* experts = find_group(spec, l0 + "mlp.experts");
  ASSERT_NE(experts, nullptr);
  ASSERT_EQ(experts->members.size(), 24u);  // 2 x 8 gate/up slices + 8 down
  for (std::size_t index : experts->members) {
    const Linear& linear = spec.linears[index];
    EXPECT_EQ(linear.layer, 0);
    EXPECT_EQ(linear.component, Component::kText);
    ASSERT_TRUE(linear.slice.has_value()) << linear.name;
  }
  const SiblingGroup* mtp_experts = find_group(spec, "mtp.layers.0.mlp.experts");
  ASSERT_NE(mtp_experts, nullptr);
  EXPECT_EQ(mtp_experts->members.size(), 24u);
  for (std::size_t index : mtp_experts->members) {
    const Linear& linear = spec.linears[index];
    EXPECT_EQ(linear.component, Component::kMtp);
    EXPECT_FALSE(linear.slice.has_value()) << linear.name;
    EXPECT_EQ(linear.weight_tensor, linear.name + ".weight");
  }
  const SiblingGroup* shared = find_group(spec, l0 + "mlp.shared_expert.gate_up_proj");
  ASSERT_NE(shared, nullptr);
  EXPECT_EQ(member_names(spec, *shared),
            (std::vector<std::string>{l0 + "mlp.shared_expert.gate_proj",
                                      l0 + "mlp.shared_expert.up_proj"}));

  // Packed slices: expert e's gate is rows [0, 64) of gate_up_proj[e], its up rows [64, 128).
  const Linear* up = spec.find_linear("model.language_model.layers.2.mlp.experts.5.up_proj");
  ASSERT_NE(up, nullptr);
  EXPECT_EQ(up->weight_tensor, "model.language_model.layers.2.mlp.experts.gate_up_proj");
  ASSERT_TRUE(up->slice.has_value());
  EXPECT_EQ(up->slice->index, 5);
  EXPECT_EQ(up->slice->row_begin, 64);
  EXPECT_EQ(up->slice->row_end, 128);
  const Linear* gate = spec.find_linear("model.language_model.layers.2.mlp.experts.5.gate_proj");
  ASSERT_NE(gate, nullptr);
  EXPECT_EQ(gate->slice->row_begin, 0);
  EXPECT_EQ(gate->slice->row_end, 64);
  const Linear* down = spec.find_linear("model.language_model.layers.3.mlp.experts.7.down_proj");
  ASSERT_NE(down, nullptr);
  EXPECT_EQ(down->weight_tensor, "model.language_model.layers.3.mlp.experts.down_proj");
  EXPECT_EQ(down->slice->index, 7);
  EXPECT_EQ(down->slice->row_end, 64);
  EXPECT_EQ(down->in_features, 64);

  EXPECT_EQ(spec.passthrough_tensors().size(), 75u);  // 54 other tensors + 21 kept Linears
  const io::Checkpoint checkpoint = io::Checkpoint::open(dir);
  expect_each_tensor_once(spec, checkpoint);
}

TEST(ModelSpecHybrid, InspectTextSeparatesMtpAndVision) {
  PQ_REQUIRE_SHARED();
  const std::string text = inspect_text(load_model_spec(shared_model("qwen3_5-moe-tiny-random")));
  EXPECT_THAT(text, HasSubstr("Qwen3_5MoeForConditionalGeneration (profile qwen3_5_moe)"));
  EXPECT_THAT(text, HasSubstr("957,976 in 146 tensors"));
  EXPECT_THAT(text, HasSubstr("components    text 679,480, mtp 185,344, vision 93,152"));
  EXPECT_THAT(text, HasSubstr("159 Linears in 18 sibling groups"));
  EXPECT_THAT(text, HasSubstr("mtp expert_up_proj"));
  EXPECT_THAT(text, HasSubstr("vision attn_qkv"));
  EXPECT_THAT(text, HasSubstr("75 tensors kept as stored"));
}

// ---- Qwen3-Next, derived from the Qwen3.5 MoE tiny checkpoint ---------------------------------

TEST(ModelSpecHybrid, Qwen3NextFromInterleavedProjections) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  test::write_qwen3_next(dir.path());
  const ModelConfig config = ModelConfig::load(dir.path());
  // Flat config without layer_types: full attention every full_attention_interval = 4 layers;
  // no attn_output_gate key: gated, as vLLM defaults it; no MTP key: one MTP layer (§1).
  EXPECT_EQ(config.layer_types,
            (std::vector<LayerType>{LayerType::kLinearAttention, LayerType::kLinearAttention,
                                    LayerType::kLinearAttention, LayerType::kFullAttention}));
  EXPECT_TRUE(config.attn_output_gate);
  EXPECT_EQ(config.mtp_num_hidden_layers, 1);
  EXPECT_TRUE(config.norm_topk_prob);
  EXPECT_FALSE(config.vision.has_value());

  const ModelSpec spec = load_model_spec(dir.path());
  EXPECT_EQ(spec.family, "qwen3_next");
  // The Qwen3.5 MoE model without its vision tower: the same parameters in other tensors.
  EXPECT_EQ(spec.num_params(), 957'976 - 93'152);
  const io::Checkpoint checkpoint = io::Checkpoint::open(dir.path());
  // 146 - 33 vision tensors - 3 x 2 fused GDN projections + 4 x (24 - 2) unpacked body experts.
  EXPECT_EQ(spec.num_tensors(), 195u);
  expect_each_tensor_once(spec, checkpoint);

  const Linear* qkvz = spec.find_linear("model.layers.1.linear_attn.in_proj_qkvz");
  ASSERT_NE(qkvz, nullptr);
  EXPECT_EQ(qkvz->role, "in_proj_qkvz");
  EXPECT_EQ(qkvz->out_features, 384);  // 2 x key_dim 64 + 2 x value_dim 128
  EXPECT_TRUE(qkvz->is_candidate);
  // vLLM loads the fused tensor as it is: no sibling to agree with.
  EXPECT_FALSE(qkvz->group.has_value());
  const Linear* ba = spec.find_linear("model.layers.1.linear_attn.in_proj_ba");
  ASSERT_NE(ba, nullptr);
  EXPECT_EQ(ba->out_features, 8);  // 2 x value heads
  EXPECT_FALSE(ba->group.has_value());
  // Group 1's z block (value heads 2 and 3) sits after its q, k and v rows.
  const std::vector<std::uint8_t> z_rows =
      test::rows_of(checkpoint, "model.layers.1.linear_attn.in_proj_qkvz.weight", 192 + 128, 384);
  const io::Checkpoint source = io::Checkpoint::open(shared_model("qwen3_5-moe-tiny-random"));
  EXPECT_EQ(
      z_rows,
      test::rows_of(source, "model.language_model.layers.1.linear_attn.in_proj_z.weight", 64, 128));

  EXPECT_EQ(spec.num_candidate_linears(), 159 - 3 * 2);  // qkv+z and b+a fused in 3 GDN layers
  const SiblingGroup* experts = find_group(spec, "model.layers.0.mlp.experts");
  ASSERT_NE(experts, nullptr);
  EXPECT_EQ(experts->members.size(), 24u);
  const Linear* up = spec.find_linear("model.layers.0.mlp.experts.3.up_proj");
  ASSERT_NE(up, nullptr);
  EXPECT_FALSE(up->slice.has_value());
  EXPECT_EQ(up->weight_tensor, "model.layers.0.mlp.experts.3.up_proj.weight");
  EXPECT_NE(find_group(spec, "mtp.layers.0.mlp.experts"), nullptr);
  // Per GDN layer: experts and shared gate_up; attention layer and MTP: qkv, experts, shared.
  EXPECT_EQ(spec.groups.size(), 12u);
}

// mlp_only_layers gives Qwen3-Next a dense MLP of intermediate_size (transformers
// Qwen3NextDecoderLayer), here on layer 1 of a tensor list written from the profile's layout.
TEST(ModelSpecHybrid, Qwen3NextDenseLayerFromMlpOnlyLayers) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  test::write_qwen3_next(dir.path());
  json raw = read_json_file(dir / "config.json");
  raw["mlp_only_layers"] = {1};
  const ModelConfig config = ModelConfig::from_json(raw, "config.json");
  const io::Checkpoint checkpoint = io::Checkpoint::open(dir.path());
  std::vector<TensorDesc> tensors;
  for (const std::string& name : checkpoint.tensor_names()) {
    if (name.starts_with("model.layers.1.mlp.")) continue;
    const io::TensorInfo& info = checkpoint.info(name);
    tensors.push_back({name, info.dtype, info.shape});
  }
  tensors.push_back({"model.layers.1.mlp.gate_proj.weight", io::DType::BF16, {128, 64}});
  tensors.push_back({"model.layers.1.mlp.up_proj.weight", io::DType::BF16, {128, 64}});
  tensors.push_back({"model.layers.1.mlp.down_proj.weight", io::DType::BF16, {64, 128}});
  const ModelSpec spec = build_model_spec(config, tensors, "ckpt");
  const Linear* gate = spec.find_linear("model.layers.1.mlp.gate_proj");
  ASSERT_NE(gate, nullptr);
  EXPECT_EQ(gate->group, "model.layers.1.mlp.gate_up_proj");
  EXPECT_EQ(spec.find_linear("model.layers.1.mlp.gate"), nullptr);
  EXPECT_NE(spec.find_linear("model.layers.2.mlp.gate"), nullptr);
}

}  // namespace
}  // namespace pq::model
