// Cost of one scout measurement on ../shared/models/qwen3-dense-tiny: the held-out KL of a model
// against the reference logits kept from one earlier pass (scout::KlEvaluator, i.e.
// runtime::evaluate against runtime::ReferenceLogits), next to the baseline measured in the same
// run: the model's forward pass alone, the floor any KL measurement pays. The difference is the
// scoring (a double-precision log-softmax of both distributions per prediction).
//
// 4 held-out windows x 256 tokens of wikitext-2-test. Wall time (UseRealTime).
#include <benchmark/benchmark.h>

#include <filesystem>
#include <memory>

#include "data/token_dataset.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "runtime/model.h"
#include "runtime/weights.h"
#include "scout/kl_evaluator.h"
#include "tokenizer/tokenizer.h"

namespace {

namespace fs = std::filesystem;

struct Fixture {
  Fixture() {
    const fs::path shared = PQ_BENCH_SHARED_DIR;
    const fs::path model = shared / "models" / "qwen3-dense-tiny";
    config = pq::model::ModelConfig::load(model);
    checkpoint = std::make_unique<pq::io::Checkpoint>(pq::io::Checkpoint::open(model));
    source = std::make_unique<pq::runtime::CheckpointWeightSource>(*checkpoint);
    const auto tokenizer = pq::tokenizer::Tokenizer::load(model / "tokenizer.json");
    windows =
        pq::data::TokenDataset::from_text_file(shared / "data" / "wikitext-2-test.txt", tokenizer)
            .heldout(4, 256);
  }
  pq::model::ModelConfig config;
  std::unique_ptr<pq::io::Checkpoint> checkpoint;
  std::unique_ptr<pq::runtime::CheckpointWeightSource> source;
  std::vector<std::vector<std::int32_t>> windows;
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

void BM_ForwardOnly(benchmark::State& state) {
  Fixture& f = fixture();
  for (auto _ : state) {
    pq::runtime::Model model(f.config, *f.source);
    std::vector<pq::runtime::Sequence> batch;
    for (const auto& w : f.windows) batch.push_back({w, {}});
    float sink = 0.0f;
    model.forward(batch,
                  [&](std::int64_t, const float* logits, std::int64_t) { sink += logits[0]; });
    benchmark::DoNotOptimize(sink);
  }
}
BENCHMARK(BM_ForwardOnly)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_KlEvaluatorMeasure(benchmark::State& state) {
  Fixture& f = fixture();
  const pq::scout::KlEvaluator evaluator(f.config, *f.source, f.windows);
  for (auto _ : state) {
    benchmark::DoNotOptimize(evaluator.measure(nullptr, nullptr).kl);
  }
}
BENCHMARK(BM_KlEvaluatorMeasure)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
