#include "data/token_dataset.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <nlohmann/json.hpp>
#include <numeric>

#include "common/error.h"
#include "common/file_util.h"
#include "common/json_reader.h"
#include "data/splitmix64.h"
#include "tokenizer/unicode.h"

namespace pq::data {
namespace {

using Json = nlohmann::json;

bool is_blank(std::string_view line) {
  return std::all_of(line.begin(), line.end(),
                     [](char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; });
}

std::string crlf_to_lf(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (!(text[i] == '\r' && i + 1 < text.size() && text[i + 1] == '\n')) out.push_back(text[i]);
  }
  return out;
}

// 1-based line of byte `offset`.
std::size_t line_of(std::string_view text, std::size_t offset) {
  return 1 + static_cast<std::size_t>(std::count(text.begin(), text.begin() + offset, '\n'));
}

void check_utf8(std::string_view text, const std::filesystem::path& path) {
  const std::size_t valid = tokenizer::valid_utf8_prefix(text);
  PQ_CHECK(valid == text.size(), "{}:{}: text is not valid UTF-8 (byte offset {})", path.string(),
           line_of(text, valid), valid);
}

// A chat as plain text: one "role: content" line per message.
std::string render_chat(const Json& messages, const std::filesystem::path& path, std::size_t line) {
  PQ_CHECK(messages.is_array(), "{}:{}: \"messages\" is not an array", path.string(), line);
  std::string text;
  for (std::size_t i = 0; i < messages.size(); ++i) {
    const Json& message = messages[i];
    PQ_CHECK(message.is_object() && message.contains("role") && message.contains("content") &&
                 message.at("role").is_string() && message.at("content").is_string(),
             "{}:{}: message {} needs string \"role\" and \"content\" fields", path.string(), line,
             i);
    text += message.at("role").get<std::string>();
    text += ": ";
    text += message.at("content").get<std::string>();
    text += '\n';
  }
  return text;
}

std::vector<std::string> read_jsonl(std::string_view content, const std::filesystem::path& path) {
  std::vector<std::string> documents;
  std::size_t line_number = 0;
  for (std::size_t begin = 0; begin < content.size();) {
    ++line_number;
    std::size_t end = content.find('\n', begin);
    if (end == std::string_view::npos) end = content.size();
    const std::string_view line = content.substr(begin, end - begin);
    begin = end + 1;
    if (is_blank(line)) continue;
    const Json record = parse_json(line, fmt::format("{}:{}", path.string(), line_number));
    PQ_CHECK(record.is_object(), "{}:{}: expected a JSON object", path.string(), line_number);
    if (record.contains("text")) {
      PQ_CHECK(record.at("text").is_string(), "{}:{}: \"text\" is not a string", path.string(),
               line_number);
      documents.push_back(record.at("text").get<std::string>());
    } else if (record.contains("messages")) {
      documents.push_back(render_chat(record.at("messages"), path, line_number));
    } else {
      fail("{}:{}: expected a \"text\" string or a \"messages\" array", path.string(), line_number);
    }
  }
  return documents;
}

}  // namespace

std::vector<std::string> read_documents(const std::filesystem::path& path, TextFormat format) {
  const std::string content = read_text_file(path);
  if (format == TextFormat::kAuto) {
    format = path.extension() == ".jsonl" ? TextFormat::kJsonl : TextFormat::kPlainText;
  }
  std::vector<std::string> documents;
  if (format == TextFormat::kJsonl) {
    documents = read_jsonl(content, path);
  } else {
    check_utf8(content, path);
    documents.push_back(crlf_to_lf(content));
  }
  documents.erase(std::remove_if(documents.begin(), documents.end(),
                                 [](const std::string& text) { return text.empty(); }),
                  documents.end());
  PQ_CHECK(!documents.empty(), "{}: contains no text", path.string());
  return documents;
}

TokenDataset::TokenDataset(std::vector<std::int32_t> tokens, double heldout_fraction,
                           std::string source)
    : tokens_(std::move(tokens)), source_(std::move(source)) {
  PQ_CHECK(heldout_fraction >= 0.0 && heldout_fraction <= 1.0,
           "held-out fraction {} for {} is not within [0, 1]", heldout_fraction, source_);
  const auto heldout_size =
      static_cast<std::size_t>(std::floor(static_cast<double>(tokens_.size()) * heldout_fraction));
  heldout_begin_ = tokens_.size() - heldout_size;
}

TokenDataset TokenDataset::from_text_file(const std::filesystem::path& path,
                                          const tokenizer::Tokenizer& tokenizer, TextFormat format,
                                          double heldout_fraction) {
  std::vector<std::int32_t> tokens;
  for (const std::string& document : read_documents(path, format)) {
    const std::vector<std::int32_t> ids = tokenizer.encode(document, /*add_special_tokens=*/true);
    tokens.insert(tokens.end(), ids.begin(), ids.end());
    if (const auto eos = tokenizer.eos_id()) tokens.push_back(*eos);
  }
  return TokenDataset(std::move(tokens), heldout_fraction, path.string());
}

TokenDataset TokenDataset::from_token_id_file(const std::filesystem::path& path,
                                              std::optional<std::int32_t> vocab_size,
                                              double heldout_fraction) {
  const std::string content = read_text_file(path);
  std::vector<std::int32_t> tokens;
  std::size_t line = 1;
  for (std::size_t pos = 0; pos < content.size();) {
    const char c = content[pos];
    if (c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\v' || c == '\f') {
      line += c == '\n';
      ++pos;
      continue;
    }
    std::size_t end = pos;
    while (end < content.size() && !std::isspace(static_cast<unsigned char>(content[end]))) ++end;
    const std::string_view word(content.data() + pos, end - pos);
    std::int32_t id = -1;
    const auto [stop, error] = std::from_chars(word.data(), word.data() + word.size(), id);
    PQ_CHECK(error == std::errc() && stop == word.data() + word.size() && id >= 0,
             "{}:{}: '{}' is not a token id (a non-negative 32-bit integer)", path.string(), line,
             word);
    PQ_CHECK(!vocab_size || id < *vocab_size,
             "{}:{}: token id {} is not below the vocabulary size {}", path.string(), line, id,
             vocab_size.value_or(0));
    tokens.push_back(id);
    pos = end;
  }
  PQ_CHECK(!tokens.empty(), "{}: contains no token ids", path.string());
  return TokenDataset(std::move(tokens), heldout_fraction, path.string());
}

TokenDataset TokenDataset::from_tokens(std::vector<std::int32_t> tokens, double heldout_fraction) {
  return TokenDataset(std::move(tokens), heldout_fraction, "token list");
}

std::span<const std::int32_t> TokenDataset::calibration_tokens() const {
  return std::span(tokens_).first(heldout_begin_);
}

std::span<const std::int32_t> TokenDataset::heldout_tokens() const {
  return std::span(tokens_).subspan(heldout_begin_);
}

std::vector<std::vector<std::int32_t>> TokenDataset::calibration(std::size_t count,
                                                                 std::size_t length,
                                                                 std::uint64_t seed) const {
  PQ_CHECK(length > 0, "calibration sequence length must be positive");
  const std::span<const std::int32_t> split = calibration_tokens();
  const std::size_t windows = split.size() / length;
  PQ_CHECK(count <= windows,
           "{}: the calibration split has {} tokens, room for {} sequences of {} tokens, but {} "
           "were requested",
           source_, split.size(), windows, length, count);
  std::vector<std::size_t> order(windows);
  std::iota(order.begin(), order.end(), std::size_t{0});
  SplitMix64 random(seed);
  std::vector<std::vector<std::int32_t>> sequences;
  sequences.reserve(count);
  for (std::size_t i = 0; i < count; ++i) {
    std::swap(order[i], order[i + random.below(windows - i)]);
    const auto window = split.subspan(order[i] * length, length);
    sequences.emplace_back(window.begin(), window.end());
  }
  return sequences;
}

std::vector<std::vector<std::int32_t>> TokenDataset::heldout(std::size_t count,
                                                             std::size_t length) const {
  PQ_CHECK(length > 0, "held-out sequence length must be positive");
  const std::span<const std::int32_t> split = heldout_tokens();
  PQ_CHECK(count <= split.size() / length,
           "{}: the held-out split has {} tokens, room for {} sequences of {} tokens, but {} were "
           "requested",
           source_, split.size(), split.size() / length, length, count);
  std::vector<std::vector<std::int32_t>> sequences;
  sequences.reserve(count);
  for (std::size_t i = 0; i < count; ++i) {
    const auto window = split.subspan(i * length, length);
    sequences.emplace_back(window.begin(), window.end());
  }
  return sequences;
}

void require_dataset(const std::filesystem::path& data, bool token_ids,
                     const std::filesystem::path& model_dir) {
  PQ_CHECK(std::filesystem::is_regular_file(data), "{}: data file not found", data.string());
  PQ_CHECK(token_ids || std::filesystem::is_regular_file(model_dir / "tokenizer.json"),
           "{}: no tokenizer.json to tokenize {} with (give token ids with --token-ids)",
           model_dir.string(), data.string());
}

TokenDataset load_token_dataset(const std::filesystem::path& data, bool token_ids,
                                const std::filesystem::path& model_dir,
                                std::optional<std::int32_t> vocab_size) {
  require_dataset(data, token_ids, model_dir);
  if (token_ids) return TokenDataset::from_token_id_file(data, vocab_size);
  return TokenDataset::from_text_file(data,
                                      tokenizer::Tokenizer::load(model_dir / "tokenizer.json"));
}

}  // namespace pq::data
