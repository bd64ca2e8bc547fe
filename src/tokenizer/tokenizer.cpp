#include "tokenizer/tokenizer.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <nlohmann/json.hpp>
#include <optional>
#include <variant>

#include "common/error.h"
#include "common/file_util.h"
#include "common/json_reader.h"
#include "tokenizer/bpe.h"
#include "tokenizer/regex.h"
#include "tokenizer/unicode.h"

// The component semantics below follow the Hugging Face tokenizers library (Rust crate
// `tokenizers`, tokenizer.json format): normalizers/*.rs, pre_tokenizers/*.rs, decoders/*.rs,
// processors/template.rs, models/bpe/model.rs and tokenizer/added_vocabulary.rs.
namespace pq::tokenizer {
namespace {

using Json = nlohmann::json;

// Token ids index tables sized by the largest one, so each is read as an exact integer and bounded
// before anything is allocated: 2^24 is 64 times the largest vocabulary in use (Gemma's 262,144).
constexpr std::int64_t kMaxTokenId = (std::int64_t{1} << 24) - 1;

// A token id from tokenizer.json: a JSON integer in [0, kMaxTokenId]. Floats (256.5, 1e308) and
// out-of-range values are errors naming the file and what the id belongs to, never narrowed.
std::int32_t read_token_id(const Json& value, const std::string& path, std::string_view what) {
  PQ_CHECK(value.is_number_integer(), "{}: {} has id {}, which is not an integer", path, what,
           value.dump());
  const bool in_range = value.is_number_unsigned() ? value.get<std::uint64_t>() <= kMaxTokenId
                                                   : value.get<std::int64_t>() >= 0 &&
                                                         value.get<std::int64_t>() <= kMaxTokenId;
  PQ_CHECK(in_range, "{}: {} has id {}, outside [0, {}]", path, what, value.dump(), kMaxTokenId);
  return static_cast<std::int32_t>(value.get<std::int64_t>());
}

// Rust's char::is_whitespace (the Unicode White_Space property), which added tokens' lstrip and
// rstrip use.
bool is_unicode_whitespace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

// A "pattern" field: {"String": literal} or {"Regex": pcre}. Literals are matched as regexes
// with every ASCII punctuation character escaped.
Regex compile_pattern(const Json& pattern, const std::string& where) {
  if (pattern.contains("Regex")) return Regex(pattern.at("Regex").get<std::string>());
  PQ_CHECK(pattern.contains("String"), "{}: pattern is neither String nor Regex", where);
  std::string escaped;
  for (const char c : pattern.at("String").get<std::string>()) {
    if (static_cast<unsigned char>(c) < 0x80 && !std::isalnum(static_cast<unsigned char>(c))) {
      escaped.push_back('\\');
    }
    escaped.push_back(c);
  }
  return Regex(escaped);
}

// How much longer the normalizers may make a text, and a Replace decoder a token: NFKC and NFKD
// lengthen UTF-8 text at most 11 times (Unicode Standard Annex #15, "Maximum Expansion Factors"),
// and the Prepend and Replace steps of real files add one character or turn one into a few bytes.
// A file that lengthens text further (a Replace whose content is kilobytes long) would have a
// short input encoded as gigabytes, so this is an error naming the file.
constexpr std::size_t kMaxGrowth = 64;

std::size_t growth_limit(std::size_t size) {
  return kMaxGrowth * (size + 1);
}

// Replaces every match of `regex` in `text` by `content` (normalizers/replace.rs,
// decoders: Replace); nullopt as soon as the result would be longer than max_size bytes.
std::optional<std::string> replace_all(const Regex& regex, std::string_view text,
                                       std::string_view content, std::size_t max_size) {
  std::string out;
  out.reserve(text.size());
  std::size_t copied = 0;
  for (const auto& [begin, end] : regex.find_all(text)) {
    if (out.size() + (begin - copied) + content.size() > max_size) return std::nullopt;
    out.append(text.substr(copied, begin - copied));
    out.append(content);
    copied = end;
  }
  if (out.size() + (text.size() - copied) > max_size) return std::nullopt;
  out.append(text.substr(copied));
  return out;
}

// ---- normalizers ----

struct UnicodeNormalizer {
  NormalizationForm form;
};
struct PrependNormalizer {
  std::string prefix;
};
struct ReplaceStep {
  Regex pattern;
  std::string content;
};
using Normalizer = std::variant<UnicodeNormalizer, PrependNormalizer, ReplaceStep>;

void parse_normalizer(const Json& node, const std::string& where, std::vector<Normalizer>& out) {
  if (node.is_null()) return;
  const auto type = node.at("type").get<std::string>();
  if (type == "Sequence") {
    for (const Json& child : node.at("normalizers")) parse_normalizer(child, where, out);
  } else if (type == "NFC") {
    out.push_back(UnicodeNormalizer{NormalizationForm::kNfc});
  } else if (type == "NFD") {
    out.push_back(UnicodeNormalizer{NormalizationForm::kNfd});
  } else if (type == "NFKC") {
    out.push_back(UnicodeNormalizer{NormalizationForm::kNfkc});
  } else if (type == "NFKD") {
    out.push_back(UnicodeNormalizer{NormalizationForm::kNfkd});
  } else if (type == "Prepend") {
    out.push_back(PrependNormalizer{node.at("prepend").get<std::string>()});
  } else if (type == "Replace") {
    out.push_back(ReplaceStep{compile_pattern(node.at("pattern"), where),
                              node.at("content").get<std::string>()});
  } else {
    fail("{}: unsupported normalizer type {}", where, quoted_json_string(type));
  }
}

std::string apply_normalizers(const std::vector<Normalizer>& normalizers, std::string text,
                              const std::string& path) {
  const std::size_t input = text.size();
  const std::size_t limit = growth_limit(input);
  const auto too_long = [&] {
    fail("{}: the normalizers lengthen {} bytes of text past {} bytes ({} times as long)", path,
         input, limit, kMaxGrowth);
  };
  for (const Normalizer& step : normalizers) {
    if (const auto* unicode = std::get_if<UnicodeNormalizer>(&step)) {
      text = normalize(text, unicode->form);
      if (text.size() > limit) too_long();
    } else if (const auto* prepend = std::get_if<PrependNormalizer>(&step)) {
      // normalizers/prepend.rs: only non-empty text gets the prefix.
      if (text.empty()) continue;
      if (text.size() + prepend->prefix.size() > limit) too_long();
      text.insert(0, prepend->prefix);
    } else {
      const auto& replace = std::get<ReplaceStep>(step);
      auto replaced = replace_all(replace.pattern, text, replace.content, limit);
      if (!replaced) too_long();
      text = std::move(*replaced);
    }
  }
  return text;
}

// ---- pre-tokenizers ----

// pre_tokenizers/split.rs with SplitDelimiterBehavior (tokenizer/normalizer.rs).
enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct SplitPreTokenizer {
  Regex pattern;
  SplitBehavior behavior;
  bool invert;
};
struct ByteLevelPreTokenizer {
  bool add_prefix_space;
  std::optional<Regex> gpt2_pattern;
};
// pre_tokenizers/metaspace.rs: spaces become the replacement character ("▁"), which is
// prepended to a piece (always, never, or only to the piece at offset 0 of the input: "first")
// and, with split, starts a new piece.
enum class PrependScheme { kAlways, kFirst, kNever };
struct MetaspacePreTokenizer {
  std::string replacement;
  PrependScheme prepend_scheme;
  bool split;
};
using PreTokenizer = std::variant<SplitPreTokenizer, ByteLevelPreTokenizer, MetaspacePreTokenizer>;

// A piece of text during pre-tokenization. at_origin: it starts at offset 0 of the text given to
// encode(), which Metaspace's "first" prepend scheme needs.
struct Piece {
  std::string text;
  bool at_origin;
};

// Metaspace's replacement character, and its prepend scheme from "prepend_scheme" or, in files
// older than tokenizers 0.19, from "add_prefix_space".
std::string metaspace_replacement(const Json& node, const std::string& where) {
  const auto replacement = node.at("replacement").get<std::string>();
  PQ_CHECK(!replacement.empty() && decode_utf8(replacement, 0).length == replacement.size(),
           "{}: Metaspace replacement {} is not one character", where,
           quoted_json_string(replacement));
  return replacement;
}

PrependScheme metaspace_prepend_scheme(const Json& node, const std::string& where) {
  if (!node.contains("prepend_scheme")) {
    return node.value("add_prefix_space", true) ? PrependScheme::kAlways : PrependScheme::kNever;
  }
  const auto scheme = node.at("prepend_scheme").get<std::string>();
  if (scheme == "always") return PrependScheme::kAlways;
  if (scheme == "first") return PrependScheme::kFirst;
  if (scheme == "never") return PrependScheme::kNever;
  fail("{}: unknown Metaspace prepend_scheme {}", where, quoted_json_string(scheme));
}

// The pattern ByteLevel applies when use_regex is true (pre_tokenizers/byte_level.rs, from
// openai/gpt-2 src/encoder.py).
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

void parse_pre_tokenizer(const Json& node, const std::string& where,
                         std::vector<PreTokenizer>& out) {
  if (node.is_null()) return;
  const auto type = node.at("type").get<std::string>();
  if (type == "Sequence") {
    for (const Json& child : node.at("pretokenizers")) parse_pre_tokenizer(child, where, out);
  } else if (type == "Split") {
    const auto behavior = node.at("behavior").get<std::string>();
    SplitBehavior parsed;
    if (behavior == "Removed") {
      parsed = SplitBehavior::kRemoved;
    } else if (behavior == "Isolated") {
      parsed = SplitBehavior::kIsolated;
    } else if (behavior == "MergedWithPrevious") {
      parsed = SplitBehavior::kMergedWithPrevious;
    } else if (behavior == "MergedWithNext") {
      parsed = SplitBehavior::kMergedWithNext;
    } else if (behavior == "Contiguous") {
      parsed = SplitBehavior::kContiguous;
    } else {
      fail("{}: unsupported Split behavior {}", where, quoted_json_string(behavior));
    }
    out.push_back(SplitPreTokenizer{compile_pattern(node.at("pattern"), where), parsed,
                                    node.value("invert", false)});
  } else if (type == "ByteLevel") {
    std::optional<Regex> pattern;
    if (node.value("use_regex", true)) pattern.emplace(kGpt2Pattern);
    out.push_back(ByteLevelPreTokenizer{node.value("add_prefix_space", false), std::move(pattern)});
  } else if (type == "Metaspace") {
    out.push_back(MetaspacePreTokenizer{metaspace_replacement(node, where),
                                        metaspace_prepend_scheme(node, where),
                                        node.value("split", true)});
  } else {
    fail("{}: unsupported pre_tokenizer type {}", where, quoted_json_string(type));
  }
}

// Splits `piece` around the matches of `split.pattern` and appends the resulting non-empty
// pieces according to the behavior (tokenizer/normalizer.rs NormalizedString::split).
void apply_split(const Regex& pattern, SplitBehavior behavior, bool invert, const Piece& piece,
                 std::vector<Piece>& out) {
  // (begin, end, is_delimiter) covering the whole piece in order.
  struct Part {
    std::size_t begin, end;
    bool delimiter;
  };
  std::vector<Part> parts;
  std::size_t cursor = 0;
  for (const auto& [begin, end] : pattern.find_all(piece.text)) {
    if (begin > cursor) parts.push_back({cursor, begin, invert});
    parts.push_back({begin, end, !invert});
    cursor = end;
  }
  if (cursor < piece.text.size()) parts.push_back({cursor, piece.text.size(), invert});

  std::vector<std::pair<std::size_t, std::size_t>> ranges;
  bool pending_merge_with_next = false;
  for (const Part& part : parts) {
    switch (behavior) {
      case SplitBehavior::kRemoved:
        if (!part.delimiter) ranges.emplace_back(part.begin, part.end);
        break;
      case SplitBehavior::kIsolated:
        ranges.emplace_back(part.begin, part.end);
        break;
      case SplitBehavior::kMergedWithPrevious:
        if (part.delimiter && !ranges.empty()) {
          ranges.back().second = part.end;
        } else {
          ranges.emplace_back(part.begin, part.end);
        }
        break;
      case SplitBehavior::kMergedWithNext:
        if (pending_merge_with_next) {
          ranges.back().second = part.end;
        } else {
          ranges.emplace_back(part.begin, part.end);
        }
        pending_merge_with_next = part.delimiter;
        break;
      case SplitBehavior::kContiguous:
        if (part.delimiter && pending_merge_with_next) {
          ranges.back().second = part.end;
        } else {
          ranges.emplace_back(part.begin, part.end);
        }
        pending_merge_with_next = part.delimiter;
        break;
    }
  }
  for (const auto& [begin, end] : ranges) {
    if (end > begin) {
      out.push_back({piece.text.substr(begin, end - begin), piece.at_origin && begin == 0});
    }
  }
}

// Runs the pre-tokenizers over one normalized text segment; the result are the words the model
// encodes one by one.
std::vector<std::string> apply_pre_tokenizers(const std::vector<PreTokenizer>& pre_tokenizers,
                                              std::string text, bool at_origin) {
  std::vector<Piece> pieces;
  pieces.push_back({std::move(text), at_origin});
  for (const PreTokenizer& step : pre_tokenizers) {
    std::vector<Piece> next;
    if (const auto* split = std::get_if<SplitPreTokenizer>(&step)) {
      for (const Piece& piece : pieces) {
        apply_split(split->pattern, split->behavior, split->invert, piece, next);
      }
    } else if (const auto* byte_level = std::get_if<ByteLevelPreTokenizer>(&step)) {
      const ByteLevelAlphabet& alphabet = ByteLevelAlphabet::instance();
      for (Piece& piece : pieces) {
        if (byte_level->add_prefix_space && piece.text.front() != ' ') {
          piece.text.insert(piece.text.begin(), ' ');
        }
        std::vector<Piece> split_pieces;
        if (byte_level->gpt2_pattern) {
          apply_split(*byte_level->gpt2_pattern, SplitBehavior::kIsolated, false, piece,
                      split_pieces);
        } else {
          split_pieces.push_back(std::move(piece));
        }
        for (const Piece& bytes : split_pieces) {
          std::string mapped;
          mapped.reserve(bytes.text.size() * 2);
          alphabet.encode(bytes.text, mapped);
          next.push_back({std::move(mapped), bytes.at_origin});
        }
      }
    } else {
      const auto& metaspace = std::get<MetaspacePreTokenizer>(step);
      for (const Piece& piece : pieces) {
        std::string replaced;
        for (const char c : piece.text) {
          if (c == ' ') {
            replaced += metaspace.replacement;
          } else {
            replaced.push_back(c);
          }
        }
        const bool prepend = metaspace.prepend_scheme == PrependScheme::kAlways ||
                             (metaspace.prepend_scheme == PrependScheme::kFirst && piece.at_origin);
        if (prepend && !replaced.starts_with(metaspace.replacement)) {
          replaced.insert(0, metaspace.replacement);
        }
        if (!metaspace.split) {
          next.push_back({std::move(replaced), piece.at_origin});
          continue;
        }
        // Split before every replacement character (SplitDelimiterBehavior::MergedWithNext).
        std::size_t begin = 0;
        for (std::size_t pos = replaced.find(metaspace.replacement, 1); pos != std::string::npos;
             pos = replaced.find(metaspace.replacement, pos + 1)) {
          next.push_back({replaced.substr(begin, pos - begin), piece.at_origin && begin == 0});
          begin = pos;
        }
        next.push_back({replaced.substr(begin), piece.at_origin && begin == 0});
      }
    }
    pieces = std::move(next);
  }
  std::vector<std::string> words;
  words.reserve(pieces.size());
  for (Piece& piece : pieces) words.push_back(std::move(piece.text));
  return words;
}

// ---- decoders ----

struct ByteLevelDecoder {};
struct ByteFallbackDecoder {};
struct FuseDecoder {};
struct StripDecoder {
  std::string content;
  std::size_t start, stop;
};
// decoders: Metaspace turns the replacement character back into a space, except in the first
// token (when a prefix was prepended), where it is dropped.
struct MetaspaceDecoder {
  std::string replacement;
  bool drop_in_first_token;
};
using Decoder = std::variant<ByteLevelDecoder, ReplaceStep, ByteFallbackDecoder, FuseDecoder,
                             StripDecoder, MetaspaceDecoder>;

void parse_decoder(const Json& node, const std::string& where, std::vector<Decoder>& out) {
  if (node.is_null()) return;
  const auto type = node.at("type").get<std::string>();
  if (type == "Sequence") {
    for (const Json& child : node.at("decoders")) parse_decoder(child, where, out);
  } else if (type == "ByteLevel") {
    out.push_back(ByteLevelDecoder{});
  } else if (type == "Replace") {
    out.push_back(ReplaceStep{compile_pattern(node.at("pattern"), where),
                              node.at("content").get<std::string>()});
  } else if (type == "ByteFallback") {
    out.push_back(ByteFallbackDecoder{});
  } else if (type == "Fuse") {
    out.push_back(FuseDecoder{});
  } else if (type == "Metaspace") {
    out.push_back(MetaspaceDecoder{metaspace_replacement(node, where),
                                   metaspace_prepend_scheme(node, where) != PrependScheme::kNever});
  } else if (type == "Strip") {
    const auto content = node.at("content").get<std::string>();
    PQ_CHECK(decode_utf8(content, 0).length == content.size() && !content.empty(),
             "{}: Strip decoder content {} is not one character", where,
             quoted_json_string(content));
    out.push_back(StripDecoder{content, node.at("start").get<std::size_t>(),
                               node.at("stop").get<std::size_t>()});
  } else {
    fail("{}: unsupported decoder type {}", where, quoted_json_string(type));
  }
}

// The byte a "<0xXX>" token stands for (decoders/byte_fallback.rs), or -1.
int byte_fallback_value(std::string_view token) {
  if (token.size() != 6 || !token.starts_with("<0x") || token[5] != '>') return -1;
  int value = 0;
  for (const char c : token.substr(3, 2)) {
    value <<= 4;
    if (c >= '0' && c <= '9') {
      value |= c - '0';
    } else if (c >= 'A' && c <= 'F') {
      value |= c - 'A' + 10;
    } else if (c >= 'a' && c <= 'f') {
      value |= c - 'a' + 10;
    } else {
      return -1;
    }
  }
  return value;
}

std::vector<std::string> apply_decoder(const Decoder& decoder, std::vector<std::string> tokens,
                                       const std::string& path) {
  if (std::holds_alternative<ByteLevelDecoder>(decoder)) {
    // decoders: ByteLevel maps each character back to its byte; a token with a character outside
    // the alphabet (an added token such as "<think>" is inside it) keeps its UTF-8 bytes.
    const ByteLevelAlphabet& alphabet = ByteLevelAlphabet::instance();
    std::string bytes;
    for (const std::string& token : tokens) {
      const std::size_t token_start = bytes.size();
      for (std::size_t pos = 0; pos < token.size();) {
        const Utf8Step step = decode_utf8(token, pos);
        const int byte = step.valid ? alphabet.decode(step.code_point) : -1;
        if (byte < 0) {
          bytes.resize(token_start);
          bytes.append(token);
          break;
        }
        bytes.push_back(static_cast<char>(byte));
        pos += step.length;
      }
    }
    return {to_valid_utf8(bytes)};
  }
  if (const auto* replace = std::get_if<ReplaceStep>(&decoder)) {
    for (std::string& token : tokens) {
      auto replaced =
          replace_all(replace->pattern, token, replace->content, growth_limit(token.size()));
      PQ_CHECK(replaced.has_value(),
               "{}: the Replace decoder lengthens a token of {} bytes more than {} times", path,
               token.size(), kMaxGrowth);
      token = std::move(*replaced);
    }
    return tokens;
  }
  if (std::holds_alternative<ByteFallbackDecoder>(decoder)) {
    // Runs of byte tokens become their UTF-8 text, or one U+FFFD per byte when invalid.
    std::vector<std::string> out;
    std::string pending;
    const auto flush = [&] {
      if (pending.empty()) return;
      if (is_valid_utf8(pending)) {
        out.push_back(pending);
      } else {
        for (std::size_t i = 0; i < pending.size(); ++i) out.emplace_back("\xEF\xBF\xBD");
      }
      pending.clear();
    };
    for (std::string& token : tokens) {
      if (const int byte = byte_fallback_value(token); byte >= 0) {
        pending.push_back(static_cast<char>(byte));
      } else {
        flush();
        out.push_back(std::move(token));
      }
    }
    flush();
    return out;
  }
  if (const auto* metaspace = std::get_if<MetaspaceDecoder>(&decoder)) {
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      const std::string_view space = i == 0 && metaspace->drop_in_first_token ? "" : " ";
      std::string decoded;
      std::size_t copied = 0;
      for (std::size_t pos = tokens[i].find(metaspace->replacement); pos != std::string::npos;
           pos = tokens[i].find(metaspace->replacement, copied)) {
        decoded.append(tokens[i], copied, pos - copied);
        decoded.append(space);
        copied = pos + metaspace->replacement.size();
      }
      decoded.append(tokens[i], copied);
      tokens[i] = std::move(decoded);
    }
    return tokens;
  }
  if (std::holds_alternative<FuseDecoder>(decoder)) {
    std::string fused;
    for (const std::string& token : tokens) fused += token;
    return {fused};
  }
  // Strip: removes up to `start` leading and `stop` trailing copies of the character from each
  // token.
  const auto& strip = std::get<StripDecoder>(decoder);
  for (std::string& token : tokens) {
    std::size_t begin = 0;
    for (std::size_t i = 0;
         i < strip.start && token.compare(begin, strip.content.size(), strip.content) == 0; ++i) {
      begin += strip.content.size();
    }
    std::size_t end = token.size();
    for (std::size_t i = 0;
         i < strip.stop && end >= begin + strip.content.size() &&
         token.compare(end - strip.content.size(), strip.content.size(), strip.content) == 0;
         ++i) {
      end -= strip.content.size();
    }
    token = token.substr(begin, end - begin);
  }
  return tokens;
}

// ---- added tokens ----

struct AddedToken {
  std::string content;
  std::int32_t id;
  bool special, lstrip, rstrip, normalized;
};

// Finds added tokens in text: leftmost match first, longest on ties at the same position (the
// aho-corasick LeftmostLongest search of added_vocabulary.rs), via a byte trie.
class AddedTokenMatcher {
 public:
  void add(const AddedToken& token, std::size_t index) {
    std::size_t node = 0;
    for (const char c : token.content) {
      const auto byte = static_cast<std::uint8_t>(c);
      std::size_t child = 0;
      for (const auto& [edge, target] : nodes_[node].children) {
        if (edge == byte) child = target;
      }
      if (child == 0) {
        child = nodes_.size();
        nodes_[node].children.emplace_back(byte, child);
        nodes_.emplace_back();
      }
      node = child;
    }
    nodes_[node].token = static_cast<std::int32_t>(index);
    first_bytes_[static_cast<std::uint8_t>(token.content.front())] = true;
    empty_ = false;
  }

  bool empty() const { return empty_; }

  // The index and end of the longest token starting at `pos`, or index -1.
  std::pair<std::int32_t, std::size_t> longest_at(std::string_view text, std::size_t pos) const {
    std::pair<std::int32_t, std::size_t> best{-1, pos};
    if (!first_bytes_[static_cast<std::uint8_t>(text[pos])]) return best;
    std::size_t node = 0;
    for (std::size_t i = pos; i < text.size(); ++i) {
      std::size_t child = 0;
      for (const auto& [edge, target] : nodes_[node].children) {
        if (edge == static_cast<std::uint8_t>(text[i])) child = target;
      }
      if (child == 0) break;
      node = child;
      if (nodes_[node].token >= 0) best = {nodes_[node].token, i + 1};
    }
    return best;
  }

 private:
  struct Node {
    std::vector<std::pair<std::uint8_t, std::size_t>> children;
    std::int32_t token = -1;
  };
  std::vector<Node> nodes_ = std::vector<Node>(1);
  std::array<bool, 256> first_bytes_{};
  bool empty_ = true;
};

// A piece of text between added tokens, or one added token (index into the added list).
struct Segment {
  std::string_view text;
  std::int32_t added = -1;
};

std::size_t skip_whitespace_backward(std::string_view text, std::size_t pos, std::size_t floor) {
  while (pos > floor) {
    std::size_t start = pos - 1;
    while (start > floor && (static_cast<std::uint8_t>(text[start]) & 0xC0) == 0x80) --start;
    const Utf8Step step = decode_utf8(text, start);
    if (!step.valid || !is_unicode_whitespace(step.code_point)) break;
    pos = start;
  }
  return pos;
}

std::size_t skip_whitespace_forward(std::string_view text, std::size_t pos) {
  while (pos < text.size()) {
    const Utf8Step step = decode_utf8(text, pos);
    if (!step.valid || !is_unicode_whitespace(step.code_point)) break;
    pos += step.length;
  }
  return pos;
}

std::vector<Segment> split_added_tokens(std::string_view text, const AddedTokenMatcher& matcher,
                                        const std::vector<AddedToken>& added) {
  std::vector<Segment> segments;
  if (text.empty()) return segments;
  if (matcher.empty()) {
    segments.push_back({text});
    return segments;
  }
  std::size_t text_begin = 0;
  for (std::size_t pos = 0; pos < text.size();) {
    const auto [index, end] = matcher.longest_at(text, pos);
    if (index < 0) {
      ++pos;
      continue;
    }
    const AddedToken& token = added[index];
    // lstrip/rstrip: the token absorbs the whitespace next to it.
    const std::size_t begin = token.lstrip ? skip_whitespace_backward(text, pos, text_begin) : pos;
    const std::size_t stop = token.rstrip ? skip_whitespace_forward(text, end) : end;
    if (begin > text_begin) segments.push_back({text.substr(text_begin, begin - text_begin)});
    segments.push_back({text.substr(begin, stop - begin), index});
    text_begin = pos = stop;
  }
  if (text_begin < text.size()) segments.push_back({text.substr(text_begin)});
  return segments;
}

std::optional<std::string> special_token_name(const Json& config, const char* key) {
  if (!config.contains(key) || config.at(key).is_null()) return std::nullopt;
  const Json& value = config.at(key);
  // Older files store {"content": ..., "__type": "AddedToken", ...} instead of the string.
  return value.is_object() ? value.at("content").get<std::string>() : value.get<std::string>();
}

}  // namespace

struct Tokenizer::Impl {
  std::string path;
  std::vector<Normalizer> normalizers;
  std::vector<PreTokenizer> pre_tokenizers;
  std::vector<Decoder> decoders;
  std::optional<BpeModel> model;
  std::vector<AddedToken> added;
  AddedTokenMatcher raw_matcher;         // added tokens with normalized=false
  AddedTokenMatcher normalized_matcher;  // added tokens with normalized=true
  std::vector<std::int32_t> prefix_ids;  // the post-processor's tokens before/after the text
  std::vector<std::int32_t> suffix_ids;
  std::vector<std::string> tokens;  // by id; empty where the id is unused
  std::vector<bool> has_token;
  std::vector<bool> is_special;
  std::optional<std::int32_t> bos, eos;

  std::optional<std::int32_t> token_to_id(std::string_view token) const {
    for (const AddedToken& added_token : added) {
      if (added_token.content == token) return added_token.id;
    }
    return model->find(token);
  }

  // Encodes a piece of text that lies between added tokens; at_origin: it starts the input.
  void encode_text(std::string_view text, bool at_origin, std::vector<std::int32_t>& ids) const {
    const std::string normalized = apply_normalizers(normalizers, std::string(text), path);
    for (const Segment& segment : split_added_tokens(normalized, normalized_matcher, added)) {
      if (segment.added >= 0) {
        ids.push_back(added[segment.added].id);
        continue;
      }
      const bool segment_at_origin = at_origin && segment.text.data() == normalized.data();
      for (const std::string& word :
           apply_pre_tokenizers(pre_tokenizers, std::string(segment.text), segment_at_origin)) {
        model->encode_word(word, ids);
      }
    }
  }

  void parse_post_processor(const Json& node) {
    if (node.is_null()) return;
    const auto type = node.at("type").get<std::string>();
    if (type == "Sequence") {
      for (const Json& child : node.at("processors")) parse_post_processor(child);
    } else if (type == "ByteLevel") {
      // Only adjusts offsets (processors: ByteLevel with trim_offsets); ids are unchanged.
    } else if (type == "TemplateProcessing") {
      // processors/template.rs: "single" lists SpecialToken and Sequence items; special_tokens
      // maps a SpecialToken's id to the token ids it stands for.
      PQ_CHECK(prefix_ids.empty() && suffix_ids.empty(),
               "{}: more than one TemplateProcessing post_processor", path);
      bool seen_sequence = false;
      for (const Json& item : node.at("single")) {
        if (item.contains("Sequence")) {
          PQ_CHECK(item.at("Sequence").at("id").get<std::string>() == "A",
                   "{}: TemplateProcessing single template uses a sequence other than A", path);
          seen_sequence = true;
          continue;
        }
        const auto name = item.at("SpecialToken").at("id").get<std::string>();
        PQ_CHECK(node.at("special_tokens").contains(name),
                 "{}: TemplateProcessing special token {} is not defined", path,
                 quoted_json_string(name));
        for (const Json& id : node.at("special_tokens").at(name).at("ids")) {
          (seen_sequence ? suffix_ids : prefix_ids)
              .push_back(read_token_id(id, path,
                                       fmt::format("special token {}", quoted_json_string(name))));
        }
      }
    } else {
      fail("{}: unsupported post_processor type {}", path, quoted_json_string(type));
    }
  }

  void parse_model(const Json& node) {
    const auto type = node.value("type", std::string("BPE"));
    PQ_CHECK(type == "BPE", "{}: unsupported tokenizer model type {} (only BPE is supported)", path,
             quoted_json_string(type));
    PQ_CHECK(node.value("dropout", Json()).is_null() || node.at("dropout").get<double>() == 0.0,
             "{}: BPE dropout is not supported", path);
    for (const char* affix : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      PQ_CHECK(node.value(affix, Json()).is_null() || node.at(affix).get<std::string>().empty(),
               "{}: BPE {} is not supported", path, affix);
    }
    Vocab vocab;
    vocab.reserve(node.at("vocab").size());
    for (const auto& [token, id] : node.at("vocab").items()) {
      vocab.emplace(token,
                    read_token_id(id, path, fmt::format("token {}", quoted_json_string(token))));
    }
    // Merges are "left right" strings (older files) or [left, right] pairs.
    std::vector<std::pair<std::string, std::string>> merges;
    merges.reserve(node.at("merges").size());
    for (const Json& merge : node.at("merges")) {
      if (merge.is_array()) {
        PQ_CHECK(merge.size() == 2, "{}: merge {} is not a pair", path, merges.size());
        merges.emplace_back(merge[0].get<std::string>(), merge[1].get<std::string>());
      } else {
        const auto text = merge.get<std::string>();
        const std::size_t space = text.find(' ');
        PQ_CHECK(space != std::string::npos, "{}: merge {} ({}) has no space", path, merges.size(),
                 quoted_json_string(text));
        merges.emplace_back(text.substr(0, space), text.substr(space + 1));
      }
    }
    BpeOptions options;
    options.byte_fallback = node.value("byte_fallback", false);
    options.ignore_merges = node.value("ignore_merges", false);
    options.fuse_unk = node.value("fuse_unk", false);
    if (const Json unk = node.value("unk_token", Json()); !unk.is_null()) {
      const auto it = vocab.find(unk.get<std::string>());
      PQ_CHECK(it != vocab.end(), "{}: unk_token {} is not in the vocabulary", path,
               quoted_json_string(unk.get<std::string>()));
      options.unk_id = it->second;
    }
    try {
      model.emplace(std::move(vocab), merges, options);
    } catch (const Error& error) {
      fail("{}: {}", path, error.what());
    }
  }

  void build_token_table() {
    std::int32_t size = 0;
    for (const auto& [token, id] : model->vocab()) size = std::max(size, id + 1);
    for (const AddedToken& token : added) size = std::max(size, token.id + 1);
    tokens.assign(size, std::string());
    has_token.assign(size, false);
    is_special.assign(size, false);
    for (const auto& [token, id] : model->vocab()) {
      tokens[id] = token;
      has_token[id] = true;
    }
    for (const AddedToken& token : added) {
      tokens[token.id] = token.content;
      has_token[token.id] = true;
      is_special[token.id] = token.special;
    }
  }
};

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::load(const std::filesystem::path& file_or_directory) {
  const std::filesystem::path tokenizer_json = std::filesystem::is_directory(file_or_directory)
                                                   ? file_or_directory / "tokenizer.json"
                                                   : file_or_directory;
  auto impl = std::make_unique<Impl>();
  impl->path = tokenizer_json.string();
  const std::string& path = impl->path;
  try {
    const Json root = read_json_file(tokenizer_json);
    parse_normalizer(root.value("normalizer", Json()), path, impl->normalizers);
    parse_pre_tokenizer(root.value("pre_tokenizer", Json()), path, impl->pre_tokenizers);
    parse_decoder(root.value("decoder", Json()), path, impl->decoders);
    impl->parse_model(root.at("model"));
    for (const Json& entry : root.value("added_tokens", Json::array())) {
      const auto content = entry.at("content").get<std::string>();
      AddedToken token{content,
                       read_token_id(entry.at("id"), path,
                                     fmt::format("added token {}", quoted_json_string(content))),
                       entry.value("special", false),
                       entry.value("lstrip", false),
                       entry.value("rstrip", false),
                       entry.value("normalized", false)};
      PQ_CHECK(!token.content.empty(), "{}: invalid added token {}", path, entry.dump());
      PQ_CHECK(!entry.value("single_word", false),
               "{}: added token {} uses single_word, which is not supported", path,
               quoted_json_string(token.content));
      (token.normalized ? impl->normalized_matcher : impl->raw_matcher)
          .add(token, impl->added.size());
      impl->added.push_back(std::move(token));
    }
    impl->parse_post_processor(root.value("post_processor", Json()));
    impl->build_token_table();
    // encode() emits these ids; one that names no token would be past the end of the model's
    // embedding and could not be decoded.
    for (const auto* ids : {&impl->prefix_ids, &impl->suffix_ids}) {
      for (const std::int32_t id : *ids) {
        PQ_CHECK(id < static_cast<std::int32_t>(impl->tokens.size()) && impl->has_token[id],
                 "{}: the post_processor adds id {}, which is neither in the vocabulary nor an "
                 "added token",
                 path, id);
      }
    }

    const auto config_path = tokenizer_json.parent_path() / "tokenizer_config.json";
    if (std::filesystem::exists(config_path)) {
      const Json config = read_json_file(config_path);
      const auto resolve = [&](const char* key) -> std::optional<std::int32_t> {
        const auto name = special_token_name(config, key);
        if (!name) return std::nullopt;
        const auto id = impl->token_to_id(*name);
        PQ_CHECK(id.has_value(), "{}: {} {} is not in the vocabulary", config_path.string(), key,
                 quoted_json_string(*name));
        return id;
      };
      impl->bos = resolve("bos_token");
      impl->eos = resolve("eos_token");
    } else if (!impl->prefix_ids.empty()) {
      impl->bos = impl->prefix_ids.front();
    }
  } catch (const Json::exception& error) {
    fail("{}: malformed tokenizer file: {}", path, error.what());
  }
  return Tokenizer(std::move(impl));
}

std::vector<std::int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  const std::size_t valid = valid_utf8_prefix(text);
  PQ_CHECK(valid == text.size(), "text to tokenize is not valid UTF-8 (byte offset {})", valid);
  std::vector<std::int32_t> ids;
  if (add_special_tokens) ids = impl_->prefix_ids;
  for (const Segment& segment : split_added_tokens(text, impl_->raw_matcher, impl_->added)) {
    if (segment.added >= 0) {
      ids.push_back(impl_->added[segment.added].id);
    } else {
      impl_->encode_text(segment.text, segment.text.data() == text.data(), ids);
    }
  }
  if (add_special_tokens) ids.insert(ids.end(), impl_->suffix_ids.begin(), impl_->suffix_ids.end());
  return ids;
}

std::string Tokenizer::decode(std::span<const std::int32_t> ids, bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (const std::int32_t id : ids) {
    if (skip_special_tokens && id >= 0 && id < vocab_size() && impl_->is_special[id]) continue;
    tokens.push_back(id_to_token(id));
  }
  if (impl_->decoders.empty()) {
    // Without a decoder the reference joins the tokens with spaces (tokenizer/mod.rs decode).
    std::string joined;
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      if (i > 0) joined.push_back(' ');
      joined += tokens[i];
    }
    return joined;
  }
  for (const Decoder& decoder : impl_->decoders) {
    tokens = apply_decoder(decoder, std::move(tokens), impl_->path);
  }
  std::string text;
  for (const std::string& token : tokens) text += token;
  return text;
}

std::optional<std::int32_t> Tokenizer::token_to_id(std::string_view token) const {
  return impl_->token_to_id(token);
}

const std::string& Tokenizer::id_to_token(std::int32_t id) const {
  PQ_CHECK(id >= 0 && id < vocab_size() && impl_->has_token[id], "token id {} is not in {}", id,
           impl_->path);
  return impl_->tokens[id];
}

std::int32_t Tokenizer::vocab_size() const {
  return static_cast<std::int32_t>(impl_->tokens.size());
}

std::optional<std::int32_t> Tokenizer::bos_id() const {
  return impl_->bos;
}
std::optional<std::int32_t> Tokenizer::eos_id() const {
  return impl_->eos;
}

}  // namespace pq::tokenizer
