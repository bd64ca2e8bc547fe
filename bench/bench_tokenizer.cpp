// Tokenizer throughput on wikitext-2-test.txt (../shared/data). Baseline: the Qwen3 pre-tokenizer
// regex alone over the same text, the floor any byte-level BPE encode pays; the encode figures
// are read relative to it (tokens/s and bytes/s counters).
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "common/file_util.h"
#include "tokenizer/regex.h"
#include "tokenizer/tokenizer.h"

namespace {

std::filesystem::path shared_dir() {
  if (const char* env = std::getenv("PQ_SHARED_DIR")) return env;
  return PQ_BENCH_SHARED_DIR;
}

const std::string& wikitext() {
  static const std::string text = pq::read_text_file(shared_dir() / "data/wikitext-2-test.txt");
  return text;
}

const pq::tokenizer::Tokenizer& tokenizer(const std::string& name) {
  static const auto qwen3 =
      pq::tokenizer::Tokenizer::load(shared_dir() / "tokenizers/qwen3/tokenizer.json");
  static const auto llama2 =
      pq::tokenizer::Tokenizer::load(shared_dir() / "tokenizers/llama2/tokenizer.json");
  return name == "qwen3" ? qwen3 : llama2;
}

void BM_BaselineQwen3RegexOnly(benchmark::State& state) {
  const auto pre_tokenizer = nlohmann::json::parse(
      pq::read_text_file(shared_dir() / "tokenizers/qwen3/tokenizer.json"))["pre_tokenizer"];
  const pq::tokenizer::Regex regex(
      pre_tokenizer["pretokenizers"][0]["pattern"]["Regex"].get<std::string>());
  std::size_t pieces = 0;
  for (auto _ : state) {
    const auto matches = regex.find_all(wikitext());
    pieces = matches.size();
    benchmark::DoNotOptimize(matches.data());
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * wikitext().size()));
  state.counters["pieces"] = static_cast<double>(pieces);
}
BENCHMARK(BM_BaselineQwen3RegexOnly)->Unit(benchmark::kMillisecond);

void BM_Encode(benchmark::State& state, const std::string& name) {
  const auto& tok = tokenizer(name);
  std::size_t tokens = 0;
  for (auto _ : state) {
    const auto ids = tok.encode(wikitext(), false);
    tokens = ids.size();
    benchmark::DoNotOptimize(ids.data());
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * wikitext().size()));
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(tokens * state.iterations()),
                                                  benchmark::Counter::kIsRate);
}
BENCHMARK_CAPTURE(BM_Encode, qwen3, std::string("qwen3"))->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Encode, llama2, std::string("llama2"))->Unit(benchmark::kMillisecond);

void BM_DecodeQwen3(benchmark::State& state) {
  const auto& tok = tokenizer("qwen3");
  const auto ids = tok.encode(wikitext(), false);
  for (auto _ : state) {
    const auto text = tok.decode(ids);
    benchmark::DoNotOptimize(text.data());
  }
  state.counters["tokens/s"] = benchmark::Counter(
      static_cast<double>(ids.size() * state.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_DecodeQwen3)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
