// Layer-major passes: micro-batches and the public building blocks compute what one whole-batch
// pass computes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "runtime/model.h"
#include "runtime/tiny_models.h"

namespace pq::runtime {
namespace {

std::vector<Sequence> ragged_batch(std::int64_t vocab) {
  std::vector<Sequence> batch(5);
  const int lengths[] = {7, 12, 3, 9, 12};
  for (int s = 0; s < 5; ++s) {
    for (int t = 0; t < lengths[s]; ++t) {
      batch[s].tokens.push_back(static_cast<std::int32_t>((t * 13 + s * 7 + 1) % vocab));
    }
  }
  batch[1].loss_weights.assign(11, 0.5f);
  return batch;
}

std::vector<float> all_logits(Model& model, std::span<const Sequence> batch) {
  std::vector<float> out;
  model.forward(batch, [&](std::int64_t, const float* logits, std::int64_t rows) {
    out.insert(out.end(), logits, logits + rows * model.config().vocab_size);
  });
  return out;
}

double max_relative_difference(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double scale = 0.0, diff = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    scale = std::max(scale, std::abs(static_cast<double>(a[i])));
    diff = std::max(diff, std::abs(static_cast<double>(a[i]) - b[i]));
  }
  return diff / scale;
}

class LayerMajor : public ::testing::TestWithParam<std::string> {};

// Logits, loss and every weight gradient are the same (to float rounding of GEMMs over fewer
// rows) whether the batch goes through each layer at once or in micro-batches of whole
// sequences, including a micro-batch smaller than one sequence (it then holds that sequence
// alone).
TEST_P(LayerMajor, MicroBatchesComputeTheWholeBatch) {
  const auto tiny = synthetic::make_tiny_model(synthetic::tiny_config(GetParam()), 11);
  const std::vector<Sequence> batch = ragged_batch(tiny.config.vocab_size);
  Model whole(tiny.config, tiny.weights, {.micro_batch_rows = 1 << 20});
  for (const std::int64_t rows : {1, 12, 20}) {
    Model micro(tiny.config, tiny.weights, {.micro_batch_rows = rows});
    EXPECT_LT(max_relative_difference(all_logits(whole, batch), all_logits(micro, batch)), 1e-5)
        << rows;
    EXPECT_NEAR(whole.loss(batch), micro.loss(batch), 1e-5 * std::abs(whole.loss(batch)));
    WeightGradientCollector g_whole, g_micro;
    const double l_whole = whole.backward(batch, g_whole);
    const double l_micro = micro.backward(batch, g_micro);
    EXPECT_NEAR(l_whole, l_micro, 1e-5 * std::abs(l_whole));
    ASSERT_EQ(g_whole.gradients().size(), g_micro.gradients().size());
    for (const auto& [name, gradient] : g_whole.gradients()) {
      EXPECT_LT(max_relative_difference(gradient, g_micro.gradients().at(name)), 1e-4)
          << name << " with micro-batches of " << rows << " rows";
    }
  }
}

// The building blocks driven by hand (as the probe drives them, boundaries kept by the caller)
// give backward()'s loss and gradients exactly, and a loss weighting computed from the logits
// equals the same weights given up front.
TEST_P(LayerMajor, BuildingBlocksEqualBackward) {
  const auto tiny = synthetic::make_tiny_model(synthetic::tiny_config(GetParam()), 3);
  std::vector<Sequence> batch = ragged_batch(tiny.config.vocab_size);
  const auto weights_of = [](std::int64_t sequence, std::int64_t rows) {
    std::vector<float> w(rows - 1);
    for (std::int64_t t = 0; t + 1 < rows; ++t) w[t] = 0.25f + 0.5f * ((t + sequence) % 4);
    return w;
  };
  for (std::size_t s = 0; s < batch.size(); ++s) {
    batch[s].loss_weights = weights_of(s, static_cast<std::int64_t>(batch[s].tokens.size()));
  }
  Model model(tiny.config, tiny.weights, {.micro_batch_rows = 16});
  WeightGradientCollector expected;
  const double expected_loss = model.backward(batch, expected);

  std::vector<Sequence> unweighted = batch;
  for (Sequence& s : unweighted) s.loss_weights.clear();
  const auto pass = model.begin_pass(unweighted);
  const std::int64_t n = Model::rows(*pass) * tiny.config.hidden_size;
  const std::int64_t layers = tiny.config.num_hidden_layers;
  std::vector<std::vector<float>> x(layers + 1, std::vector<float>(n));
  model.embed(*pass, x[0].data());
  for (std::int64_t l = 0; l < layers; ++l) {
    model.forward_layer(l, *pass, x[l].data(), x[l + 1].data(), nullptr);
  }
  WeightGradientCollector actual;
  std::vector<float> dx(n);
  const double loss =
      model.head_backward(*pass, x[layers].data(), dx.data(), &actual,
                          [&](std::int64_t sequence, const float*, std::int64_t rows) {
                            return weights_of(sequence, rows);
                          });
  for (std::int64_t l = layers - 1; l >= 0; --l) {
    model.backward_layer(l, *pass, x[l].data(), dx.data(), actual);
  }
  EXPECT_EQ(loss, expected_loss);
  ASSERT_EQ(actual.gradients().size(), expected.gradients().size());
  for (const auto& [name, gradient] : expected.gradients()) {
    EXPECT_EQ(gradient, actual.gradients().at(name)) << name;
  }
}

INSTANTIATE_TEST_SUITE_P(Architectures, LayerMajor,
                         ::testing::Values("LlamaForCausalLM", "Qwen3ForCausalLM",
                                           "Qwen3MoeForCausalLM"));

}  // namespace
}  // namespace pq::runtime
