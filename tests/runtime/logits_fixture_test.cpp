#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "io/safetensors.h"
#include "model/config.h"
#include "runtime/model.h"
#include "support/test_support.h"

namespace pq::runtime {
namespace {

nlohmann::json load_fixture(const std::string& file) {
  std::ifstream in(test::shared_dir() / "fixtures" / file);
  return nlohmann::json::parse(in);
}

// Records the smallest gap between the k-th and (k+1)-th router probability over all tokens
// and MoE layers: fp32 rounding can only flip a routing decision whose gap is that small.
class RoutingMarginObserver final : public LinearObserver {
 public:
  void on_linear(const LinearActivity&) override {}
  void on_routing(const RoutingActivity& r) override {
    for (std::int64_t t = 0; t < r.tokens; ++t) {
      std::vector<float> p(r.probabilities + t * r.num_experts,
                           r.probabilities + (t + 1) * r.num_experts);
      std::sort(p.begin(), p.end(), std::greater<>());
      min_gap = std::min(min_gap, p[r.top_k - 1] - p[r.top_k]);
      decisions.insert(decisions.end(), r.experts + t * r.top_k, r.experts + (t + 1) * r.top_k);
    }
  }
  float min_gap = 1.0f;
  std::vector<std::int32_t> decisions;
};

struct LogitsComparison {
  double max_abs_diff = 0.0;
  double max_abs_logit = 0.0;
};

LogitsComparison compare(const std::vector<float>& logits, const nlohmann::json& reference) {
  LogitsComparison c;
  const std::size_t vocab = reference[0].size();
  for (std::size_t t = 0; t < reference.size(); ++t) {
    for (std::size_t v = 0; v < vocab; ++v) {
      const double ref = reference[t][v].get<double>();
      c.max_abs_logit = std::max(c.max_abs_logit, std::abs(ref));
      c.max_abs_diff = std::max(c.max_abs_diff, std::abs(logits[t * vocab + v] - ref));
    }
  }
  return c;
}

struct FixtureCase {
  std::string model;
  nlohmann::json token_ids;
  nlohmann::json logits;
};

std::vector<FixtureCase> fixture_cases() {
  std::vector<FixtureCase> cases;
  const auto stories = load_fixture("stories260K-logits.json");
  for (const auto& [name, entry] : stories["models"].items()) {
    cases.push_back({name, entry["token_ids"], entry["logits"]});
  }
  for (const std::string name : {"qwen3-dense-tiny", "qwen3-moe-tiny"}) {
    const auto fixture = load_fixture(name + "-logits.json");
    cases.push_back({name, fixture["token_ids"], fixture["logits"]});
  }
  return cases;
}

TEST(LogitsFixture, Fp32MatchesFloat64ReferenceForEveryCheckpoint) {
  PQ_REQUIRE_SHARED();
  for (const FixtureCase& fc : fixture_cases()) {
    SCOPED_TRACE(fc.model);
    const auto dir = test::shared_dir() / "models" / fc.model;
    const auto checkpoint = io::Checkpoint::open(dir);
    const CheckpointWeightSource weights(checkpoint);
    Model model(model::ModelConfig::load(dir), weights);
    const auto tokens = fc.token_ids.get<std::vector<std::int32_t>>();
    RoutingMarginObserver routing;
    std::vector<float> logits;
    const Sequence sequence{tokens, {}};
    model.forward(
        {&sequence, 1},
        [&](std::int64_t, const float* z, std::int64_t rows) {
          logits.assign(z, z + rows * model.config().vocab_size);
        },
        &routing);
    const LogitsComparison c = compare(logits, fc.logits);
    std::printf("[%s] fp32: max|diff| %.3g, max|logit| %.3g, ratio %.3g", fc.model.c_str(),
                c.max_abs_diff, c.max_abs_logit, c.max_abs_diff / c.max_abs_logit);
    if (!routing.decisions.empty()) std::printf(", min top-k router gap %.3g", routing.min_gap);
    std::printf("\n");
    EXPECT_LE(c.max_abs_diff, 1e-3 * c.max_abs_logit);
  }
}

}  // namespace
}  // namespace pq::runtime
