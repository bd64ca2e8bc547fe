// The inventory of every checkpoint in ../shared/models, with the expected figures derived by
// hand from each config.json (and the totals matching ../shared/models/README.md and the
// checkpoints' own READMEs).
#include <gtest/gtest.h>

#include <algorithm>

#include "io/safetensors.h"
#include "io/safetensors_writer.h"
#include "model/inspect_report.h"
#include "model/model_spec.h"
#include "support/test_support.h"

namespace pq::model {
namespace {

std::int64_t count_role(const ModelSpec& spec, std::string_view role) {
  return std::count_if(spec.linears.begin(), spec.linears.end(),
                       [&](const Linear& linear) { return linear.role == role; });
}

TEST(ModelSpecShared, Qwen3DenseTiny) {
  PQ_REQUIRE_SHARED();
  const ModelSpec spec = load_model_spec(test::shared_dir() / "models/qwen3-dense-tiny");
  EXPECT_EQ(spec.architecture, "Qwen3ForCausalLM");
  EXPECT_EQ(spec.family, "qwen3");
  EXPECT_TRUE(spec.tie_word_embeddings);
  // hidden 256, 8 layers, 4 heads / 2 KV heads, head_dim 64, intermediate 768, vocab 32000, tied.
  // Per layer: q 256x256 + k 128x256 + v 128x256 + o 256x256 + gate/up/down 3 x 768x256
  // = 786,432, norms 2x256 + q/k norms 2x64 = 640; x 8 = 6,296,576; + embedding 32000x256
  // = 8,192,000 + final norm 256 = 14,488,832 (the checkpoint README's figure).
  EXPECT_EQ(spec.num_params(), 14'488'832);
  EXPECT_EQ(spec.num_tensors(), 90u);  // 2 + 8 x (7 Linears + 4 norms)
  // 8 layers x 7 Linears, all candidates; tied, so no lm_head Linear.
  EXPECT_EQ(spec.linears.size(), 56u);
  EXPECT_EQ(spec.num_candidate_linears(), 56);
  EXPECT_EQ(spec.find_linear("lm_head"), nullptr);
  // 16 sibling groups: qkv_proj and gate_up_proj per layer; o_proj and down_proj stand alone.
  ASSERT_EQ(spec.groups.size(), 16u);
  EXPECT_EQ(spec.groups[0].name, "model.layers.0.self_attn.qkv_proj");
  EXPECT_EQ(spec.groups[1].name, "model.layers.0.mlp.gate_up_proj");
  EXPECT_EQ(spec.groups[15].name, "model.layers.7.mlp.gate_up_proj");
  for (const SiblingGroup& group : spec.groups) {
    const bool qkv = group.name.ends_with("qkv_proj");
    EXPECT_EQ(group.members.size(), qkv ? 3u : 2u) << group.name;
  }
  // Passthrough: embedding, final norm and 8 x (2 layer norms + q_norm + k_norm) = 34.
  EXPECT_EQ(spec.passthrough_tensors().size(), 34u);

  const auto by_role = spec.params_by_role();
  EXPECT_EQ(by_role.at("q_proj"), 8 * 256 * 256);
  EXPECT_EQ(by_role.at("k_proj"), 8 * 128 * 256);
  EXPECT_EQ(by_role.at("gate_proj"), 8 * 768 * 256);
  EXPECT_EQ(by_role.at("down_proj"), 8 * 256 * 768);
  EXPECT_EQ(by_role.at("embedding"), 32000 * 256);
  EXPECT_EQ(by_role.at("q_norm"), 8 * 64);
  EXPECT_EQ(by_role.at("final_norm"), 256);
  const auto by_dtype = spec.params_by_dtype();
  ASSERT_EQ(by_dtype.size(), 1u);
  EXPECT_EQ(by_dtype.at("BF16"), 14'488'832);

  const Linear* k3 = spec.find_linear("model.layers.3.self_attn.k_proj");
  ASSERT_NE(k3, nullptr);
  EXPECT_EQ(k3->weight_tensor, "model.layers.3.self_attn.k_proj.weight");
  EXPECT_EQ(k3->out_features, 128);  // num_key_value_heads x head_dim
  EXPECT_EQ(k3->in_features, 256);
  EXPECT_EQ(k3->layer, 3);
  EXPECT_EQ(k3->group, "model.layers.3.self_attn.qkv_proj");
  EXPECT_FALSE(k3->bias_tensor.has_value());
  EXPECT_FALSE(k3->slice.has_value());
  EXPECT_EQ(k3->dtype, io::DType::BF16);
  const Linear* o3 = spec.find_linear("model.layers.3.self_attn.o_proj");
  ASSERT_NE(o3, nullptr);
  EXPECT_FALSE(o3->group.has_value());
}

TEST(ModelSpecShared, Qwen3MoeTiny) {
  PQ_REQUIRE_SHARED();
  const ModelSpec spec = load_model_spec(test::shared_dir() / "models/qwen3-moe-tiny");
  EXPECT_EQ(spec.architecture, "Qwen3MoeForCausalLM");
  // hidden 256, 6 layers (all MoE: decoder_sparse_step 1, mlp_only_layers []), 8 experts of
  // width 256. Per layer: attention 196,608 + router 8x256 = 2,048 + experts 8 x 3 x 256x256
  // = 1,572,864 + norms 640 = 1,772,160; x 6 = 10,632,960; + 8,192,000 + 256 = 18,825,216.
  EXPECT_EQ(spec.num_params(), 18'825'216);
  EXPECT_EQ(spec.num_tensors(), 200u);  // 2 + 6 x (4 attention + router + 24 experts + 4 norms)
  // 6 x (4 attention + 1 router + 8 x 3 experts) = 174 Linears; the 6 routers are passthrough.
  EXPECT_EQ(spec.linears.size(), 174u);
  EXPECT_EQ(spec.num_candidate_linears(), 168);
  EXPECT_EQ(count_role(spec, "router"), 6);
  EXPECT_EQ(count_role(spec, "expert_gate_proj"), 48);
  EXPECT_EQ(count_role(spec, "expert_down_proj"), 48);
  EXPECT_EQ(count_role(spec, "gate_proj"), 0);
  // 12 sibling groups: qkv_proj per layer, and all 24 expert projections of a layer as one.
  ASSERT_EQ(spec.groups.size(), 12u);
  EXPECT_EQ(spec.groups[1].name, "model.layers.0.mlp.experts");
  EXPECT_EQ(spec.groups[1].members.size(), 24u);
  for (std::size_t index : spec.groups[1].members) {
    EXPECT_EQ(spec.linears[index].layer, 0);
    EXPECT_TRUE(spec.linears[index].expert.has_value());
  }
  // Passthrough: embedding + final norm + 6 x 4 norms + 6 routers = 32.
  EXPECT_EQ(spec.passthrough_tensors().size(), 32u);

  const Linear* router = spec.find_linear("model.layers.2.mlp.gate");
  ASSERT_NE(router, nullptr);
  EXPECT_EQ(router->role, "router");
  EXPECT_FALSE(router->is_candidate);
  EXPECT_FALSE(router->group.has_value());
  EXPECT_EQ(router->out_features, 8);
  const Linear* expert = spec.find_linear("model.layers.5.mlp.experts.7.down_proj");
  ASSERT_NE(expert, nullptr);
  EXPECT_EQ(expert->expert, 7);
  EXPECT_EQ(expert->layer, 5);
  EXPECT_EQ(expert->group, "model.layers.5.mlp.experts");
  EXPECT_TRUE(expert->is_candidate);
  EXPECT_EQ(spec.params_by_role().at("router"), 6 * 8 * 256);
}

TEST(ModelSpecShared, Stories260KBothDtypes) {
  PQ_REQUIRE_SHARED();
  for (const auto& [folder, dtype] :
       {std::pair{"stories260K", "BF16"}, {"stories260K-f32", "F32"}}) {
    SCOPED_TRACE(folder);
    const ModelSpec spec = load_model_spec(test::shared_dir() / "models" / folder);
    EXPECT_EQ(spec.architecture, "LlamaForCausalLM");
    // hidden 64, 5 layers, 8 heads / 4 KV heads, head_dim 8, FFN 172, vocab 512, tied.
    // Per layer: q 64x64 + k 32x64 + v 32x64 + o 64x64 = 12,288, gate/up/down 3 x 172x64
    // = 33,024, norms 128: 45,440; x 5 = 227,200; + embedding 512x64 = 32,768 + 64 = 260,032.
    EXPECT_EQ(spec.num_params(), 260'032);
    EXPECT_EQ(spec.num_tensors(), 47u);
    EXPECT_EQ(spec.linears.size(), 35u);
    EXPECT_EQ(spec.num_candidate_linears(), 35);
    EXPECT_EQ(spec.groups.size(), 10u);
    EXPECT_EQ(spec.passthrough_tensors().size(), 12u);  // embedding, final norm, 5 x 2 norms
    EXPECT_EQ(spec.params_by_dtype().at(dtype), 260'032);
    const Linear* down = spec.find_linear("model.layers.4.mlp.down_proj");
    ASSERT_NE(down, nullptr);
    EXPECT_EQ(down->out_features, 64);
    EXPECT_EQ(down->in_features, 172);
  }
}

TEST(ModelSpecShared, InspectJsonMatchesSpec) {
  PQ_REQUIRE_SHARED();
  const ModelSpec spec = load_model_spec(test::shared_dir() / "models/qwen3-moe-tiny");
  const auto json = inspect_json(spec);
  EXPECT_EQ(json.at("schema_version"), kInspectSchemaVersion);
  EXPECT_EQ(json.at("architecture"), "Qwen3MoeForCausalLM");
  EXPECT_EQ(json.at("num_params"), 18'825'216);
  EXPECT_EQ(json.at("num_linears"), 174);
  EXPECT_EQ(json.at("num_candidate_linears"), 168);
  EXPECT_EQ(json.at("num_sibling_groups"), 12);
  EXPECT_EQ(json.at("params_by_dtype").at("BF16"), 18'825'216);
  EXPECT_EQ(json.at("params_by_role").at("expert_up_proj"), 48 * 256 * 256);
  ASSERT_EQ(json.at("linears").size(), 174u);
  const auto& first = json.at("linears").at(0);
  EXPECT_EQ(first.at("name"), "model.layers.0.self_attn.q_proj");
  EXPECT_EQ(first.at("shape"), nlohmann::ordered_json::array({256, 256}));
  EXPECT_EQ(first.at("role"), "q_proj");
  EXPECT_EQ(first.at("layer"), 0);
  EXPECT_EQ(first.at("group"), "model.layers.0.self_attn.qkv_proj");
  EXPECT_TRUE(first.at("expert").is_null());
  EXPECT_EQ(json.at("sibling_groups").size(), 12u);
  EXPECT_EQ(json.at("sibling_groups").at(1).at("members").size(), 24u);
  EXPECT_EQ(json.at("passthrough").size(), 32u);
  // Every checkpoint tensor appears exactly once: as a Linear weight, a bias or passthrough.
  const io::Checkpoint checkpoint =
      io::Checkpoint::open(test::shared_dir() / "models/qwen3-moe-tiny");
  std::vector<std::string> listed;
  for (const auto& linear : json.at("linears")) {
    if (linear.at("candidate")) listed.push_back(linear.at("weight"));
  }
  for (const auto& tensor : json.at("passthrough")) listed.push_back(tensor.at("name"));
  std::sort(listed.begin(), listed.end());
  EXPECT_EQ(listed, checkpoint.tensor_names());
}

TEST(ModelSpecShared, ShardedCopyGivesTheSameInventory) {
  PQ_REQUIRE_SHARED();
  const auto source = test::shared_dir() / "models/qwen3-dense-tiny";
  const io::Checkpoint original = io::Checkpoint::open(source);
  test::TempDir dir;
  std::filesystem::copy_file(source / "config.json", dir / "config.json");
  {
    // 8 MB shards: the 8,192,000-element BF16 embedding gets a shard of its own, the layers
    // spread over the others.
    io::ShardedCheckpointWriter writer(dir.path(), {.max_shard_bytes = 8'000'000});
    for (const std::string& name : original.tensor_names()) {
      const io::TensorView view = original.view(name);
      writer.add(name, view.info->dtype, view.info->shape, view.bytes);
    }
    ASSERT_GT(writer.commit().size(), 2u);  // shards plus model.safetensors.index.json
  }
  const ModelSpec single = load_model_spec(source);
  const ModelSpec sharded = load_model_spec(dir.path());
  EXPECT_EQ(sharded.num_params(), 14'488'832);
  EXPECT_EQ(sharded.num_tensors(), 90u);
  ASSERT_EQ(sharded.linears.size(), single.linears.size());
  for (std::size_t i = 0; i < single.linears.size(); ++i) {
    EXPECT_EQ(sharded.linears[i].name, single.linears[i].name);
    EXPECT_EQ(sharded.linears[i].group, single.linears[i].group);
  }
  EXPECT_EQ(sharded.passthrough_tensors(), single.passthrough_tensors());
}

TEST(ModelSpecShared, InspectTextNamesTheFigures) {
  PQ_REQUIRE_SHARED();
  const std::string text =
      inspect_text(load_model_spec(test::shared_dir() / "models/qwen3-dense-tiny"));
  EXPECT_NE(text.find("Qwen3ForCausalLM"), std::string::npos);
  EXPECT_NE(text.find("14,488,832"), std::string::npos);
  EXPECT_NE(text.find("56 Linears in 16 sibling groups"), std::string::npos);
  EXPECT_NE(text.find("34 tensors kept as stored"), std::string::npos);
}

}  // namespace
}  // namespace pq::model
