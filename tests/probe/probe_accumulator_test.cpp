#include "probe/probe_accumulator.h"

#include <fmt/format.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>

#include "common/error.h"
#include "io/safetensors.h"
#include "io/safetensors_writer.h"
#include "model/model_spec.h"
#include "probe/input_key.h"
#include "runtime/model.h"
#include "runtime/tiny_models.h"
#include "support/test_support.h"

namespace pq::probe {
namespace {

using runtime::synthetic::TinyModel;

model::ModelSpec spec_of(const TinyModel& tiny) {
  std::vector<model::TensorDesc> tensors;
  for (const std::string& name : tiny.weights.names()) {
    tensors.push_back({name, io::DType::F32, tiny.weights.shape(name)});
  }
  return model::build_model_spec(tiny.config, tensors, "tiny");
}

std::vector<runtime::Sequence> random_batch(std::int64_t vocab, std::vector<std::int64_t> lengths,
                                            std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<runtime::Sequence> batch(lengths.size());
  for (std::size_t s = 0; s < lengths.size(); ++s) {
    for (std::int64_t t = 0; t < lengths[s]; ++t) {
      batch[s].tokens.push_back(static_cast<std::int32_t>(rng() % vocab));
    }
  }
  return batch;
}

double squared_norm(const std::vector<float>& values) {
  double sum = 0.0;
  for (const float v : values) sum += static_cast<double>(v) * v;
  return sum;
}

// Forwards every call to two observers, so one pass feeds the accumulator and a recorder.
class Tee final : public runtime::LinearObserver {
 public:
  Tee(runtime::LinearObserver& a, runtime::LinearObserver& b) : a_(a), b_(b) {}
  void on_linear(const runtime::LinearActivity& activity) override {
    a_.on_linear(activity);
    b_.on_linear(activity);
  }
  void on_routing(const runtime::RoutingActivity& routing) override {
    a_.on_routing(routing);
    b_.on_routing(routing);
  }

 private:
  runtime::LinearObserver& a_;
  runtime::LinearObserver& b_;
};

// Keeps the input rows each Linear reported.
class InputRecorder final : public runtime::LinearObserver {
 public:
  void on_linear(const runtime::LinearActivity& a) override {
    auto& rows = inputs[std::string(a.name)];
    rows.insert(rows.end(), a.input, a.input + a.rows * a.in_features);
  }
  std::map<std::string, std::vector<float>> inputs;
};

// The Fisher trace is the mean over sequences of ||dL_s/dW||^2, checked against one backward pass
// per sequence (WeightGradientCollector).
TEST(ProbeAccumulator, FisherTraceIsPerSequence) {
  TinyModel tiny =
      runtime::synthetic::make_tiny_model(runtime::synthetic::tiny_config("Qwen3ForCausalLM"), 7);
  const model::ModelSpec spec = spec_of(tiny);
  runtime::Model model(tiny.config, tiny.weights);
  const auto batch = random_batch(tiny.config.vocab_size, {9, 6, 11}, 5);

  ProbeAccumulator sums(spec);
  sums.begin_batch();
  model.backward(batch, sums);
  sums.end_batch(static_cast<std::int64_t>(batch.size()));
  ASSERT_EQ(sums.sequences(), 3);

  std::map<std::string, double> per_sequence;
  for (const auto& sequence : batch) {
    runtime::WeightGradientCollector collector;
    model.backward(std::span(&sequence, 1), collector);
    for (const auto& [name, g] : collector.gradients()) per_sequence[name] += squared_norm(g);
  }
  ASSERT_FALSE(sums.linears().empty());
  for (const LinearSums& linear : sums.linears()) {
    const double expected = per_sequence.at(linear.name) / 3.0;
    const double measured = linear.fisher_sum / static_cast<double>(sums.sequences());
    EXPECT_NEAR(measured, expected, 1e-4 * expected) << linear.name;
    EXPECT_EQ(linear.tokens, 26) << linear.name;
  }
}

// A batch holding one sequence twice: the per-sequence Fisher trace is ||G||^2, while the squared
// batch gradient over the batch's sequences (upstream's streaming probe, method-facts.md §2) gives
// ||2G||^2 / 2 = 2 ||G||^2.
TEST(ProbeAccumulator, FisherTraceIsNotTheSquaredBatchGradient) {
  TinyModel tiny =
      runtime::synthetic::make_tiny_model(runtime::synthetic::tiny_config("Qwen3ForCausalLM"), 8);
  const model::ModelSpec spec = spec_of(tiny);
  runtime::Model model(tiny.config, tiny.weights);
  auto batch = random_batch(tiny.config.vocab_size, {10}, 6);
  batch.push_back(batch[0]);

  ProbeAccumulator sums(spec);
  sums.begin_batch();
  model.backward(batch, sums);
  sums.end_batch(2);
  runtime::WeightGradientCollector single;
  model.backward(std::span(batch.data(), 1), single);
  runtime::WeightGradientCollector whole;
  model.backward(batch, whole);

  for (const LinearSums& linear : sums.linears()) {
    const double one = squared_norm(single.gradients().at(linear.name));
    ASSERT_GT(one, 0.0) << linear.name;
    EXPECT_NEAR(linear.fisher_sum / 2.0, one, 1e-4 * one) << linear.name;
    EXPECT_NEAR(squared_norm(whole.gradients().at(linear.name)) / 2.0, 2.0 * one, 1e-3 * one)
        << linear.name;
  }
}

// q/k/v share one Hessian (the attention input), gate/up another; each equals X^T X of the rows
// the Linears read, and there is one per distinct input only.
TEST(ProbeAccumulator, SiblingsShareOneHessian) {
  TinyModel tiny =
      runtime::synthetic::make_tiny_model(runtime::synthetic::tiny_config("Qwen3ForCausalLM"), 11);
  const model::ModelSpec spec = spec_of(tiny);
  runtime::Model model(tiny.config, tiny.weights);
  const auto batch = random_batch(tiny.config.vocab_size, {8, 12}, 9);

  ProbeAccumulator sums(spec);
  InputRecorder recorder;
  Tee tee(sums, recorder);
  sums.begin_batch();
  model.backward(batch, tee);
  sums.end_batch(2);

  // Per layer: qkv, o_proj, gate_up, down_proj.
  EXPECT_EQ(sums.inputs().size(), 4u * tiny.config.num_hidden_layers);
  const auto* q = spec.find_linear("model.layers.1.self_attn.q_proj");
  const auto* k = spec.find_linear("model.layers.1.self_attn.k_proj");
  const auto* gate = spec.find_linear("model.layers.1.mlp.gate_proj");
  const auto* up = spec.find_linear("model.layers.1.mlp.up_proj");
  const auto* down = spec.find_linear("model.layers.1.mlp.down_proj");
  ASSERT_TRUE(q && k && gate && up && down);
  EXPECT_EQ(input_key(*q), "model.layers.1.self_attn.qkv_proj");
  EXPECT_EQ(input_key(*q), input_key(*k));
  EXPECT_EQ(input_key(*gate), input_key(*up));
  EXPECT_EQ(input_key(*down), down->name);
  EXPECT_EQ(recorder.inputs.at(q->name), recorder.inputs.at(k->name));

  for (const model::Linear* linear : {q, gate, down}) {
    const InputSums& input = sums.input(input_key(*linear));
    const std::vector<float>& x = recorder.inputs.at(linear->name);
    const std::int64_t in = linear->in_features;
    const std::int64_t rows = static_cast<std::int64_t>(x.size()) / in;
    EXPECT_EQ(input.tokens, rows);
    for (std::int64_t a = 0; a < in; ++a) {
      for (std::int64_t b = 0; b < in; ++b) {
        double expected = 0.0;
        for (std::int64_t r = 0; r < rows; ++r) {
          expected += static_cast<double>(x[r * in + a]) * x[r * in + b];
        }
        ASSERT_NEAR(input.hessian[a * in + b], expected, 1e-4 * (1.0 + std::abs(expected)))
            << linear->name << " H[" << a << "," << b << "]";
      }
    }
  }
}

// A MoE expert's statistics count only the tokens routed to it: its token count equals the
// router's count for it, its Hessian is built from exactly those rows, and route counts and mean
// probabilities come from the routing decisions.
TEST(ProbeAccumulator, MoeExpertsCountOnlyRoutedTokens) {
  TinyModel tiny = runtime::synthetic::make_tiny_model(
      runtime::synthetic::tiny_config("Qwen3MoeForCausalLM"), 13);
  const model::ModelSpec spec = spec_of(tiny);
  runtime::Model model(tiny.config, tiny.weights);
  const auto batch = random_batch(tiny.config.vocab_size, {10, 7, 9}, 4);
  const std::int64_t tokens = 26;

  ProbeAccumulator sums(spec);
  InputRecorder recorder;
  Tee tee(sums, recorder);
  sums.begin_batch();
  model.backward(batch, tee);
  sums.end_batch(3);

  ASSERT_EQ(sums.routing().size(), static_cast<std::size_t>(tiny.config.num_hidden_layers));
  for (const auto& [layer, routing] : sums.routing()) {
    EXPECT_EQ(routing.tokens, tokens);
    std::int64_t routed = 0;
    double probability = 0.0;
    for (std::size_t e = 0; e < routing.route_counts.size(); ++e) {
      routed += routing.route_counts[e];
      probability += routing.probability_sums[e];
      const std::string prefix = fmt::format("model.layers.{}.mlp.experts.{}.", layer, e);
      const auto& linears = sums.linears();
      for (const LinearSums& linear : linears) {
        if (!linear.name.starts_with(prefix)) continue;
        EXPECT_EQ(linear.tokens, routing.route_counts[e]) << linear.name;
        EXPECT_EQ(sums.input(linear.input_key).tokens, routing.route_counts[e]) << linear.name;
        const auto recorded = recorder.inputs.find(linear.name);
        const std::int64_t rows =
            recorded == recorder.inputs.end()
                ? 0
                : static_cast<std::int64_t>(recorded->second.size()) / linear.in_features;
        EXPECT_EQ(rows, routing.route_counts[e]) << linear.name;
      }
    }
    EXPECT_EQ(routed, tokens * tiny.config.num_experts_per_tok);
    EXPECT_NEAR(probability, static_cast<double>(tokens), 1e-3);  // softmax rows sum to 1
  }
  // Experts' gate/up share their routed rows' Hessian; down_proj has its own.
  const auto* gate = spec.find_linear("model.layers.0.mlp.experts.2.gate_proj");
  const auto* down = spec.find_linear("model.layers.0.mlp.experts.2.down_proj");
  ASSERT_TRUE(gate && down);
  EXPECT_EQ(input_key(*gate), "model.layers.0.mlp.experts.2.gate_up_proj");
  EXPECT_NE(input_key(*gate), input_key(*down));
  const InputSums& input = sums.input(input_key(*gate));
  const std::vector<float>& x = recorder.inputs.at(gate->name);
  double trace = 0.0, expected = 0.0;
  for (std::int64_t j = 0; j < gate->in_features; ++j) {
    trace += input.hessian[j * gate->in_features + j];
  }
  for (const float v : x) expected += static_cast<double>(v) * v;
  EXPECT_NEAR(trace, expected, 1e-4 * expected);
}

// With record_holdout(s), each input's holdout Hessian is X^T X over the rows of sequences s and
// later alone (the full Hessian keeps every row), the held-out rows of a MoE expert are those of
// the held-out sequences routed to it, and save/load keeps both.
TEST(ProbeAccumulator, HoldoutHessianSumsOnlyTheHeldOutSequences) {
  TinyModel tiny =
      runtime::synthetic::make_tiny_model(runtime::synthetic::tiny_config("Qwen3ForCausalLM"), 11);
  const model::ModelSpec spec = spec_of(tiny);
  runtime::Model model(tiny.config, tiny.weights);
  const auto batch = random_batch(tiny.config.vocab_size, {8, 5, 12}, 9);

  ProbeAccumulator plain(spec);
  plain.begin_batch();
  model.backward(batch, plain);
  plain.end_batch(3);
  ProbeAccumulator sums(spec);
  sums.record_holdout(1);
  InputRecorder recorder;
  Tee tee(sums, recorder);
  sums.begin_batch();
  model.backward(batch, tee);
  sums.end_batch(3);

  ASSERT_EQ(sums.inputs().size(), plain.inputs().size());
  for (std::size_t i = 0; i < sums.inputs().size(); ++i) {
    EXPECT_EQ(sums.inputs()[i].hessian, plain.inputs()[i].hessian) << sums.inputs()[i].key;
    EXPECT_EQ(sums.inputs()[i].holdout_tokens, 5 + 12) << sums.inputs()[i].key;
    EXPECT_TRUE(plain.inputs()[i].holdout_hessian.empty());
  }
  // Rows of sequences 1 and 2: rows 8 to 24 of every dense Linear's input.
  const auto* q = spec.find_linear("model.layers.1.self_attn.q_proj");
  const auto* down = spec.find_linear("model.layers.0.mlp.down_proj");
  ASSERT_TRUE(q && down);
  for (const model::Linear* linear : {q, down}) {
    const InputSums& input = sums.input(input_key(*linear));
    const std::vector<float>& x = recorder.inputs.at(linear->name);
    const std::int64_t in = linear->in_features;
    ASSERT_EQ(static_cast<std::int64_t>(x.size()), 25 * in);
    for (std::int64_t a = 0; a < in; ++a) {
      for (std::int64_t b = 0; b < in; ++b) {
        double expected = 0.0;
        for (std::int64_t r = 8; r < 25; ++r) {
          expected += static_cast<double>(x[r * in + a]) * x[r * in + b];
        }
        ASSERT_NEAR(input.holdout_hessian[a * in + b], expected, 1e-4 * (1.0 + std::abs(expected)))
            << linear->name << " H[" << a << "," << b << "]";
      }
    }
  }

  test::TempDir dir;
  const auto path = dir / "part.safetensors";
  {
    io::SafetensorsWriter writer(path);
    sums.save(writer);
    writer.commit();
  }
  ProbeAccumulator loaded(spec);
  loaded.record_holdout(1);
  loaded.load(io::SafetensorsFile(path));
  for (std::size_t i = 0; i < sums.inputs().size(); ++i) {
    EXPECT_EQ(loaded.inputs()[i].holdout_hessian, sums.inputs()[i].holdout_hessian);
    EXPECT_EQ(loaded.inputs()[i].holdout_tokens, sums.inputs()[i].holdout_tokens);
  }
  // A checkpoint without held-out sums is no checkpoint of a probe with them.
  const auto plain_path = dir / "plain.safetensors";
  {
    io::SafetensorsWriter writer(plain_path);
    plain.save(writer);
    writer.commit();
  }
  EXPECT_THROW(loaded.load(io::SafetensorsFile(plain_path)), Error);
}

TEST(ProbeAccumulator, HoldoutRowsOfMoeExpertsAreTheirRoutedHeldOutTokens) {
  TinyModel tiny = runtime::synthetic::make_tiny_model(
      runtime::synthetic::tiny_config("Qwen3MoeForCausalLM"), 13);
  const model::ModelSpec spec = spec_of(tiny);
  runtime::Model model(tiny.config, tiny.weights);
  const auto batch = random_batch(tiny.config.vocab_size, {10, 7, 9}, 4);
  ProbeAccumulator sums(spec);
  sums.record_holdout(2);
  sums.begin_batch();
  model.backward(batch, sums);
  sums.end_batch(3);
  for (std::int64_t layer = 0; layer < tiny.config.num_hidden_layers; ++layer) {
    std::int64_t held = 0;
    for (std::int64_t e = 0; e < tiny.config.num_experts; ++e) {
      const InputSums& input =
          sums.input(fmt::format("model.layers.{}.mlp.experts.{}.gate_up_proj", layer, e));
      EXPECT_LE(input.holdout_tokens, input.tokens);
      held += input.holdout_tokens;
    }
    // Every token of sequence 2 goes to top_k experts.
    EXPECT_EQ(held, 9 * tiny.config.num_experts_per_tok) << "layer " << layer;
  }
}

// A part file read back by a resumed probe names its MoE layers in tensor names
// ("routing_header.3"); a name whose suffix is no layer number once escaped as
// std::invalid_argument from std::stoll instead of a pq::Error.
TEST(ProbeAccumulator, LoadRefusesARoutingTensorWithoutALayerNumber) {
  TinyModel tiny =
      runtime::synthetic::make_tiny_model(runtime::synthetic::tiny_config("LlamaForCausalLM"), 13);
  const model::ModelSpec spec = spec_of(tiny);
  test::TempDir dir;
  const std::vector<std::int64_t> header = {2, 10};
  const auto header_bytes = std::span(reinterpret_cast<const std::uint8_t*>(header.data()), 16);
  for (const std::string suffix : {"x", "3x", "-1", "99999999999999999999", ""}) {
    const auto path = dir / "part.safetensors";
    {
      io::SafetensorsWriter writer(path);
      ProbeAccumulator(spec).save(writer);
      writer.add("routing_header." + suffix, io::DType::I64, std::vector<std::int64_t>{2},
                 header_bytes);
      writer.commit();
    }
    ProbeAccumulator sums(spec);
    EXPECT_THAT([&] { sums.load(io::SafetensorsFile(path)); },
                ::testing::ThrowsMessage<Error>(::testing::HasSubstr("does not name a layer")))
        << suffix;
  }
}

}  // namespace
}  // namespace pq::probe
