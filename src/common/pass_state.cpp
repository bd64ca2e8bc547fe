#include "common/pass_state.h"

#include <fmt/format.h>

#include <cstdint>
#include <exception>
#include <nlohmann/json.hpp>

#include "common/file_util.h"
#include "common/json_reader.h"

namespace pq {

namespace {

constexpr const char* kStateJson = "state.json";

}  // namespace

std::size_t read_pass_steps_done(const std::filesystem::path& pass_dir,
                                 const std::string& fingerprint, std::size_t steps_total) {
  const std::filesystem::path path = pass_dir / kStateJson;
  try {
    const auto j = read_json_file(path);
    if (j.at("fingerprint").get<std::string>() != fingerprint) return 0;
    const nlohmann::json& done = j.at("steps_done");
    if (!done.is_number_unsigned() || done.get<std::uint64_t>() > steps_total) {
      fmt::print(stderr,
                 "warning: {}: steps_done {} is not a step count of this pass (0 to {}); "
                 "starting over\n",
                 path.string(), done.dump(), steps_total);
      return 0;
    }
    return static_cast<std::size_t>(done.get<std::uint64_t>());
  } catch (const std::exception&) {
    return 0;  // absent, damaged or foreign: start over
  }
}

void write_pass_steps_done(const std::filesystem::path& pass_dir, const std::string& fingerprint,
                           std::size_t steps_done) {
  write_text_file_atomic(
      pass_dir / kStateJson,
      nlohmann::json{{"fingerprint", fingerprint}, {"steps_done", steps_done}}.dump() + "\n");
}

}  // namespace pq
