// quantize --kv-cache fp8 end to end: the probe records what each attention layer caches, the
// export carries compressed-tensors' kv_cache_scheme and a k_scale / v_scale per attention layer
// (none on Gated DeltaNet layers; on both of Gemma 4's layer types), the model card reports the KL
// with the FP8 cache next to the KL without it, and validate reproduces both from the files.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>

#include "common/error.h"
#include "common/file_util.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "model/model_spec.h"
#include "pipeline/quantize_pipeline.h"
#include "probe/wikitext_excerpt.h"
#include "support/test_support.h"
#include "validate/ct_checkpoint.h"

namespace pq::pipeline {
namespace {

namespace fs = std::filesystem;

float read_scale(const io::Checkpoint& checkpoint, const std::string& name) {
  const io::TensorInfo& info = checkpoint.info(name);
  EXPECT_EQ(info.dtype, io::DType::F32) << name;
  EXPECT_EQ(info.shape, std::vector<std::int64_t>{1}) << name;
  float value = 0.0f;
  std::memcpy(&value, checkpoint.view(name).bytes.data(), sizeof value);
  return value;
}

class KvCacheQuantize : public ::testing::TestWithParam<std::string> {};

TEST_P(KvCacheQuantize, Fp8KvCacheScalesFromTheProbeAndBothKlsReproducedByValidate) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  QuantizeJob job;
  job.model = test::shared_dir() / "models" / GetParam();
  const model::ModelConfig config = model::ModelConfig::load(job.model);
  // The hybrid and Gemma 4 tiny checkpoints have no tokenizer: token ids, as their own tests give
  // them.
  const bool hybrid = GetParam().starts_with("qwen3_5");
  const bool token_ids = hybrid || GetParam().starts_with("gemma4");
  if (token_ids) {
    job.data = test::write_token_ids(dir / "ids.txt", config.vocab_size, 4000);
    job.token_ids = true;
  } else {
    job.data = test::wikitext_excerpt(dir);
  }
  job.out = dir / "out";
  job.nsamples = 4;
  job.seqlen = token_ids ? 64 : 128;
  job.target_bits = "4.75";
  job.eval_windows = 2;
  job.eval_seqlen = token_ids ? 64 : 128;
  job.kv_cache = true;
  if (config.gemma4) {
    // Random weights: what is asserted is that validate reproduces both measured KLs, not that
    // they pass the gates of a served model (as in Gemma4Quantize).
    job.gates.max_kl = 5.0;
    job.gates.min_top1 = 0.0;
    job.gates.max_ppl_ratio = 100.0;
  }
  const QuantizeOutcome outcome = run_quantize(job);

  // Every attention layer, and only those, has a k_scale and v_scale: amax / 448 of what the
  // probe saw it cache.
  const model::ModelSpec spec = model::load_model_spec(job.model);
  const std::map<std::int64_t, std::string> modules = spec.kv_cache_modules();
  ASSERT_FALSE(modules.empty());
  if (hybrid) {
    EXPECT_LT(static_cast<std::int64_t>(modules.size()), config.num_hidden_layers);
  } else {
    EXPECT_EQ(static_cast<std::int64_t>(modules.size()), config.num_hidden_layers);
  }
  const auto probe = nlohmann::json::parse(read_text_file(dir / "out.work/probe/probe.json"));
  std::map<std::int64_t, nlohmann::json> probed;
  for (const auto& kv : probe.at("kv_cache")) probed[kv.at("layer").get<std::int64_t>()] = kv;
  const io::Checkpoint exported = io::Checkpoint::open(job.out);
  std::size_t scales = 0;
  for (const std::string& name : exported.tensor_names()) {
    if (name.ends_with(".k_scale") || name.ends_with(".v_scale")) ++scales;
  }
  EXPECT_EQ(scales, 2 * modules.size());
  for (const auto& [layer, module] : modules) {
    ASSERT_TRUE(probed.contains(layer)) << module;
    const float key_amax = probed[layer].at("key_amax").get<float>();
    const float value_amax = probed[layer].at("value_amax").get<float>();
    EXPECT_GT(key_amax, 0.0f);
    EXPECT_GT(value_amax, 0.0f);
    EXPECT_EQ(read_scale(exported, module + ".k_scale"), key_amax / 448.0f) << module;
    EXPECT_EQ(read_scale(exported, module + ".v_scale"), value_amax / 448.0f) << module;
  }
  const auto exported_config = nlohmann::json::parse(read_text_file(job.out / "config.json"));
  const nlohmann::json& scheme = exported_config.at("quantization_config").at("kv_cache_scheme");
  EXPECT_EQ(scheme.at("num_bits"), 8);
  EXPECT_EQ(scheme.at("type"), "float");
  EXPECT_EQ(scheme.at("strategy"), "tensor");
  EXPECT_EQ(scheme.at("symmetric"), true);
  EXPECT_EQ(scheme.at("dynamic"), false);

  // The KL with the FP8 cache is measured next to the one without it; validate reproduces both
  // from the files, bit for bit.
  const exporter::MeasuredQuality& measured = outcome.measured;
  ASSERT_TRUE(measured.fp8_kv_cache.has_value());
  EXPECT_GT(measured.fp8_kv_cache->mean_kl, 0.0);
  EXPECT_NE(measured.fp8_kv_cache->mean_kl, measured.mean_kl);
  const validate::ValidateReport& validated = outcome.validated;
  EXPECT_EQ(validated.mean_kl, measured.mean_kl);
  ASSERT_TRUE(validated.fp8_kv_cache.has_value());
  EXPECT_EQ(validated.fp8_kv_cache->layers, static_cast<std::int64_t>(modules.size()));
  EXPECT_EQ(validated.fp8_kv_cache->mean_kl, measured.fp8_kv_cache->mean_kl);
  EXPECT_EQ(validated.fp8_kv_cache->perplexity, measured.fp8_kv_cache->perplexity);
  EXPECT_EQ(validated.fp8_kv_cache->top1_agreement, measured.fp8_kv_cache->top1_agreement);
  const std::string card = read_text_file(job.out / "README.md");
  EXPECT_NE(card.find(fmt::format("| {:.6f} | {:.6f} |", measured.mean_kl,
                                  measured.fp8_kv_cache->mean_kl)),
            std::string::npos)
      << card;
  EXPECT_NE(card.find("--kv-cache-dtype fp8"), std::string::npos);
  const auto report = nlohmann::json::parse(read_text_file(dir / "out.work/validate.json"));
  EXPECT_EQ(report.at("fp8_kv_cache").at("mean_kl_nats").get<double>(),
            measured.fp8_kv_cache->mean_kl);
  fmt::print("{}: KL {:.6f} nats with a bf16 KV cache, {:.6f} with FP8; scales {:.4g} to {:.4g}\n",
             GetParam(), measured.mean_kl, measured.fp8_kv_cache->mean_kl,
             validated.fp8_kv_cache->min_scale, validated.fp8_kv_cache->max_scale);

  // validate refuses scales without a kv_cache_scheme, and a scheme vLLM does not load.
  nlohmann::json changed = exported_config;
  changed["quantization_config"]["kv_cache_scheme"] = nullptr;
  write_text_file_atomic(job.out / "config.json", changed.dump(2));
  EXPECT_THROW(validate::CompressedTensorsCheckpoint::open(job.out), Error);
  changed["quantization_config"]["kv_cache_scheme"] = scheme;
  changed["quantization_config"]["kv_cache_scheme"]["strategy"] = "channel";
  write_text_file_atomic(job.out / "config.json", changed.dump(2));
  EXPECT_THROW(validate::CompressedTensorsCheckpoint::open(job.out), Error);
}

INSTANTIATE_TEST_SUITE_P(SharedModels, KvCacheQuantize,
                         ::testing::Values("qwen3-dense-tiny", "qwen3-moe-tiny",
                                           "qwen3_5-tiny-random", "gemma4-tiny-random"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

}  // namespace
}  // namespace pq::pipeline
