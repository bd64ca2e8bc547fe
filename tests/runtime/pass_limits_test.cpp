// What a pass refuses instead of computing garbage or being killed (issue 13): more memory than
// its limit, and non-finite values, named by where they arise.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "common/error.h"
#include "runtime/memory_estimate.h"
#include "runtime/model.h"
#include "runtime/tiny_models.h"

namespace pq::runtime {
namespace {

std::string error_of(const std::function<void()>& body) {
  try {
    body();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

const std::vector<std::int32_t> kTokens = {1, 5, 9, 2, 7, 3, 8, 4};

TEST(PassLimits, PassOverItsMemoryLimitIsRefusedWithTheEstimate) {
  synthetic::TinyModel tiny =
      synthetic::make_tiny_model(synthetic::tiny_config("Qwen3ForCausalLM"), 3);
  const PassMemory estimate =
      estimate_pass_memory(tiny.config, static_cast<std::int64_t>(kTokens.size()), 4096, 1024,
                           /*boundaries=*/2, ComputeType::kF32);
  RuntimeOptions options;
  options.max_memory = estimate.peak() - 1;
  Model tight(tiny.config, tiny.weights, options);
  const std::string error = error_of([&] { tight.logits(kTokens); });
  EXPECT_NE(error.find("a pass over this batch needs about"), std::string::npos) << error;
  EXPECT_NE(error.find("the memory limit is"), std::string::npos) << error;

  options.max_memory = estimate.peak();
  Model enough(tiny.config, tiny.weights, options);
  EXPECT_EQ(enough.logits(kTokens).size(), kTokens.size() * tiny.config.vocab_size);
}

TEST(PassLimits, OverflowInsideALayerIsNamedByTheLayer) {
  synthetic::TinyModel tiny =
      synthetic::make_tiny_model(synthetic::tiny_config("Qwen3ForCausalLM"), 4);
  Model clean(tiny.config, tiny.weights);
  EXPECT_NO_THROW(clean.logits(kTokens));
  // Finite weights whose products overflow float32 in the last layer's MLP.
  const std::int64_t last = tiny.config.num_hidden_layers - 1;
  for (float& w : tiny.weights.mutable_values(
           fmt::format("model.layers.{}.post_attention_layernorm.weight", last))) {
    w = std::numeric_limits<float>::max();
  }
  Model overflowing(tiny.config, tiny.weights);
  const std::string error = error_of([&] { overflowing.logits(kTokens); });
  EXPECT_NE(error.find(fmt::format("decoder layer {} produced a non-finite output", last)),
            std::string::npos)
      << error;
}

}  // namespace
}  // namespace pq::runtime
