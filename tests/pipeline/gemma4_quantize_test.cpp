// quantize end to end on the tiny Gemma 4 checkpoints (the 31B layout, dense, and the 26B-A4B
// layout, MoE; no tokenizer, so calibration and held-out data are token ids): validate
// reproduces the KL measured before export, bits charged equal bytes on disk, every tensor the
// exporter keeps (norms, layer_scalar, the router and its scales, the embedding, the vision
// tower) is the source's bytes, and the quantization_config resolves, under vLLM's Gemma 4
// renames, to one scheme per module vLLM builds (../shared/docs/gemma4-architecture-facts.md §10;
// vllm/model_executor/models/gemma4.py and gemma4_mm.py).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>

#include "common/file_util.h"
#include "common/json_reader.h"
#include "formats/weight_format.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "model/model_spec.h"
#include "pipeline/quantize_pipeline.h"
#include "support/test_support.h"

namespace pq::pipeline {
namespace {

namespace fs = std::filesystem;

// Gemma4ForConditionalGeneration's hf_to_vllm_mapper (gemma4_mm.py; facts §10), applied to a
// target or ignore entry as compressed-tensors' apply_vllm_mapper does.
std::string vllm_name(const std::string& name) {
  const std::pair<const char*, const char*> prefixes[] = {
      {"model.language_model.", "language_model.model."},
      {"model.vision_tower.", "vision_tower."},
      {"model.embed_vision.", "embed_vision."},
      {"lm_head.", "language_model.lm_head."}};
  for (const auto& [from, to] : prefixes) {
    if (name.starts_with(from)) return to + name.substr(std::string(from).size());
  }
  return name;
}

// What vLLM resolves from the config: the config group of an unfused module name, or nullopt
// when it is ignored (or named nowhere). Exact names only: the exporter writes no regexes.
class Schemes {
 public:
  explicit Schemes(const nlohmann::json& qconfig) {
    for (const auto& [group, body] : qconfig.at("config_groups").items()) {
      for (const std::string target : body.at("targets")) {
        EXPECT_TRUE(group_of_.emplace(vllm_name(target), group).second) << target;
      }
    }
    for (const std::string entry : qconfig.at("ignore")) ignored_.insert(vllm_name(entry));
  }
  std::optional<std::string> of(const std::string& module) const {
    const auto it = group_of_.find(module);
    EXPECT_NE(it != group_of_.end(), ignored_.contains(module))
        << module << " must be targeted or ignored, once";
    if (it == group_of_.end()) return std::nullopt;
    return it->second;
  }
  // A fused module (qkv_proj, gate_up_proj, the FusedMoE's three projections of expert 0): its
  // shards must agree (vLLM: "Found a different quantization schemes" otherwise).
  std::optional<std::string> fused(const std::string& prefix,
                                   std::initializer_list<const char*> shards) const {
    std::optional<std::optional<std::string>> common;
    for (const char* shard : shards) {
      const auto scheme = of(prefix + shard);
      if (common) {
        EXPECT_EQ(*common, scheme) << prefix << shard;
      }
      common = scheme;
    }
    return *common;
  }

 private:
  std::map<std::string, std::string> group_of_;
  std::set<std::string> ignored_;
};

class Gemma4Quantize : public ::testing::TestWithParam<std::string> {};

TEST_P(Gemma4Quantize, TokenIdsEndToEndUnderVllmNames) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  QuantizeJob job;
  job.model = test::shared_dir() / "models" / GetParam();
  const model::ModelConfig config = model::ModelConfig::load(job.model);
  job.data = test::write_token_ids(dir / "ids.txt", config.vocab_size, 4000);
  job.token_ids = true;
  job.out = dir / "out";
  job.nsamples = 4;
  job.seqlen = 64;
  job.eval_windows = 2;
  job.eval_seqlen = 64;
  job.target_bits = "6";
  // Random weights with a sharp router (router.proj N(0, 4.5)): NVFP4 experts flip routing
  // choices, so the random MoE checkpoint's KL (0.72 nats at 6 bits) is beyond what validate's
  // default gates accept for a served model. What is asserted is that validate reproduces the
  // measured KL exactly.
  job.gates.max_kl = 5.0;
  job.gates.min_top1 = 0.0;
  job.gates.max_ppl_ratio = 100.0;
  const QuantizeOutcome outcome = run_quantize(job);

  EXPECT_GT(outcome.measured.mean_kl, 0.0);
  EXPECT_EQ(outcome.validated.mean_kl, outcome.measured.mean_kl);
  const auto assignment =
      nlohmann::json::parse(read_text_file(dir / "out.work/alloc/assignment.json"));
  EXPECT_EQ(outcome.exported.tensor_bytes,
            assignment.at("totals").at("checkpoint_bytes").get<std::uint64_t>());
  std::map<std::string, std::string> format_of;
  std::set<std::string> formats;
  for (const auto& linear : assignment.at("linears")) {
    format_of[linear.at("name")] = linear.at("format");
    formats.insert(linear.at("format").get<std::string>());
  }
  std::printf("[%s] measured mean KL %.6g, validated %.6g, formats:", GetParam().c_str(),
              outcome.measured.mean_kl, outcome.validated.mean_kl);
  for (const std::string& f : formats) std::printf(" %s", f.c_str());
  std::printf("\n");

  // Everything the spec keeps as stored is the source's bytes under the source's name.
  const model::ModelSpec spec = model::load_model_spec(job.model);
  const io::Checkpoint source = io::Checkpoint::open(job.model);
  const io::Checkpoint exported = io::Checkpoint::open(job.out);
  std::size_t compared = 0;
  for (const std::string& name : spec.passthrough_tensors()) {
    ASSERT_TRUE(exported.contains(name)) << name;
    const auto a = source.view(name).bytes;
    const auto b = exported.view(name).bytes;
    EXPECT_TRUE(std::equal(a.begin(), a.end(), b.begin(), b.end())) << name;
    ++compared;
  }
  EXPECT_GT(compared, 0u);
  for (const std::string& name : exported.tensor_names()) {
    EXPECT_FALSE(name.ends_with("experts.gate_up_proj") || name.ends_with("experts.down_proj"))
        << name << ": experts are written per expert";
  }

  // The modules vLLM builds resolve to the format assigned to their Linears.
  const nlohmann::json out_config = read_json_file(job.out / "config.json");
  const Schemes schemes(out_config.at("quantization_config"));
  const auto expect_format = [&](const std::optional<std::string>& group,
                                 const std::string& linear) {
    const std::string& format = format_of.at(linear);
    EXPECT_EQ(group.has_value(), format != "BF16") << linear;
    if (!group) return;
    nlohmann::json body = out_config.at("quantization_config").at("config_groups").at(*group);
    body.erase("targets");
    EXPECT_EQ(body, formats::format_by_name(format).config_group()) << linear;
  };
  for (std::int64_t l = 0; l < config.num_hidden_layers; ++l) {
    const std::string hf = "model.language_model.layers." + std::to_string(l) + ".";
    const std::string vllm = vllm_name(hf);
    // q/k/v in one QKVParallelLinear; on k_eq_v layers the v shard is k_proj loaded again.
    expect_format(schemes.fused(vllm + "self_attn.", {"q_proj", "k_proj", "v_proj"}),
                  hf + "self_attn.q_proj");
    expect_format(schemes.of(vllm + "self_attn.o_proj"), hf + "self_attn.o_proj");
    expect_format(schemes.fused(vllm + "mlp.", {"gate_proj", "up_proj"}), hf + "mlp.gate_proj");
    expect_format(schemes.of(vllm + "mlp.down_proj"), hf + "mlp.down_proj");
    if (!config.is_moe_layer(l)) continue;
    // Gemma4MoE under "moe", its FusedMoE under "experts": looked up by expert 0's names.
    expect_format(schemes.fused(vllm + "moe.experts.0.", {"gate_proj", "up_proj", "down_proj"}),
                  hf + "experts.0.gate_proj");
    EXPECT_FALSE(schemes.of(vllm + "router.proj").has_value());
  }
  // Layer 5 is a k_eq_v full layer: no v_proj is written.
  EXPECT_FALSE(exported.contains("model.language_model.layers.5.self_attn.v_proj.weight"));
}

INSTANTIATE_TEST_SUITE_P(TinyGemma4, Gemma4Quantize,
                         ::testing::Values("gemma4-tiny-random", "gemma4-moe-tiny-random"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

}  // namespace
}  // namespace pq::pipeline
