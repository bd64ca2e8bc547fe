#include "tokenizer/bpe.h"

#include <fmt/format.h>

#include <algorithm>
#include <bit>

#include "common/error.h"
#include "tokenizer/unicode.h"

namespace pq::tokenizer {
namespace {

std::uint64_t pair_key(std::int32_t left, std::int32_t right) {
  return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(left)) << 32) |
         static_cast<std::uint32_t>(right);
}

// splitmix64 finalizer: spreads the two ids over all bits before masking to the table size.
std::uint64_t mix(std::uint64_t x) {
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

}  // namespace

BpeModel::BpeModel(Vocab vocab, const std::vector<std::pair<std::string, std::string>>& merges,
                   BpeOptions options)
    : vocab_(std::move(vocab)), options_(options) {
  merges_.resize(std::bit_ceil(std::max<std::size_t>(16, merges.size() * 2)));
  for (std::size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [left, right] = merges[rank];
    const auto left_id = find(left);
    const auto right_id = find(right);
    const auto merged_id = find(left + right);
    PQ_CHECK(left_id && right_id && merged_id,
             "merge {} ('{} {}') uses a token missing from the vocabulary", rank, left, right);
    add_merge(*left_id, *right_id, static_cast<std::int32_t>(rank), *merged_id);
    const auto largest = static_cast<std::size_t>(std::max(*left_id, *right_id));
    if (mergeable_.size() <= largest) mergeable_.resize(largest + 1, false);
    mergeable_[*left_id] = true;
    mergeable_[*right_id] = true;
  }

  char_ids_.assign(kDirectChars, -1);
  for (const auto& [token, id] : vocab_) {
    const Utf8Step step = decode_utf8(token, 0);
    if (step.valid && step.length == token.size() && step.code_point < kDirectChars) {
      char_ids_[step.code_point] = id;
    }
  }
  // Byte tokens are spelled "<0xXX>" with upper-case hex digits (tokenizers' BPE::merge_word
  // formats them with "<{:#04X}>").
  for (int byte = 0; byte < 256; ++byte) {
    byte_fallback_ids_[byte] = find(fmt::format("<0x{:02X}>", byte)).value_or(-1);
  }
}

std::optional<std::int32_t> BpeModel::find(std::string_view token) const {
  const auto it = vocab_.find(token);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

void BpeModel::add_merge(std::int32_t left, std::int32_t right, std::int32_t rank,
                         std::int32_t merged) {
  const std::uint64_t key = pair_key(left, right);
  const std::size_t mask = merges_.size() - 1;
  for (std::size_t i = mix(key) & mask;; i = (i + 1) & mask) {
    // A repeated pair takes the later rank: the reference builds its merge map by collecting
    // (pair, rank) entries into a HashMap, where later entries overwrite earlier ones.
    if (merges_[i].pair == kEmptyPair || merges_[i].pair == key) {
      merges_[i] = {key, rank, merged};
      return;
    }
  }
}

const BpeModel::MergeSlot* BpeModel::find_merge(std::int32_t left, std::int32_t right) const {
  const std::uint64_t key = pair_key(left, right);
  const std::size_t mask = merges_.size() - 1;
  for (std::size_t i = mix(key) & mask;; i = (i + 1) & mask) {
    if (merges_[i].pair == key) return &merges_[i];
    if (merges_[i].pair == kEmptyPair) return nullptr;
  }
}

void BpeModel::encode_word(std::string_view word, std::vector<std::int32_t>& out) const {
  if (word.empty()) return;
  if (options_.ignore_merges) {
    if (const auto id = find(word)) {
      out.push_back(*id);
      return;
    }
  }
  if (word.size() > kCacheMaxWordBytes) {
    merge_symbols(word, out);
    return;
  }
  {
    const std::lock_guard lock(cache_mutex_);
    if (const auto it = cache_.find(word); it != cache_.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<std::int32_t> ids;
  merge_symbols(word, ids);
  out.insert(out.end(), ids.begin(), ids.end());
  const std::lock_guard lock(cache_mutex_);
  // Dropping the whole cache when it is full bounds memory on endless input without the
  // bookkeeping of an LRU; typical text re-fills it with its frequent words at once.
  if (cache_.size() >= kCacheMaxEntries) cache_.clear();
  cache_.emplace(word, std::move(ids));
}

void BpeModel::merge_symbols(std::string_view word, std::vector<std::int32_t>& out) const {
  // Initial symbols, one per character, following tokenizers' BPE::merge_word: a known character
  // is its token; an unknown one becomes its byte tokens under byte_fallback, else unk (fused
  // with a preceding unk when fuse_unk), else nothing.
  std::vector<std::int32_t> ids;
  ids.reserve(word.size());
  bool previous_is_unk = false;
  for (std::size_t pos = 0; pos < word.size();) {
    const Utf8Step step = decode_utf8(word, pos);
    const std::string_view character = word.substr(pos, step.length);
    pos += step.length;
    std::int32_t id = -1;
    if (step.valid && step.code_point < kDirectChars) {
      id = char_ids_[step.code_point];
    } else if (const auto found = find(character)) {
      id = *found;
    }
    if (id >= 0) {
      ids.push_back(id);
      previous_is_unk = false;
    } else if (options_.byte_fallback &&
               std::all_of(character.begin(), character.end(), [&](char byte) {
                 return byte_fallback_ids_[static_cast<std::uint8_t>(byte)] >= 0;
               })) {
      for (const char byte : character) {
        ids.push_back(byte_fallback_ids_[static_cast<std::uint8_t>(byte)]);
      }
      previous_is_unk = false;
    } else if (options_.unk_id) {
      if (!(options_.fuse_unk && previous_is_unk)) ids.push_back(*options_.unk_id);
      previous_is_unk = true;
    }
  }
  // A symbol that is in no merge never changes and no merge can reach across it, so the runs
  // between such symbols are merged independently. For SentencePiece-style tokenizers, whose
  // "words" are whole texts, this keeps each priority queue as small as a line.
  std::size_t run_start = 0;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    const auto id = static_cast<std::size_t>(ids[i]);
    if (id < mergeable_.size() && mergeable_[id]) continue;
    merge_run(std::span(ids).subspan(run_start, i - run_start), out);
    out.push_back(ids[i]);
    run_start = i + 1;
  }
  merge_run(std::span(ids).subspan(run_start), out);
}

void BpeModel::merge_run(std::span<std::int32_t> ids, std::vector<std::int32_t>& out) const {
  if (ids.size() <= 1) {
    out.insert(out.end(), ids.begin(), ids.end());
    return;
  }
  // Symbols form a doubly linked list over `ids`; a merged-away symbol gets id -1. Heap entries
  // record the ids they were made from and are discarded when either side changed since.
  struct Candidate {
    std::int32_t rank;
    std::int32_t left;
    std::int32_t right;
    std::int32_t left_id;
    std::int32_t right_id;
    std::int32_t merged_id;
  };
  // std::*_heap keeps the greatest element first; "greater" here means lower priority: higher
  // rank, then further right.
  const auto lower_priority = [](const Candidate& a, const Candidate& b) {
    return a.rank != b.rank ? a.rank > b.rank : a.left > b.left;
  };
  const auto n = static_cast<std::int32_t>(ids.size());
  std::vector<std::int32_t> prev(n);
  std::vector<std::int32_t> next(n);
  for (std::int32_t i = 0; i < n; ++i) {
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  std::vector<Candidate> heap;
  const auto add_candidate = [&](std::int32_t left, std::int32_t right) {
    if (left < 0 || right < 0) return false;
    const MergeSlot* merge = find_merge(ids[left], ids[right]);
    if (merge == nullptr) return false;
    heap.push_back({merge->rank, left, right, ids[left], ids[right], merge->merged_id});
    return true;
  };
  for (std::int32_t i = 0; i + 1 < n; ++i) add_candidate(i, i + 1);
  std::make_heap(heap.begin(), heap.end(), lower_priority);

  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), lower_priority);
    const Candidate candidate = heap.back();
    heap.pop_back();
    const std::int32_t left = candidate.left;
    const std::int32_t right = candidate.right;
    if (ids[left] != candidate.left_id || next[left] != right || ids[right] != candidate.right_id) {
      continue;
    }
    ids[left] = candidate.merged_id;
    ids[right] = -1;
    next[left] = next[right];
    if (next[left] >= 0) prev[next[left]] = left;
    for (const auto& [a, b] : {std::pair{prev[left], left}, std::pair{left, next[left]}}) {
      if (add_candidate(a, b)) std::push_heap(heap.begin(), heap.end(), lower_priority);
    }
  }
  for (std::int32_t i = 0; i >= 0; i = next[i]) out.push_back(ids[i]);
}

}  // namespace pq::tokenizer
