#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace pq::tokenizer {

// A Hugging Face tokenizer read from tokenizer.json, reproducing the tokenizers library for the
// model families prismaquant handles:
//   - byte-level BPE (Qwen2/Qwen3, Llama-3, GPT-2): NFC normalizer, Split regex + ByteLevel
//     pre-tokenizers, ByteLevel decoder;
//   - SentencePiece-style BPE (Llama-2, Mistral): Prepend/Replace "▁" normalizers or a Metaspace
//     pre-tokenizer, byte_fallback "<0xXX>" tokens, Replace/ByteFallback/Fuse/Strip or Metaspace
//     decoders;
//   - added tokens (special or not) split out of the text before normalization (or after it, for
//     normalized ones), and TemplateProcessing post-processors (BOS/EOS) applied when
//     add_special_tokens is set.
// docs/calibration-data.md lists every supported component; any other in the file is rejected by
// load() with a pq::Error naming it.
//
// Thread-safe for concurrent encode/decode calls (the word cache is internally locked).
class Tokenizer {
 public:
  // Reads a tokenizer.json file, or the tokenizer.json of a model directory; bos/eos come from
  // tokenizer_config.json next to it when that exists, else BOS is the first token the
  // post-processor puts before the text. Throws pq::Error naming the file and the offending entry.
  static Tokenizer load(const std::filesystem::path& file_or_directory);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Token ids of `text` (which must be valid UTF-8; pq::Error otherwise). With
  // add_special_tokens the post-processor's tokens (e.g. Llama-2's BOS) are added, as
  // transformers' tokenizer(text) does by default.
  std::vector<std::int32_t> encode(std::string_view text, bool add_special_tokens) const;

  // Text of `ids` through the file's decoder. Ids outside the vocabulary throw pq::Error. With
  // skip_special_tokens, added tokens flagged special are left out. Invalid UTF-8 that a partial
  // byte sequence leaves behind becomes U+FFFD, as in the reference.
  std::string decode(std::span<const std::int32_t> ids, bool skip_special_tokens = false) const;

  std::optional<std::int32_t> token_to_id(std::string_view token) const;
  // The vocabulary string of `id` (pq::Error when there is none).
  const std::string& id_to_token(std::int32_t id) const;
  // One past the largest id of the model vocabulary and added tokens.
  std::int32_t vocab_size() const;
  std::optional<std::int32_t> bos_id() const;
  std::optional<std::int32_t> eos_id() const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace pq::tokenizer
