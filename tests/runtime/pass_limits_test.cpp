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
#include "io/safetensors.h"
#include "io/safetensors_writer.h"
#include "runtime/kernels/gemm.h"
#include "runtime/memory_estimate.h"
#include "runtime/model.h"
#include "runtime/tiny_models.h"
#include "runtime/weights.h"
#include "support/test_support.h"

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

// bf16 compute takes a BF16 checkpoint's weights as stored, without a float32 copy: the bits are
// those rounding the float32 decode gives (the default path, which F32 tensors take), and a
// non-finite value is refused naming the tensor, as the float32 decode refuses it.
TEST(PassLimits, Bf16WeightsAreTheStoredBitsAndNonFiniteOnesAreNamed) {
  PQ_REQUIRE_SHARED();
  const io::Checkpoint checkpoint =
      io::Checkpoint::open(test::shared_dir() / "models/qwen3-dense-tiny");
  const CheckpointWeightSource source(checkpoint);
  const std::string name = "model.layers.0.self_attn.q_proj.weight";
  ASSERT_EQ(checkpoint.info(name).dtype, io::DType::BF16);
  const std::vector<float> widened = source.load_f32(name);
  std::vector<std::uint16_t> rounded(widened.size());
  convert_f32_to_bf16(widened, rounded);
  EXPECT_EQ(source.load_bf16(name), rounded);

  test::TempDir dir;
  const std::vector<std::int64_t> shape = {2, 3};
  const std::vector<float> f32 = {1.0f, -2.5f, 0.125f, 3.0f, 1e30f, -7.0f};
  std::vector<std::uint16_t> bf16(f32.size());
  convert_f32_to_bf16(f32, bf16);
  std::vector<std::uint16_t> with_nan = bf16;
  with_nan[4] = 0x7fc0;  // quiet NaN
  {
    io::SafetensorsWriter writer(dir / "model.safetensors");
    const auto bytes = [](const std::vector<std::uint16_t>& v) {
      return std::span(reinterpret_cast<const std::uint8_t*>(v.data()), v.size() * 2);
    };
    writer.add("finite", io::DType::BF16, shape, bytes(bf16));
    writer.add("nan", io::DType::BF16, shape, bytes(with_nan));
    writer.add("f32", io::DType::F32, shape,
               std::span(reinterpret_cast<const std::uint8_t*>(f32.data()), f32.size() * 4));
    writer.commit();
  }
  const io::Checkpoint small = io::Checkpoint::open(dir.path());
  const CheckpointWeightSource weights(small);
  EXPECT_EQ(weights.load_bf16("finite"), bf16);
  EXPECT_EQ(weights.load_bf16("f32"), bf16);
  const std::string error = error_of([&] { weights.load_bf16("nan"); });
  EXPECT_NE(error.find("tensor nan holds a non-finite value (nan at element 4 of 6)"),
            std::string::npos)
      << error;
}

}  // namespace
}  // namespace pq::runtime
