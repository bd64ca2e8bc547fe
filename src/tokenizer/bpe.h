#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace pq::tokenizer {

// Hash that lets a std::unordered_map<std::string, ...> be searched with a std::string_view.
struct StringHash {
  using is_transparent = void;
  std::size_t operator()(std::string_view text) const {
    return std::hash<std::string_view>{}(text);
  }
};
using Vocab = std::unordered_map<std::string, std::int32_t, StringHash, std::equal_to<>>;

// Options of a Hugging Face "BPE" model (tokenizers/src/models/bpe/model.rs).
struct BpeOptions {
  // Characters missing from the vocabulary become their UTF-8 bytes as "<0xXX>" tokens.
  bool byte_fallback = false;
  // A word found whole in the vocabulary is emitted as that token without merging (Llama-3).
  bool ignore_merges = false;
  // Token for characters that are neither in the vocabulary nor byte-fallback encodable;
  // without it such characters are dropped, as the reference implementation does.
  std::optional<std::int32_t> unk_id;
  // Consecutive unknown characters become one unk token.
  bool fuse_unk = false;
};

// Byte-pair encoding of single pre-tokenized words: start from one symbol per character and
// repeatedly apply the merge of lowest rank (earliest in the merges list), leftmost first on ties,
// exactly the order tokenizers' BPE::merge_word uses. A priority queue keeps long words
// (SentencePiece-style tokenizers have no pre-tokenizer, so a word is a whole line) at
// O(n log n). Results for short words are cached.
class BpeModel {
 public:
  // `merges` are (left, right) token strings in rank order; every left, right and left+right must
  // be in `vocab` (throws pq::Error naming the merge otherwise).
  BpeModel(Vocab vocab, const std::vector<std::pair<std::string, std::string>>& merges,
           BpeOptions options);

  // Appends the ids of `word`. Thread-safe.
  void encode_word(std::string_view word, std::vector<std::int32_t>& out) const;

  const Vocab& vocab() const { return vocab_; }
  std::optional<std::int32_t> find(std::string_view token) const;

 private:
  struct MergeSlot {
    std::uint64_t pair = kEmptyPair;
    std::int32_t rank = 0;
    std::int32_t merged_id = 0;
  };
  static constexpr std::uint64_t kEmptyPair = ~std::uint64_t{0};

  void add_merge(std::int32_t left, std::int32_t right, std::int32_t rank, std::int32_t merged);
  const MergeSlot* find_merge(std::int32_t left, std::int32_t right) const;
  void merge_symbols(std::string_view word, std::vector<std::int32_t>& out) const;
  // Merges one run of symbols in place and appends the result.
  void merge_run(std::span<std::int32_t> ids, std::vector<std::int32_t>& out) const;

  Vocab vocab_;
  BpeOptions options_;
  // Open-addressing table of merges keyed by (left id, right id); a power-of-two size at most
  // half full, probed linearly.
  std::vector<MergeSlot> merges_;
  // mergeable_[id]: the token is the left or right side of some merge.
  std::vector<bool> mergeable_;
  // Ids of one-character tokens for code points below kDirectChars, -1 when absent, to avoid a
  // hash lookup per character for ASCII, Latin and the byte-level alphabet.
  static constexpr char32_t kDirectChars = 0x800;
  std::vector<std::int32_t> char_ids_;
  // Ids of the "<0xXX>" byte tokens, -1 when absent.
  std::array<std::int32_t, 256> byte_fallback_ids_{};

  static constexpr std::size_t kCacheMaxWordBytes = 64;
  static constexpr std::size_t kCacheMaxEntries = 1 << 16;
  mutable std::mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<std::int32_t>, StringHash, std::equal_to<>>
      cache_;
};

}  // namespace pq::tokenizer
