#include <gtest/gtest.h>

#include <cmath>

#include "runtime/model.h"
#include "runtime/tiny_models.h"

namespace pq::runtime {
namespace {

struct DecodeCase {
  std::string label;
  std::string architecture;
  nlohmann::json overrides;
};

class CachedDecoding : public ::testing::TestWithParam<DecodeCase> {};

// Model::extend with its key/value cache must give the logits of a full forward pass at every
// position, whatever the chunking: a 5-token prompt, single tokens, then a 3-token chunk.
TEST_P(CachedDecoding, MatchesFullForward) {
  const DecodeCase& dc = GetParam();
  synthetic::TinyModel tiny =
      synthetic::make_tiny_model(synthetic::tiny_config(dc.architecture, dc.overrides), 77, 0.3f);
  Model model(tiny.config, tiny.weights, {.keep_layers_resident = true});
  std::vector<std::int32_t> tokens;
  for (int t = 0; t < 12; ++t) tokens.push_back((t * 13 + 5) % 40);
  const std::vector<float> full = model.logits(tokens);
  const std::int64_t vocab = tiny.config.vocab_size;

  DecodeState state;
  std::vector<float> cached;
  const std::int64_t chunks[] = {5, 1, 1, 1, 1, 3};
  std::int64_t begin = 0;
  for (std::int64_t length : chunks) {
    const auto logits = model.extend(state, std::span(tokens).subspan(begin, length));
    ASSERT_EQ(static_cast<std::int64_t>(logits.size()), length * vocab);
    cached.insert(cached.end(), logits.begin(), logits.end());
    begin += length;
  }
  ASSERT_EQ(begin, 12);
  EXPECT_EQ(state.length, 12);
  double max_diff = 0.0, max_logit = 0.0;
  for (std::size_t i = 0; i < full.size(); ++i) {
    max_diff = std::max(max_diff, static_cast<double>(std::abs(full[i] - cached[i])));
    max_logit = std::max(max_logit, static_cast<double>(std::abs(full[i])));
  }
  EXPECT_LE(max_diff, 1e-5 * max_logit) << "max |logit| " << max_logit;
}

INSTANTIATE_TEST_SUITE_P(
    Architectures, CachedDecoding,
    ::testing::Values(DecodeCase{"llama", "LlamaForCausalLM", {}},
                      DecodeCase{"mistral_window", "MistralForCausalLM", {{"sliding_window", 4}}},
                      DecodeCase{"qwen2_bias", "Qwen2ForCausalLM", {}},
                      DecodeCase{"qwen3_yarn",
                                 "Qwen3ForCausalLM",
                                 {{"head_dim", 8},
                                  {"rope_scaling", {{"rope_type", "yarn"}, {"factor", 4.0}}}}},
                      DecodeCase{"qwen3_moe", "Qwen3MoeForCausalLM", {}}),
    [](const auto& info) { return info.param.label; });

}  // namespace
}  // namespace pq::runtime
