#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace pq::data {

// How read_documents interprets a file. kAuto: ".jsonl" files are JSONL, anything else is plain
// text.
enum class TextFormat { kAuto, kPlainText, kJsonl };

// The documents of a text file (docs/calibration-data.md):
//   - plain text: the whole file is one document, CRLF line ends read as LF (as Python's text
//     mode reads files, which is how the reference perplexities were made);
//   - JSONL: one JSON object per non-blank line, either {"text": "..."} or a chat
//     {"messages": [{"role": "...", "content": "..."}, ...]} rendered as one "role: content\n"
//     line per message.
// Errors name the file and, for JSONL, the line.
std::vector<std::string> read_documents(const std::filesystem::path& path, TextFormat format);

// A token stream with a calibration split and a held-out split that never overlap: the last
// `heldout_fraction` of the stream (rounded down to whole tokens) is held out, everything before
// it is calibration data.
class TokenDataset {
 public:
  static constexpr double kDefaultHeldoutFraction = 0.1;

  // Tokenizes each document with add_special_tokens=true (e.g. Llama-2's BOS) and appends the
  // tokenizer's EOS after it when there is one; documents are concatenated in file order.
  static TokenDataset from_text_file(const std::filesystem::path& path,
                                     const tokenizer::Tokenizer& tokenizer,
                                     TextFormat format = TextFormat::kAuto,
                                     double heldout_fraction = kDefaultHeldoutFraction);
  // Reads whitespace-separated decimal token ids. With vocab_size, ids must be below it.
  static TokenDataset from_token_id_file(const std::filesystem::path& path,
                                         std::optional<std::int32_t> vocab_size = std::nullopt,
                                         double heldout_fraction = kDefaultHeldoutFraction);
  static TokenDataset from_tokens(std::vector<std::int32_t> tokens,
                                  double heldout_fraction = kDefaultHeldoutFraction);

  std::span<const std::int32_t> tokens() const { return tokens_; }
  std::span<const std::int32_t> calibration_tokens() const;
  std::span<const std::int32_t> heldout_tokens() const;

  // `count` sequences of `length` tokens from the calibration split: the split is cut into
  // consecutive non-overlapping windows of `length` tokens, and `count` distinct windows are
  // drawn by a partial Fisher-Yates shuffle driven by SplitMix64(seed). Identical on every
  // machine for the same data and seed. Throws pq::Error when there are fewer windows than asked.
  std::vector<std::vector<std::int32_t>> calibration(std::size_t count, std::size_t length,
                                                     std::uint64_t seed) const;
  // The first `count` consecutive windows of `length` tokens of the held-out split.
  std::vector<std::vector<std::int32_t>> heldout(std::size_t count, std::size_t length) const;

 private:
  TokenDataset(std::vector<std::int32_t> tokens, double heldout_fraction, std::string source);

  std::vector<std::int32_t> tokens_;
  std::size_t heldout_begin_ = 0;
  std::string source_;  // names the data in error messages
};

// The dataset of a data file given to a stage: with `token_ids`, whitespace-separated token ids
// (below vocab_size when given), for checkpoints without a tokenizer; otherwise text (plain or
// JSONL) tokenized with model_dir/tokenizer.json, a one-line pq::Error when it is absent.
// The checks load_token_dataset makes before reading: the file exists and, for text, the
// tokenizer does; stages that read the data late call it before any other work.
void require_dataset(const std::filesystem::path& data, bool token_ids,
                     const std::filesystem::path& model_dir);
TokenDataset load_token_dataset(const std::filesystem::path& data, bool token_ids,
                                const std::filesystem::path& model_dir,
                                std::optional<std::int32_t> vocab_size);

}  // namespace pq::data
