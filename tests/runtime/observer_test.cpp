#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>

#include "runtime/model.h"
#include "runtime/tiny_models.h"

namespace pq::runtime {
namespace {

// Keeps a copy of everything reported, per Linear, and the routing counts.
class RecordingObserver final : public LinearObserver {
 public:
  struct Record {
    std::int64_t rows = 0, in = 0, out = 0;
    std::vector<float> input, output_grad;
    std::vector<RowRange> ranges;
  };
  void on_linear(const LinearActivity& a) override {
    Record& r = records[std::string(a.name)];
    EXPECT_EQ(r.rows, 0) << a.name << " reported twice in one pass";
    r.rows = a.rows;
    r.in = a.in_features;
    r.out = a.out_features;
    r.input.assign(a.input, a.input + a.rows * a.in_features);
    if (a.output_grad != nullptr) {
      r.output_grad.assign(a.output_grad, a.output_grad + a.rows * a.out_features);
    }
    r.ranges.assign(a.sequences.begin(), a.sequences.end());
  }
  void on_routing(const RoutingActivity& r) override {
    counts[r.layer].assign(r.expert_token_counts.begin(), r.expert_token_counts.end());
    tokens[r.layer] = r.tokens;
    top_k = r.top_k;
  }
  std::map<std::string, Record> records;
  std::map<std::int64_t, std::vector<std::int64_t>> counts;
  std::map<std::int64_t, std::int64_t> tokens;
  std::int64_t top_k = 0;
};

std::vector<Sequence> random_batch(std::int64_t vocab, std::vector<std::int64_t> lengths) {
  std::mt19937 rng(3);
  std::vector<Sequence> batch(lengths.size());
  for (std::size_t s = 0; s < lengths.size(); ++s) {
    for (std::int64_t t = 0; t < lengths[s]; ++t) {
      batch[s].tokens.push_back(static_cast<std::int32_t>(rng() % vocab));
    }
  }
  return batch;
}

// dY_s^T X_s over the rows of sequence s.
std::vector<double> sequence_gradient(const RecordingObserver::Record& r, std::int64_t sequence) {
  std::vector<double> g(r.out * r.in, 0.0);
  for (const RowRange& range : r.ranges) {
    if (range.sequence != sequence) continue;
    for (std::int64_t row = range.begin; row < range.end; ++row) {
      for (std::int64_t o = 0; o < r.out; ++o) {
        for (std::int64_t i = 0; i < r.in; ++i) {
          g[o * r.in + i] +=
              static_cast<double>(r.output_grad[row * r.out + o]) * r.input[row * r.in + i];
        }
      }
    }
  }
  return g;
}

class ObserverContract : public ::testing::TestWithParam<std::string> {};

// What the probe relies on: every Linear is reported once per pass with rows grouped by
// sequence; the backward reports the same inputs as a forward pass; MoE experts see exactly
// their routed rows; and the rows attributed to sequence s carry s's own gradient, i.e.
// dY_s^T X_s equals dL/dW of a batch holding only sequence s.
TEST_P(ObserverContract, RowsSequencesAndPerSequenceGradients) {
  synthetic::TinyModel tiny = synthetic::make_tiny_model(
      synthetic::tiny_config(GetParam(), {{"num_hidden_layers", 2}}), 42);
  const std::vector<Sequence> batch = random_batch(tiny.config.vocab_size, {7, 1, 5});
  const std::int64_t total_rows = 13;
  Model model(tiny.config, tiny.weights);

  RecordingObserver forward, backward;
  model.forward(
      batch, [](std::int64_t, const float*, std::int64_t) {}, &forward);
  model.backward(batch, backward);
  ASSERT_EQ(forward.records.size(), backward.records.size());
  for (const auto& [name, f] : forward.records) {
    SCOPED_TRACE(name);
    const auto& b = backward.records.at(name);
    EXPECT_EQ(f.input, b.input);
    EXPECT_TRUE(f.output_grad.empty());
    EXPECT_EQ(b.output_grad.size(), static_cast<std::size_t>(b.rows * b.out));
    // Ranges tile the rows in order, one block per sequence, sequences ascending.
    std::int64_t next = 0, last_sequence = -1;
    for (const RowRange& r : b.ranges) {
      EXPECT_EQ(r.begin, next);
      EXPECT_GT(r.end, r.begin);
      EXPECT_GT(r.sequence, last_sequence);
      next = r.end;
      last_sequence = r.sequence;
    }
    EXPECT_EQ(next, b.rows);
    if (name.find(".experts.") == std::string::npos) {
      EXPECT_EQ(b.rows, total_rows);
    }
  }
  for (const auto& [layer, counts] : backward.counts) {
    std::int64_t routed = 0;
    for (std::int64_t e = 0; e < static_cast<std::int64_t>(counts.size()); ++e) {
      const auto& r = backward.records.at("model.layers." + std::to_string(layer) +
                                          ".mlp.experts." + std::to_string(e) + ".down_proj");
      EXPECT_EQ(r.rows, counts[e]);
      routed += counts[e];
    }
    EXPECT_EQ(routed, backward.tokens.at(layer) * backward.top_k);
  }

  for (std::int64_t s = 0; s < static_cast<std::int64_t>(batch.size()); ++s) {
    WeightGradientCollector alone;
    model.backward({&batch[s], 1}, alone);
    for (const auto& [name, record] : backward.records) {
      const auto it = alone.gradients().find(name);
      const std::vector<double> from_batch = sequence_gradient(record, s);
      double max_abs = 0.0, max_diff = 0.0;
      for (std::size_t i = 0; i < from_batch.size(); ++i) {
        const double single = it == alone.gradients().end() ? 0.0 : it->second[i];
        max_abs = std::max(max_abs, std::abs(single));
        max_diff = std::max(max_diff, std::abs(single - from_batch[i]));
      }
      EXPECT_LE(max_diff, 1e-4 * std::max(max_abs, 1.0)) << name << " sequence " << s;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Architectures, ObserverContract,
                         ::testing::Values("LlamaForCausalLM", "Qwen3MoeForCausalLM"));

}  // namespace
}  // namespace pq::runtime
