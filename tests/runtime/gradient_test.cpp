#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "io/safetensors.h"
#include "runtime/gradient_difference.h"
#include "runtime/model.h"
#include "runtime/tiny_models.h"
#include "support/test_support.h"

namespace pq::runtime {
namespace {

using synthetic::make_tiny_model;
using synthetic::tiny_config;

struct GradientCase {
  std::string label;
  std::string architecture;
  nlohmann::json overrides;
};

// Every architecture and the features that change the backward: GQA (all cases: 4 heads over 2
// kv heads), tied and untied heads, Qwen2 q/k/v biases, Qwen3 q/k norms with head_dim !=
// hidden/heads, sliding windows, RoPE scaling, MoE with and without renormalized top-k, and a
// MoE model with dense layers in between.
std::vector<GradientCase> gradient_cases() {
  return {
      {"llama_untied", "LlamaForCausalLM", {}},
      {"llama_tied_llama3_rope",
       "LlamaForCausalLM",
       {{"tie_word_embeddings", true},
        {"rope_scaling",
         {{"rope_type", "llama3"},
          {"factor", 8.0},
          {"low_freq_factor", 1.0},
          {"high_freq_factor", 4.0},
          {"original_max_position_embeddings", 16}}}}},
      {"mistral_sliding_window", "MistralForCausalLM", {{"sliding_window", 3}}},
      {"qwen2_biases_tied", "Qwen2ForCausalLM", {{"tie_word_embeddings", true}}},
      {"qwen3_qk_norm_yarn",
       "Qwen3ForCausalLM",
       {{"head_dim", 8}, {"rope_scaling", {{"rope_type", "yarn"}, {"factor", 4.0}}}}},
      {"qwen3_moe_normalized", "Qwen3MoeForCausalLM", {{"tie_word_embeddings", true}}},
      {"qwen3_moe_unnormalized_mixed",
       "Qwen3MoeForCausalLM",
       {{"norm_topk_prob", false}, {"decoder_sparse_step", 2}, {"num_hidden_layers", 3}}},
  };
}

std::vector<Sequence> test_batch(std::int64_t vocab) {
  std::vector<Sequence> batch(3);
  std::mt19937 rng(7);
  const std::int64_t lengths[] = {9, 6, 1};
  for (int s = 0; s < 3; ++s) {
    for (std::int64_t t = 0; t < lengths[s]; ++t) {
      batch[s].tokens.push_back(static_cast<std::int32_t>(rng() % vocab));
    }
  }
  batch[1].loss_weights = {0.5f, 2.0f, 0.0f, 1.0f, 1.5f};
  return batch;
}

// Directional derivative of the loss along `direction` for the tensor `name`, by central
// differences: (L(W + hD) - L(W - hD)) / 2h.
double finite_difference(synthetic::TinyModel& tiny, const std::string& name,
                         const std::vector<float>& direction, double step,
                         std::span<const Sequence> batch) {
  std::span<float> w = tiny.weights.mutable_values(name);
  const std::vector<float> original(w.begin(), w.end());
  double losses[2];
  for (int side = 0; side < 2; ++side) {
    const double sign = side == 0 ? 1.0 : -1.0;
    for (std::size_t i = 0; i < w.size(); ++i) {
      w[i] = static_cast<float>(original[i] + sign * step * direction[i]);
    }
    Model model(tiny.config, tiny.weights);
    losses[side] = model.loss(batch);
  }
  std::copy(original.begin(), original.end(), w.begin());
  return (losses[0] - losses[1]) / (2.0 * step);
}

double dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

// dL/dW of every Linear from the backward pass (WeightGradientCollector) against central
// differences of the fp32 loss, along two unit directions per Linear: the gradient's own
// direction (largest signal, tests its norm) and a random one (tests its direction).
class Gradients : public ::testing::TestWithParam<GradientCase> {};

TEST_P(Gradients, MatchCentralFiniteDifferences) {
  const GradientCase& gc = GetParam();
  {
    synthetic::TinyModel tiny = make_tiny_model(tiny_config(gc.architecture, gc.overrides), 1234);
    const std::vector<Sequence> batch = test_batch(tiny.config.vocab_size);
    WeightGradientCollector collector;
    double loss = 0.0;
    {
      Model model(tiny.config, tiny.weights);
      loss = model.backward(batch, collector);
      EXPECT_NEAR(loss, model.loss(batch), 1e-4 * std::abs(loss));
    }
    std::mt19937 rng(99);
    std::normal_distribution<float> normal;
    double worst = 0.0;
    std::size_t linears = 0;
    for (const auto& [linear, gradient] : collector.gradients()) {
      const std::string weight_name = linear == "lm_head" && tiny.config.tie_word_embeddings
                                          ? "model.embed_tokens.weight"
                                          : linear + ".weight";
      if (linear == "lm_head" && tiny.config.tie_word_embeddings)
        continue;  // shared with embedding
      ++linears;
      const double norm = std::sqrt(dot(gradient, gradient));
      std::vector<float> random(gradient.size());
      for (float& r : random) r = normal(rng);
      const double random_norm = std::sqrt(dot(random, random));
      for (float& r : random) r = static_cast<float>(r / random_norm);
      // Steps change the loss by about 1e-2: large against fp32 loss noise (~1e-5), small
      // enough not to flip a MoE routing decision (which makes the loss jump).
      const double step = 1e-2 / std::max(norm, 1.0);
      if (norm == 0.0) {
        // Only an expert that no token was routed to may have a zero gradient.
        EXPECT_NE(linear.find(".experts."), std::string::npos) << linear;
        EXPECT_NEAR(finite_difference(tiny, weight_name, random, 1e-2, batch), 0.0, 1e-3) << linear;
        continue;
      }
      std::vector<float> along(gradient.size());
      for (std::size_t i = 0; i < gradient.size(); ++i) {
        along[i] = static_cast<float>(gradient[i] / norm);
      }
      for (const auto* direction : {&along, &random}) {
        const double analytic = dot(gradient, *direction);
        const double numeric = finite_difference(tiny, weight_name, *direction, step, batch);
        const double error = std::abs(analytic - numeric) / std::max(norm, 1.0);
        worst = std::max(worst, error);
        EXPECT_LE(error, 5e-3) << linear << ": analytic " << analytic << ", numeric " << numeric;
      }
    }
    std::printf("[%s] loss %.4f, %zu Linears, worst |analytic - numeric| / max(|dW|, 1) = %.2g\n",
                gc.label.c_str(), loss, linears, worst);
    EXPECT_GE(linears, 7u * static_cast<std::size_t>(tiny.config.num_hidden_layers));
  }
}

INSTANTIATE_TEST_SUITE_P(EveryArchitecture, Gradients, ::testing::ValuesIn(gradient_cases()),
                         [](const auto& info) { return info.param.label; });

// The bf16 backward (bf16 GEMM inputs, including dY W) against the fp32 backward on a real
// checkpoint: per Linear, ||dW_bf16 - dW_fp32||_F / ||dW_fp32||_F. Measured on qwen3-dense-tiny
// and qwen3-moe-tiny (2 x 64 tokens): worst Linear 9.1e-3 (dense, layer 7 q_proj) and 5.1e-3
// (MoE); the bound is 5e-2 (a wrong operand or a missing term gives errors of order 1).
TEST(Gradients, Bf16BackwardTracksFp32OnRealCheckpoints) {
  PQ_REQUIRE_SHARED();
  for (const std::string name : {"qwen3-dense-tiny", "qwen3-moe-tiny"}) {
    SCOPED_TRACE(name);
    const auto dir = pq::test::shared_dir() / "models" / name;
    const auto checkpoint = io::Checkpoint::open(dir);
    const CheckpointWeightSource weights(checkpoint);
    const auto config = model::ModelConfig::load(dir);
    std::vector<Sequence> batch(2);
    for (int t = 0; t < 64; ++t) {
      batch[0].tokens.push_back((t * 7919 + 13) % 32000);
      batch[1].tokens.push_back((t * 104729 + 5) % 32000);
    }
    WeightGradientCollector fp32, bf16;
    Model(config, weights).backward(batch, fp32);
    Model(config, weights, {.compute = ComputeType::kBF16}).backward(batch, bf16);
    ASSERT_EQ(fp32.gradients().size(), bf16.gradients().size());
    const GradientDifference worst = worst_gradient_difference(fp32, bf16);
    std::printf("[%s] bf16 vs fp32 dW: worst relative Frobenius error %.3g (%s)\n", name.c_str(),
                worst.relative, worst.linear.c_str());
    EXPECT_LT(worst.relative, 5e-2) << worst.linear;
  }
}

}  // namespace
}  // namespace pq::runtime
