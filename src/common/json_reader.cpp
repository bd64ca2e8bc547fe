#include "common/json_reader.h"

#include <set>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/file_util.h"

namespace pq {

std::string quoted_json_string(std::string_view text) {
  return nlohmann::json(std::string(text))
      .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

nlohmann::json parse_json(std::string_view text, std::string_view label, int max_depth) {
  using json = nlohmann::json;
  std::vector<std::set<std::string>> keys_by_depth;
  auto callback = [&](int depth, json::parse_event_t event, json& parsed) {
    PQ_CHECK(depth <= max_depth, "{} nests deeper than {} levels", label, max_depth);
    const auto d = static_cast<std::size_t>(depth);
    if (event == json::parse_event_t::object_start) {
      if (keys_by_depth.size() <= d + 1) keys_by_depth.resize(d + 2);
      keys_by_depth[d + 1].clear();
    } else if (event == json::parse_event_t::key) {
      if (keys_by_depth.size() <= d) keys_by_depth.resize(d + 1);
      const auto& key = parsed.get_ref<const std::string&>();
      PQ_CHECK(keys_by_depth[d].insert(key).second, "{} has duplicate key {}", label,
               quoted_json_string(key));
    }
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), callback);
  } catch (const json::parse_error& e) {
    // e.byte is 1-based; the parser's own message may quote raw input bytes, so it stays out.
    fail("{} is not valid JSON (syntax error at byte {})", label, e.byte);
  } catch (const json::out_of_range&) {
    // Thrown for numbers beyond double range such as 1e400.
    fail("{} is not valid JSON (a number is out of range)", label);
  }
}

nlohmann::json read_json_file(const std::filesystem::path& path, int max_depth) {
  return parse_json(read_text_file(path), path.string(), max_depth);
}

}  // namespace pq
