#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "common/error.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "model/model_spec.h"
#include "runtime/fixture_json.h"
#include "runtime/gradient_difference.h"
#include "runtime/model.h"
#include "support/qwen3_next_checkpoint.h"
#include "support/test_support.h"

// Qwen3.5/3.6 checkpoints against the float64 fixtures of an independent NumPy implementation
// (../shared/fixtures/qwen3_5*-tiny-random-logits.json; its "about" key describes the format):
// logits, the residual stream after every layer, and directional derivatives <dL/dW, V> of the
// summed next-token cross-entropy.
namespace pq::runtime {
namespace {

const char* const kModels[] = {"qwen3_5-tiny-random", "qwen3_5-moe-tiny-random"};

// <gradient, direction> with gradient [rows, columns] against rows [first_row, first_row + rows)
// of matrix `index` of a direction shaped [matrices, rows_per_matrix, columns].
double slice_dot(const std::vector<float>& gradient, const std::vector<float>& direction,
                 std::int64_t index, std::int64_t rows_per_matrix, std::int64_t first_row,
                 std::int64_t columns) {
  double dot = 0.0;
  const float* v = direction.data() + (index * rows_per_matrix + first_row) * columns;
  for (std::size_t i = 0; i < gradient.size(); ++i) dot += static_cast<double>(gradient[i]) * v[i];
  return dot;
}

// <dL/dW, V> from a backward pass for every probe of the next-token loss, as relative errors
// against the fixture's Richardson-extrapolated central differences.
std::vector<std::pair<std::string, double>> derivative_errors(const Fixture& f,
                                                              ComputeType compute) {
  const CheckpointWeightSource weights(f.checkpoint);
  Model model(f.config, weights, {.compute = compute});
  // The body's Linears from the next-token loss, the MTP head's from the MTP loss.
  WeightGradientCollector body, mtp;
  const double loss = model.backward(f.batch, body);
  EXPECT_NEAR(loss, f.json["ce_sum"].get<double>(), 1e-3 * f.json["ce_sum"].get<double>());
  const double mtp_loss = model.mtp_loss_backward(f.batch, mtp);
  EXPECT_NEAR(mtp_loss, f.json["mtp_ce_sum"].get<double>(),
              1e-3 * f.json["mtp_ce_sum"].get<double>());
  std::vector<std::pair<std::string, double>> errors;
  for (const auto& probe : f.json["grad_probes"]) {
    const WeightGradientCollector& gradients = probe["loss"] == "ce_sum" ? body : mtp;
    const std::string tensor = probe["tensor"];
    const std::vector<float> direction = decode_base64_f32(probe["V_f32_le_base64"]);
    const auto shape = probe["shape"].get<std::vector<std::int64_t>>();
    const auto gradient_of = [&](const std::string& linear) {
      const auto it = gradients.gradients().find(linear);
      EXPECT_NE(it, gradients.gradients().end()) << linear;
      return it == gradients.gradients().end() ? std::vector<float>{} : it->second;
    };
    double dot = 0.0;
    const std::string packed = "gate_up_proj";
    if (tensor.ends_with(packed)) {
      // [E, 2I, H]: expert e's gate_proj is rows [0, I) of matrix e, its up_proj rows [I, 2I).
      const std::string experts = tensor.substr(0, tensor.size() - packed.size());
      const std::int64_t inter = shape[1] / 2;
      for (std::int64_t e = 0; e < shape[0]; ++e) {
        const std::string prefix = experts + std::to_string(e) + ".";
        dot += slice_dot(gradient_of(prefix + "gate_proj"), direction, e, shape[1], 0, shape[2]);
        dot += slice_dot(gradient_of(prefix + "up_proj"), direction, e, shape[1], inter, shape[2]);
      }
    } else {
      const std::string suffix = ".weight";
      EXPECT_TRUE(tensor.ends_with(suffix)) << tensor;
      const auto gradient = gradient_of(tensor.substr(0, tensor.size() - suffix.size()));
      EXPECT_EQ(gradient.size(), direction.size()) << tensor;
      dot = slice_dot(gradient, direction, 0, 0, 0, 0);
    }
    const double expected = probe["directional_derivative"].get<double>();
    errors.emplace_back(tensor, std::abs(dot - expected) / std::abs(expected));
  }
  return errors;
}

// Measured (fp32, max error / max magnitude): logits 8.6e-7 (dense) and 4.1e-7 (MoE), residuals
// 6.1e-7 and 2.9e-7.
TEST(Qwen3_5Fixture, Fp32LogitsAndResidualsMatchFloat64Reference) {
  PQ_REQUIRE_SHARED();
  for (const char* name : kModels) {
    SCOPED_TRACE(name);
    const Fixture f(name);
    const ForwardErrors e = forward_errors(f, ComputeType::kF32);
    std::printf("[%s] fp32 max error / max magnitude: logits %.3g, residuals %.3g\n", name,
                e.logits, e.residuals);
    EXPECT_LE(e.logits, 1e-4);
    EXPECT_LE(e.residuals, 1e-4);
  }
}

// The MTP head's logits from the body's last-layer output (facts §7): row t of a sequence takes
// h_t and token t + 1 and predicts token t + 2. Measured (fp32, max error / max magnitude):
// 5.2e-7 (dense), 4.0e-7 (MoE).
TEST(Qwen3_5Fixture, Fp32MtpLogitsMatchFloat64Reference) {
  PQ_REQUIRE_SHARED();
  for (const char* name : kModels) {
    SCOPED_TRACE(name);
    const Fixture f(name);
    const CheckpointWeightSource weights(f.checkpoint);
    Model model(f.config, weights);
    ASSERT_TRUE(model.has_mtp());
    const auto pass = model.begin_pass(f.batch);
    const std::vector<float> x = body_output(model, *pass, f.config);
    double error = 0.0;
    std::int64_t sequences = 0;
    model.mtp_forward(*pass, x.data(), [&](std::int64_t s, const float* logits, std::int64_t n) {
      EXPECT_EQ(n, static_cast<std::int64_t>(f.json["mtp_logits"][s].size()));
      error = std::max(error, relative_max_error(logits, f.json["mtp_logits"][s]));
      ++sequences;
    });
    EXPECT_EQ(sequences, 2);
    std::printf("[%s] fp32 MTP logits max error / max magnitude %.3g\n", name, error);
    EXPECT_LE(error, 1e-4);
  }
}

// Model::extend continues the Gated DeltaNet layers from the cached conv inputs and recurrent
// state and the attention layers from their keys and values: any chunking gives the logits of a
// full forward pass. Measured max difference / max logit: 6.1e-7 (dense), 3.0e-7 (MoE).
TEST(Qwen3_5Fixture, CachedDecodingMatchesFullForward) {
  PQ_REQUIRE_SHARED();
  for (const char* name : kModels) {
    SCOPED_TRACE(name);
    const Fixture f(name);
    const CheckpointWeightSource weights(f.checkpoint);
    Model model(f.config, weights, {.keep_layers_resident = true});
    const std::vector<std::int32_t>& tokens = f.batch[0].tokens;
    const std::vector<float> full = model.logits(tokens);
    DecodeState state;
    std::vector<float> cached;
    std::size_t begin = 0;
    for (const std::size_t length : {5, 1, 1, 1, 1, 3, 12}) {
      const auto logits = model.extend(state, std::span(tokens).subspan(begin, length));
      cached.insert(cached.end(), logits.begin(), logits.end());
      begin += length;
    }
    ASSERT_EQ(begin, tokens.size());
    ASSERT_EQ(cached.size(), full.size());
    double max_diff = 0.0, max_logit = 0.0;
    for (std::size_t i = 0; i < full.size(); ++i) {
      max_diff = std::max(max_diff, static_cast<double>(std::abs(full[i] - cached[i])));
      max_logit = std::max(max_logit, static_cast<double>(std::abs(full[i])));
    }
    std::printf("[%s] cached decoding vs full forward: max diff / max logit %.3g\n", name,
                max_diff / max_logit);
    EXPECT_LE(max_diff, 1e-5 * max_logit);
  }
}

// The fixture's smallest gap between the k-th and (k+1)-th router logit is 0.05, far above fp32
// error: every decision must match, in order.
TEST(Qwen3_5Fixture, Fp32RoutingEqualsReference) {
  PQ_REQUIRE_SHARED();
  const Fixture f("qwen3_5-moe-tiny-random");
  const CheckpointWeightSource weights(f.checkpoint);
  Model model(f.config, weights);
  RoutingRecorder routing;
  model.forward(
      f.batch, [](std::int64_t, const float*, std::int64_t) {}, &routing);
  const std::int64_t k = f.config.num_experts_per_tok;
  double weight_error = 0.0;
  for (std::int64_t l = 0; l < f.config.num_hidden_layers; ++l) {
    std::int64_t row = 0;
    for (std::size_t s = 0; s < f.batch.size(); ++s) {
      const auto& ids = f.json["routing"]["topk_ids"][s][l];
      const auto& w = f.json["routing"]["topk_weights"][s][l];
      for (std::size_t t = 0; t < ids.size(); ++t, ++row) {
        for (std::int64_t j = 0; j < k; ++j) {
          EXPECT_EQ(routing.layers[l].experts[row * k + j], ids[t][j].get<std::int32_t>())
              << "layer " << l << " sequence " << s << " token " << t;
          weight_error = std::max(weight_error, std::abs(routing.layers[l].weights[row * k + j] -
                                                         w[t][j].get<double>()));
        }
      }
    }
  }
  // The MTP layer (reported as layer num_hidden_layers) over its rows t = 0 .. T - 2.
  const std::int64_t mtp_layer = f.config.num_hidden_layers;
  RoutingRecorder mtp_routing;
  const auto pass = model.begin_pass(f.batch);
  const std::vector<float> x = body_output(model, *pass, f.config);
  model.mtp_forward(
      *pass, x.data(), [](std::int64_t, const float*, std::int64_t) {}, &mtp_routing);
  ASSERT_EQ(mtp_routing.layers.size(), 1u);
  std::int64_t row = 0;
  for (std::size_t s = 0; s < f.batch.size(); ++s) {
    const auto& ids = f.json["mtp_routing"]["topk_ids"][s];
    const auto& w = f.json["mtp_routing"]["topk_weights"][s];
    for (std::size_t t = 0; t < ids.size(); ++t, ++row) {
      for (std::int64_t j = 0; j < k; ++j) {
        EXPECT_EQ(mtp_routing.layers[mtp_layer].experts[row * k + j], ids[t][j].get<std::int32_t>())
            << "MTP sequence " << s << " row " << t;
        weight_error = std::max(
            weight_error,
            std::abs(mtp_routing.layers[mtp_layer].weights[row * k + j] - w[t][j].get<double>()));
      }
    }
  }
  std::printf(
      "routing (body and MTP): all decisions equal; max |routing weight - reference| "
      "%.3g\n",
      weight_error);
  EXPECT_LE(weight_error, 1e-5);
}

TEST(Qwen3_5Fixture, Fp32DirectionalDerivativesMatchFiniteDifferences) {
  PQ_REQUIRE_SHARED();
  for (const char* name : kModels) {
    SCOPED_TRACE(name);
    const Fixture f(name);
    for (const auto& [tensor, error] : derivative_errors(f, ComputeType::kF32)) {
      std::printf("[%s] fp32 <dL/dW, V> of %s: relative error %.3g\n", name, tensor.c_str(), error);
      EXPECT_LE(error, 1e-4) << tensor;
    }
  }
}

// Counts the backward's reports per Linear, with and without an output gradient.
class ReportCounter final : public LinearObserver {
 public:
  void on_linear(const LinearActivity& a) override {
    ++(a.output_grad != nullptr ? with_gradient : without_gradient)[std::string(a.name)];
  }
  std::map<std::string, int> with_gradient, without_gradient;
};

// The backward reports every Linear of the spec's text component (the body and lm_head) exactly
// once, with its output gradient, and nothing else; the MTP pass likewise every Linear of the
// spec's mtp component (mtp.fc and mtp.layers.0.*).
TEST(Qwen3_5Fixture, BackwardsReportEveryLinearOfTheirComponentOnce) {
  PQ_REQUIRE_SHARED();
  for (const char* name : kModels) {
    SCOPED_TRACE(name);
    const Fixture f(name);
    const model::ModelSpec spec = model::build_model_spec(f.config, f.checkpoint);
    const CheckpointWeightSource weights(f.checkpoint);
    Model model(f.config, weights);
    ReportCounter body, mtp;
    model.backward(f.batch, body);
    model.mtp_loss_backward(f.batch, mtp);
    for (const auto& [component, counter] :
         {std::pair{model::Component::kText, &body}, std::pair{model::Component::kMtp, &mtp}}) {
      std::set<std::string> expected, reported;
      for (const model::Linear& linear : spec.linears) {
        if (linear.component == component) expected.insert(linear.name);
      }
      EXPECT_TRUE(counter->without_gradient.empty());
      for (const auto& [linear, count] : counter->with_gradient) {
        reported.insert(linear);
        EXPECT_EQ(count, 1) << linear;
      }
      EXPECT_EQ(reported, expected) << model::component_name(component);
    }
  }
}

// dL/dW of every Linear outside the routed experts against central differences of the fp32 loss
// along a random unit direction, on the fixtures' checkpoints and batches (the fixture probes
// cover in_proj_qkv, out_proj, q_proj, down_proj, a router and packed experts; this covers
// in_proj_z, in_proj_b, in_proj_a, k/v/o_proj, the MLPs, shared experts and their gates). The
// routed experts' backward is the Qwen3-MoE one (tests/runtime/gradient_test.cpp). Worst
// measured |analytic - numeric| / max(|dW|, 1): 1.2e-3 (fp32 loss noise over the step).
TEST(Qwen3_5Fixture, EveryLinearGradientMatchesCentralDifferences) {
  PQ_REQUIRE_SHARED();
  for (const char* name : kModels) {
    SCOPED_TRACE(name);
    const Fixture f(name);
    InMemoryWeightSource weights;
    for (const std::string& tensor : f.checkpoint.tensor_names()) {
      weights.set(tensor, f.checkpoint.info(tensor).shape, f.checkpoint.to_f32(tensor));
    }
    WeightGradientCollector collector;
    Model(f.config, weights).backward(f.batch, collector);
    std::mt19937 rng(5);
    std::normal_distribution<float> normal;
    double worst = 0.0;
    for (const auto& [linear, gradient] : collector.gradients()) {
      if (linear.find(".experts.") != std::string::npos) continue;
      std::vector<float> direction(gradient.size());
      double norm = 0.0, grad_norm = 0.0, analytic = 0.0;
      for (float& d : direction) {
        d = normal(rng);
        norm += static_cast<double>(d) * d;
      }
      for (std::size_t i = 0; i < direction.size(); ++i) {
        direction[i] = static_cast<float>(direction[i] / std::sqrt(norm));
        analytic += static_cast<double>(gradient[i]) * direction[i];
        grad_norm += static_cast<double>(gradient[i]) * gradient[i];
      }
      grad_norm = std::sqrt(grad_norm);
      const std::string tensor = linear + ".weight";
      std::span<float> w = weights.mutable_values(tensor);
      const std::vector<float> original(w.begin(), w.end());
      const double step = 1e-2 / std::max(grad_norm, 1.0);
      double losses[2];
      for (int side = 0; side < 2; ++side) {
        const double sign = side == 0 ? 1.0 : -1.0;
        for (std::size_t i = 0; i < w.size(); ++i) {
          w[i] = static_cast<float>(original[i] + sign * step * direction[i]);
        }
        losses[side] = Model(f.config, weights).loss(f.batch);
      }
      std::copy(original.begin(), original.end(), w.begin());
      const double numeric = (losses[0] - losses[1]) / (2.0 * step);
      const double error = std::abs(analytic - numeric) / std::max(grad_norm, 1.0);
      worst = std::max(worst, error);
      EXPECT_LE(error, 5e-3) << linear << ": analytic " << analytic << ", numeric " << numeric;
    }
    std::printf("[%s] worst |analytic - numeric| / max(|dW|, 1) = %.2g\n", name, worst);
  }
}

// bf16 compute (GEMM inputs rounded to bf16; norms, conv, the delta rule and softmax in fp32)
// against the float64 fixtures, and its weight gradients against the fp32 backward's
// (||dW_bf16 - dW_fp32||_F / ||dW_fp32||_F per Linear). Measured: logits 5.4e-3 (dense) and
// 3.0e-3 (MoE) of the largest logit, residuals 3.6e-3 / 2.5e-3, worst Linear gradient 1.3e-2
// (dense, layer 4 in_proj_a) / 1.1e-2 (MoE, a shared_expert_gate); the fixture's directional
// derivatives are off by up to 7.3e-2 (dense, in_proj_qkv of layer 0): a random direction cancels
// most of <dW, V>, so rounding errors show larger relative to it than to ||dW||. The bounds leave
// about 2x margin; a wrong operand gives errors of order 1.
TEST(Qwen3_5Fixture, Bf16StaysWithinMeasuredTolerance) {
  PQ_REQUIRE_SHARED();
  for (const char* name : kModels) {
    SCOPED_TRACE(name);
    const Fixture f(name);
    const ForwardErrors e = forward_errors(f, ComputeType::kBF16);
    std::printf("[%s] bf16 max error / max magnitude: logits %.3g, residuals %.3g\n", name,
                e.logits, e.residuals);
    EXPECT_LE(e.logits, 1.5e-2);
    EXPECT_LE(e.residuals, 1.5e-2);
    for (const auto& [tensor, error] : derivative_errors(f, ComputeType::kBF16)) {
      std::printf("[%s] bf16 <dL/dW, V> of %s: relative error %.3g\n", name, tensor.c_str(), error);
      EXPECT_LE(error, 1.5e-1) << tensor;
    }
    const CheckpointWeightSource weights(f.checkpoint);
    WeightGradientCollector fp32, bf16;
    Model(f.config, weights).backward(f.batch, fp32);
    Model(f.config, weights, {.compute = ComputeType::kBF16}).backward(f.batch, bf16);
    const GradientDifference worst = worst_gradient_difference(fp32, bf16);
    std::printf("[%s] bf16 vs fp32 dW: worst relative Frobenius error %.3g (%s)\n", name,
                worst.relative, worst.linear.c_str());
    EXPECT_LE(worst.relative, 5e-2) << worst.linear;
  }
}

// One micro-batch per sequence gives the logits of one micro-batch holding both: the conv and the
// delta rule restart for every sequence either way (facts §4.5).
TEST(Qwen3_5Fixture, MicroBatchesDoNotChangeTheLogits) {
  PQ_REQUIRE_SHARED();
  for (const char* name : kModels) {
    SCOPED_TRACE(name);
    const Fixture f(name);
    const CheckpointWeightSource weights(f.checkpoint);
    std::vector<std::vector<float>> together, apart;
    const auto collect = [&](std::vector<std::vector<float>>& out) {
      return [&out, &f](std::int64_t, const float* logits, std::int64_t rows) {
        out.emplace_back(logits, logits + rows * f.config.vocab_size);
      };
    };
    Model(f.config, weights).forward(f.batch, collect(together));
    Model(f.config, weights, {.micro_batch_rows = 24}).forward(f.batch, collect(apart));
    ASSERT_EQ(together.size(), apart.size());
    for (std::size_t s = 0; s < together.size(); ++s) {
      for (std::size_t i = 0; i < together[s].size(); ++i) {
        ASSERT_NEAR(together[s][i], apart[s][i], 1e-5) << "sequence " << s << " value " << i;
      }
    }
  }
}

// A Gated DeltaNet tensor that is missing or misshapen is a one-line error naming it.
TEST(Qwen3_5Fixture, MisshapenGatedDeltaNetTensorsAreNamed) {
  PQ_REQUIRE_SHARED();
  const Fixture f("qwen3_5-tiny-random");
  const std::string prefix = "model.language_model.layers.1.linear_attn.";
  for (const auto& [tensor, shape] : std::vector<std::pair<std::string, std::vector<std::int64_t>>>{
           {prefix + "conv1d.weight", {320, 4}},
           {prefix + "A_log", {5}},
           {prefix + "in_proj_z.weight", {64, 64}},
           {prefix + "norm.weight", {64}}}) {
    SCOPED_TRACE(tensor);
    InMemoryWeightSource weights;
    for (const std::string& name : f.checkpoint.tensor_names()) {
      if (name == tensor) {
        const std::int64_t numel =
            std::accumulate(shape.begin(), shape.end(), std::int64_t{1}, std::multiplies<>());
        weights.set(name, shape, std::vector<float>(numel, 0.5f));
      } else {
        weights.set(name, f.checkpoint.info(name).shape, f.checkpoint.to_f32(name));
      }
    }
    Model model(f.config, weights);
    try {
      model.logits(f.batch[0].tokens);
      FAIL() << "expected pq::Error";
    } catch (const Error& e) {
      const std::string message = e.what();
      EXPECT_NE(message.find(tensor), std::string::npos) << message;
      EXPECT_EQ(message.find('\n'), std::string::npos) << message;
    }
  }
}

// Qwen3-Next: the dense and the MoE tiny model rewritten in its layout (flat config, "model."
// prefix, per-expert tensors, in_proj_qkvz and in_proj_ba interleaved per key-head group;
// tests/support/qwen3_next_checkpoint.h) each compute what the Qwen3.5 original does: the fixture's
// logits and MTP logits, and weight gradients equal to the original's, the fused projections'
// being the original projections' rows interleaved. Measured: logits identical to the Qwen3.5
// model's (the bound allows another GEMM library's summation order), gradients within 7.0e-7
// (dY W sums the fused projections' outputs in another order).
class Qwen3NextRuntime : public ::testing::TestWithParam<std::string> {};

TEST_P(Qwen3NextRuntime, DerivedCheckpointComputesTheQwen3_5Model) {
  PQ_REQUIRE_SHARED();
  const Fixture original(GetParam());
  test::TempDir dir;
  test::write_qwen3_next(dir.path(), GetParam());
  const auto config = model::ModelConfig::load(dir.path());
  const auto checkpoint = io::Checkpoint::open(dir.path());
  ASSERT_EQ(config.architecture, "Qwen3NextForCausalLM");
  const CheckpointWeightSource next_weights(checkpoint), original_weights(original.checkpoint);
  Model next(config, next_weights);
  Model qwen3_5(original.config, original_weights);

  double error = 0.0, max_diff = 0.0, max_logit = 0.0;
  std::vector<std::vector<float>> original_logits;
  qwen3_5.forward(original.batch, [&](std::int64_t, const float* logits, std::int64_t rows) {
    original_logits.emplace_back(logits, logits + rows * config.vocab_size);
  });
  next.forward(original.batch, [&](std::int64_t s, const float* logits, std::int64_t rows) {
    error = std::max(error, relative_max_error(logits, original.json["logits"][s]));
    for (std::int64_t i = 0; i < rows * config.vocab_size; ++i) {
      max_diff =
          std::max(max_diff, static_cast<double>(std::abs(logits[i] - original_logits[s][i])));
      max_logit = std::max(max_logit, static_cast<double>(std::abs(original_logits[s][i])));
    }
  });
  std::printf("Qwen3-Next vs Qwen3.5 logits: max diff / max logit %.3g\n", max_diff / max_logit);
  EXPECT_LE(max_diff, 1e-6 * max_logit);
  const auto pass = next.begin_pass(original.batch);
  const std::int64_t hidden = config.hidden_size;
  const std::vector<float> x = body_output(next, *pass, config);
  double mtp_error = 0.0;
  next.mtp_forward(*pass, x.data(), [&](std::int64_t s, const float* logits, std::int64_t) {
    mtp_error = std::max(mtp_error, relative_max_error(logits, original.json["mtp_logits"][s]));
  });
  std::printf("Qwen3-Next vs the Qwen3.5 fixture: logits %.3g, MTP logits %.3g\n", error,
              mtp_error);
  EXPECT_LE(error, 1e-4);
  EXPECT_LE(mtp_error, 1e-4);

  WeightGradientCollector next_grads, original_grads;
  ReportCounter body, mtp;
  next.backward(original.batch, next_grads);
  next.mtp_loss_backward(original.batch, next_grads);
  next.backward(original.batch, body);
  next.mtp_loss_backward(original.batch, mtp);
  // Every Linear of the Qwen3-Next spec is reported once by the pass of its component.
  std::set<std::string> expected, reported;
  for (const model::Linear& linear : model::build_model_spec(config, checkpoint).linears) {
    expected.insert(linear.name);
  }
  for (const ReportCounter* counter : {&body, &mtp}) {
    for (const auto& [linear, count] : counter->with_gradient) {
      EXPECT_EQ(count, 1) << linear;
      EXPECT_TRUE(reported.insert(linear).second) << linear;
    }
  }
  EXPECT_EQ(reported, expected);
  qwen3_5.backward(original.batch, original_grads);
  qwen3_5.mtp_loss_backward(original.batch, original_grads);
  const auto& g = original_grads.gradients();
  // The original's gradient of Linear `name`, rows [begin, begin + count).
  const auto rows = [&](const std::string& name, std::int64_t begin, std::int64_t count) {
    const std::vector<float>& all = g.at(name);
    return std::vector<float>(all.begin() + begin * hidden, all.begin() + (begin + count) * hidden);
  };
  const model::LinearAttentionConfig& la = *config.linear_attention;
  const std::int64_t r = la.num_value_heads / la.num_key_heads;
  const std::int64_t keys = la.num_key_heads * la.key_head_dim;
  const std::int64_t group_values = r * la.value_head_dim;
  double worst = 0.0;
  std::size_t compared = 0;
  for (const auto& [name, gradient] : next_grads.gradients()) {
    std::vector<float> expected;
    const std::string original_name =
        name.starts_with("model.") ? "model.language_model." + name.substr(6) : name;
    if (name.ends_with("in_proj_qkvz")) {
      const std::string base = original_name.substr(0, original_name.size() - 4);
      for (std::int64_t k = 0; k < la.num_key_heads; ++k) {
        for (const auto& part : {rows(base + "qkv", k * la.key_head_dim, la.key_head_dim),
                                 rows(base + "qkv", keys + k * la.key_head_dim, la.key_head_dim),
                                 rows(base + "qkv", 2 * keys + k * group_values, group_values),
                                 rows(base + "z", k * group_values, group_values)}) {
          expected.insert(expected.end(), part.begin(), part.end());
        }
      }
    } else if (name.ends_with("in_proj_ba")) {
      const std::string base = original_name.substr(0, original_name.size() - 2);
      for (std::int64_t k = 0; k < la.num_key_heads; ++k) {
        for (const auto& part : {rows(base + "b", k * r, r), rows(base + "a", k * r, r)}) {
          expected.insert(expected.end(), part.begin(), part.end());
        }
      }
    } else {
      ASSERT_TRUE(g.contains(original_name)) << name;
      expected = g.at(original_name);
    }
    ASSERT_EQ(gradient.size(), expected.size()) << name;
    double diff = 0.0, norm = 0.0;
    for (std::size_t i = 0; i < gradient.size(); ++i) {
      diff += (static_cast<double>(gradient[i]) - expected[i]) *
              (static_cast<double>(gradient[i]) - expected[i]);
      norm += static_cast<double>(expected[i]) * expected[i];
    }
    if (norm > 0.0) worst = std::max(worst, std::sqrt(diff / norm));
    ++compared;
  }
  std::printf("Qwen3-Next vs Qwen3.5 weight gradients: %zu Linears, worst relative error %.3g\n",
              compared, worst);
  // Each Gated DeltaNet layer has two fused projections where Qwen3.5 has four.
  std::size_t linear_attention_layers = 0;
  for (std::int64_t l = 0; l < config.num_hidden_layers; ++l) {
    linear_attention_layers += config.is_linear_attention_layer(l) ? 1 : 0;
  }
  EXPECT_EQ(compared + 2 * linear_attention_layers, g.size());
  EXPECT_LE(worst, 1e-5);
}

INSTANTIATE_TEST_SUITE_P(FromTheDenseAndTheMoeModel, Qwen3NextRuntime,
                         ::testing::Values("qwen3_5-tiny-random", "qwen3_5-moe-tiny-random"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

}  // namespace
}  // namespace pq::runtime
