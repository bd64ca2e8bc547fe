#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace pq {

// Deepest nesting any JSON the tool reads may have (tokenizer.json's nested normalizer sequences
// are the deepest real files, about 10 levels). nlohmann's parser is iterative, but copying or
// comparing a value recurses once per level: a config.json nested 150,000 deep overflowed the
// stack of every command.
inline constexpr int kMaxJsonDepth = 64;

// `text` parsed strictly as JSON. A syntax error, a number beyond double range, nesting deeper
// than max_depth or a key repeated in one object (nlohmann would keep the last one silently; the
// file is ambiguous) is a one-line pq::Error starting with `label`; raw input bytes never reach
// the message.
nlohmann::json parse_json(std::string_view text, std::string_view label,
                          int max_depth = kMaxJsonDepth);

// `text` as a quoted JSON string with control characters escaped: a name from a file, fit for a
// one-line message.
std::string quoted_json_string(std::string_view text);

// The file at `path`, parsed by parse_json with the path as its label.
nlohmann::json read_json_file(const std::filesystem::path& path, int max_depth = kMaxJsonDepth);

}  // namespace pq
