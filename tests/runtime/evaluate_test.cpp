#include "runtime/evaluate.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <set>

#include "common/error.h"
#include "io/safetensors.h"
#include "runtime/tiny_models.h"
#include "support/test_support.h"

namespace pq::runtime {
namespace {

class FixtureModels : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    PQ_REQUIRE_SHARED();
    std::ifstream in(test::shared_dir() / "fixtures" / (GetParam() + "-logits.json"));
    fixture_ = nlohmann::json::parse(in);
    dir_ = test::shared_dir() / "models" / GetParam();
    checkpoint_ = std::make_unique<io::Checkpoint>(io::Checkpoint::open(dir_));
    weights_ = std::make_unique<CheckpointWeightSource>(*checkpoint_);
  }
  Model make_model(ComputeType compute = ComputeType::kF32) {
    return Model(model::ModelConfig::load(dir_), *weights_,
                 {.compute = compute, .keep_layers_resident = true});
  }

  nlohmann::json fixture_;
  std::filesystem::path dir_;
  std::unique_ptr<io::Checkpoint> checkpoint_;
  std::unique_ptr<CheckpointWeightSource> weights_;
};

TEST_P(FixtureModels, GreedyGenerationReproducesFixture) {
  Model model = make_model();
  const auto prompt = fixture_["greedy_prompt"].get<std::vector<std::int32_t>>();
  const auto expected = fixture_["greedy_ids"].get<std::vector<std::int32_t>>();
  EXPECT_EQ(greedy_generate(model, prompt, static_cast<std::int64_t>(expected.size())), expected);
}

// 8 windows of 128 ids, each scored on its 127 next-token predictions (fixture description).
TEST_P(FixtureModels, PerplexityReproducesFixture) {
  Model model = make_model();
  const auto ids = fixture_["ppl_token_ids"].get<std::vector<std::int32_t>>();
  const auto windows = token_windows(ids, 128, 8);
  const EvalResult r = evaluate(model, windows);
  EXPECT_EQ(r.windows, 8);
  EXPECT_EQ(r.predictions, 8 * 127);
  const double expected = fixture_["perplexity"].get<double>();
  std::printf("[%s] perplexity %.6f, fixture %.6f, relative diff %.2g\n", GetParam().c_str(),
              r.perplexity(), expected, std::abs(r.perplexity() / expected - 1.0));
  EXPECT_NEAR(r.perplexity() / expected, 1.0, 1e-3);
}

// KL(reference || model) is zero against itself and small but positive for bf16 compute.
TEST_P(FixtureModels, KlAgainstReference) {
  Model fp32 = make_model();
  Model same = make_model();
  Model bf16 = make_model(ComputeType::kBF16);
  const auto ids = fixture_["ppl_token_ids"].get<std::vector<std::int32_t>>();
  const auto windows = token_windows(ids, 64, 2);
  const EvalResult self = evaluate(same, windows, &fp32);
  EXPECT_NEAR(self.mean_kl(), 0.0, 1e-9);
  EXPECT_EQ(self.top1_agreements, self.predictions);
  const EvalResult rounded = evaluate(bf16, windows, &fp32, 1);
  std::printf("[%s] bf16 vs fp32: mean KL %.3g nats, top-1 agreement %.4f\n", GetParam().c_str(),
              rounded.mean_kl(), rounded.top1_agreement());
  EXPECT_GT(rounded.mean_kl(), 0.0);
  EXPECT_LT(rounded.mean_kl(), 1e-2);
  EXPECT_GT(rounded.top1_agreement(), 0.9);
  // Scoring against a reference leaves the model's own scores alone. (Compared at the same windows
  // per pass: bf16 results depend on the GEMMs' row counts, by as much as bf16 rounding moves
  // the logits, on CPUs without native bf16 where oneDNN and OpenBLAS split sums differently.)
  EXPECT_EQ(rounded.nll_sum, evaluate(bf16, windows, nullptr, 1).nll_sum);
}

// Cached reference logits give exactly what running the reference alongside gives, for every
// candidate compared with them.
TEST_P(FixtureModels, CachedReferenceLogitsMatchStreamingReference) {
  Model fp32 = make_model();
  Model bf16 = make_model(ComputeType::kBF16);
  const auto ids = fixture_["ppl_token_ids"].get<std::vector<std::int32_t>>();
  const auto windows = token_windows(ids, 48, 3);
  const ReferenceLogits cached(fp32, ReferenceLogits::Keep::kLogits, windows, 2);
  EXPECT_EQ(cached.self().nll_sum, evaluate(fp32, windows, nullptr, 2).nll_sum);
  for (int repeat = 0; repeat < 2; ++repeat) {
    const EvalResult streamed = evaluate(bf16, windows, &fp32, 2);
    const EvalResult reused = evaluate(bf16, cached);
    EXPECT_GT(reused.kl_sum, 0.0);
    EXPECT_EQ(reused.kl_sum, streamed.kl_sum);
    EXPECT_EQ(reused.nll_sum, streamed.nll_sum);
    EXPECT_EQ(reused.top1_agreements, streamed.top1_agreements);
    EXPECT_EQ(reused.predictions, streamed.predictions);
    EXPECT_EQ(reused.windows, 3);
  }
}

// Reference logits recomputed from the reference's final hidden states and its shared lm_head are
// the forward pass's logits bit for bit: for f32 and bf16 references, and when a pass's lm_head
// runs in several blocks (logits_block_rows below a window).
TEST_P(FixtureModels, BoundedReferenceLogitsMatchStreamingReference) {
  const auto ids = fixture_["ppl_token_ids"].get<std::vector<std::int32_t>>();
  const auto windows = token_windows(ids, 48, 3);
  const model::ModelConfig config = model::ModelConfig::load(dir_);
  for (const ComputeType compute : {ComputeType::kF32, ComputeType::kBF16}) {
    for (const std::int64_t block_rows : {1024, 40}) {
      Model reference(
          config, *weights_,
          {.compute = compute, .keep_layers_resident = true, .logits_block_rows = block_rows});
      Model candidate =
          make_model(compute == ComputeType::kF32 ? ComputeType::kBF16 : ComputeType::kF32);
      const ReferenceLogits bounded(reference, ReferenceLogits::Keep::kHeadInputs, windows, 2);
      const ReferenceLogits kept(reference, ReferenceLogits::Keep::kLogits, windows, 2);
      EXPECT_EQ(bounded.self().nll_sum, kept.self().nll_sum);
      const EvalResult streamed = evaluate(candidate, windows, &reference, 2);
      for (const ReferenceLogits* cached : {&bounded, &kept}) {
        const EvalResult reused = evaluate(candidate, *cached);
        EXPECT_GT(reused.kl_sum, 0.0);
        EXPECT_EQ(reused.kl_sum, streamed.kl_sum);
        EXPECT_EQ(reused.nll_sum, streamed.nll_sum);
        EXPECT_EQ(reused.top1_agreements, streamed.top1_agreements);
        EXPECT_EQ(reused.predictions, streamed.predictions);
      }
      const std::uint64_t head_value_bytes = compute == ComputeType::kF32 ? 4 : 2;
      EXPECT_EQ(bounded.bytes(), (3u * 48u * sizeof(float) + config.vocab_size * head_value_bytes) *
                                     config.hidden_size);
      EXPECT_EQ(kept.bytes(), 3u * 48u * config.vocab_size * sizeof(float));
    }
  }
}

// A pass with a ForwardCheckpoint that dies after two layers resumes at the third and gives the
// uninterrupted pass's logits bit for bit; once every layer is done a rerun runs only the head;
// a checkpoint of another fingerprint is cleared and the pass starts over.
TEST_P(FixtureModels, ResumedPassEqualsUninterruptedPass) {
  const auto ids = fixture_["ppl_token_ids"].get<std::vector<std::int32_t>>();
  const auto windows = token_windows(ids, 48, 3);
  std::vector<Sequence> batch;
  for (const auto& window : windows) batch.push_back({window, {}});
  Model model = make_model();
  const auto logits_of = [&](LinearObserver* observer, const ForwardCheckpoint* resume) {
    std::vector<float> all;
    model.forward(
        batch,
        [&](std::int64_t, const float* z, std::int64_t rows) {
          all.insert(all.end(), z, z + rows * model.config().vocab_size);
        },
        observer, 2, resume);
    return all;
  };
  // The layers an observer saw (-1: the head); throws on seeing `die_at`.
  struct LayerLog final : LinearObserver {
    std::int64_t die_at = -2;
    std::set<std::int64_t> layers;
    void on_linear(const LinearActivity& activity) override {
      if (activity.layer == die_at) throw Error("killed");
      layers.insert(activity.layer);
    }
  };
  const std::vector<float> expected = logits_of(nullptr, nullptr);
  const test::TempDir dir;
  const ForwardCheckpoint resume(dir.path() / "pass", "fingerprint");
  LayerLog dying;
  dying.die_at = 2;
  EXPECT_THROW(logits_of(&dying, &resume), Error);
  EXPECT_TRUE(std::filesystem::exists(dir.path() / "pass" / "x.2.f32"));

  LayerLog resumed;
  EXPECT_EQ(logits_of(&resumed, &resume), expected);
  const std::int64_t layers = model.config().num_hidden_layers;
  EXPECT_EQ(*resumed.layers.begin(), -1);
  EXPECT_EQ(*std::next(resumed.layers.begin()), 2);
  EXPECT_EQ(*resumed.layers.rbegin(), layers - 1);
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir.path() / "pass"),
                          std::filesystem::directory_iterator()),
            2);  // state.json and the last layer's output

  LayerLog head_only;
  EXPECT_EQ(logits_of(&head_only, &resume), expected);
  EXPECT_EQ(head_only.layers, std::set<std::int64_t>{-1});

  const ForwardCheckpoint foreign(dir.path() / "pass", "another fingerprint");
  LayerLog again;
  EXPECT_EQ(logits_of(&again, &foreign), expected);
  EXPECT_EQ(again.layers.size(), static_cast<std::size_t>(layers + 1));
}

INSTANTIATE_TEST_SUITE_P(Qwen3, FixtureModels,
                         ::testing::Values("qwen3-dense-tiny", "qwen3-moe-tiny"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

// A tokenizer.json can make a short prompt into 100,000 tokens (a TemplateProcessing with that many
// ids); generation refuses to run past max_position_embeddings instead of spending minutes on one
// quadratic attention pass.
TEST(GreedyGeneration, RefusesToRunPastTheContext) {
  synthetic::TinyModel tiny = synthetic::make_tiny_model(
      synthetic::tiny_config("LlamaForCausalLM", {{"max_position_embeddings", 16}}), 5);
  Model model(tiny.config, tiny.weights, {.keep_layers_resident = true});
  const std::vector<std::int32_t> prompt(12, 3);
  EXPECT_EQ(greedy_generate(model, prompt, 4).size(), 4u);
  try {
    greedy_generate(model, prompt, 5);
    ADD_FAILURE() << "generated past the context";
  } catch (const Error& error) {
    EXPECT_STREQ(error.what(),
                 "a prompt of 12 tokens and 5 new tokens exceed the model's context "
                 "(max_position_embeddings 16)");
  }
}

TEST(TokenWindows, DropsPartialTailAndHonoursLimit) {
  const std::vector<std::int32_t> ids = {1, 2, 3, 4, 5, 6, 7};
  EXPECT_EQ(token_windows(ids, 3, 0),
            (std::vector<std::vector<std::int32_t>>{{1, 2, 3}, {4, 5, 6}}));
  EXPECT_EQ(token_windows(ids, 3, 1).size(), 1u);
  EXPECT_THROW(token_windows(ids, 8, 0), Error);
  EXPECT_THROW(token_windows(ids, 1, 0), Error);
}

}  // namespace
}  // namespace pq::runtime
