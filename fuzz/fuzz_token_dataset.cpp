// libFuzzer target: any byte string as a calibration or evaluation data file, read the three ways
// the stages read one (src/data/token_dataset.h): as plain text and as JSONL through
// TokenDataset::from_text_file with a small byte-fallback tokenizer, and as whitespace-separated
// token ids through TokenDataset::from_token_id_file. An accepted dataset must hold only ids below
// the vocabulary, split into calibration and held-out parts that cover it, and cut into windows
// inside those parts (checked here, abort otherwise).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "common/error.h"
#include "data/token_dataset.h"
#include "tokenizer/tokenizer.h"

namespace {

namespace fs = std::filesystem;

constexpr std::int32_t kIdVocabulary = 1000;

void write_file(const fs::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) std::abort();
}

struct Fixture {
  fs::path directory;
  fs::path data;
  pq::tokenizer::Tokenizer tokenizer;
};

// A SentencePiece-style BPE without merges: every character falls back to its UTF-8 bytes
// "<0xXX>" (tokenizers models/bpe byte_fallback), <s> is prepended by the post-processor and </s>
// appended by TokenDataset as tokenizer_config.json's eos_token.
pq::tokenizer::Tokenizer make_tokenizer(const fs::path& directory) {
  nlohmann::json tokenizer = nlohmann::json::parse(R"({
    "model": {"type": "BPE", "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2}, "merges": [],
              "byte_fallback": true, "unk_token": "<unk>"},
    "added_tokens": [{"id": 1, "content": "<s>", "special": true},
                     {"id": 2, "content": "</s>", "special": true}],
    "post_processor": {"type": "TemplateProcessing",
                       "single": [{"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "A"}}],
                       "special_tokens": {"<s>": {"id": "<s>", "ids": [1]}}}})");
  for (int byte = 0; byte < 256; ++byte) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", byte);
    tokenizer["model"]["vocab"][name] = 3 + byte;
  }
  write_file(directory / "tokenizer.json", tokenizer.dump());
  write_file(directory / "tokenizer_config.json", R"({"bos_token": "<s>", "eos_token": "</s>"})");
  return pq::tokenizer::Tokenizer::load(directory / "tokenizer.json");
}

Fixture& fixture() {
  static Fixture* instance = [] {
    char pattern[] = "/tmp/fuzz_token_dataset.XXXXXX";
    if (mkdtemp(pattern) == nullptr) std::abort();
    const fs::path directory(pattern);
    return new Fixture{directory, directory / "data", make_tokenizer(directory)};
  }();
  return *instance;
}

void check(const pq::data::TokenDataset& dataset, std::int32_t vocabulary) {
  const auto tokens = dataset.tokens();
  for (const std::int32_t id : tokens) {
    if (id < 0 || id >= vocabulary) std::abort();
  }
  const auto calibration = dataset.calibration_tokens();
  const auto heldout = dataset.heldout_tokens();
  if (calibration.size() + heldout.size() != tokens.size() ||
      heldout.size() > tokens.size() / 10 + 1) {
    std::abort();
  }
  for (const std::size_t length : {1, 3, 64}) {
    const std::size_t windows = calibration.size() / length;
    for (const auto& window : dataset.calibration(std::min<std::size_t>(windows, 4), length, 7)) {
      if (window.size() != length) std::abort();
    }
    for (const auto& window : dataset.heldout(heldout.size() / length, length)) {
      if (window.size() != length) std::abort();
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Fixture& f = fixture();
  write_file(f.data, std::string_view(reinterpret_cast<const char*>(data), size));
  for (const auto format : {pq::data::TextFormat::kPlainText, pq::data::TextFormat::kJsonl}) {
    try {
      check(pq::data::TokenDataset::from_text_file(f.data, f.tokenizer, format),
            f.tokenizer.vocab_size());
    } catch (const pq::Error&) {
      // Rejecting malformed input with a pq::Error is the expected outcome.
    }
  }
  try {
    check(pq::data::TokenDataset::from_token_id_file(f.data, kIdVocabulary), kIdVocabulary);
  } catch (const pq::Error&) {
    // As above.
  }
  return 0;
}
