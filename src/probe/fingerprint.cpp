#include "probe/fingerprint.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/error.h"
#include "common/file_util.h"

namespace pq::probe {

Fingerprint& Fingerprint::add(std::string_view text) {
  constexpr std::uint64_t kPrime = 0x100000001b3ull;  // FNV-1a 64 prime
  for (const char c : text) {
    state_ ^= static_cast<std::uint8_t>(c);
    state_ *= kPrime;
  }
  return *this;
}

Fingerprint& Fingerprint::add(std::uint64_t value) {
  char bytes[sizeof value];
  std::memcpy(bytes, &value, sizeof value);
  return add(std::string_view(bytes, sizeof bytes));
}

Fingerprint& Fingerprint::field(std::string_view key, std::string_view value) {
  add(key.size()).add(key).add(value.size()).add(value);
  return *this;
}

Fingerprint& Fingerprint::field(std::string_view key, std::uint64_t value) {
  add(key.size()).add(key).add(value);
  return *this;
}

Fingerprint& Fingerprint::token_windows(std::span<const std::vector<std::int32_t>> windows) {
  field("windows", windows.size());
  for (const std::vector<std::int32_t>& window : windows) {
    add(window.size());
    for (const std::int32_t token : window) add(static_cast<std::uint64_t>(token));
  }
  return *this;
}

Fingerprint& Fingerprint::file_content(const std::filesystem::path& path) {
  const MappedFile file(path);
  const auto* data = reinterpret_cast<const char*>(file.data());
  return field(path.filename().string(), std::string_view(data, file.size()));
}

Fingerprint& Fingerprint::calibration_data(const std::filesystem::path& model_dir,
                                           const std::filesystem::path& data, bool token_ids) {
  if (token_ids) {
    field("token_ids", 1);
  } else {
    file_content(model_dir / "tokenizer.json");
  }
  return file_content(data);
}

Fingerprint& Fingerprint::checkpoint(const std::filesystem::path& model_dir) {
  file_content(model_dir / "config.json");
  std::vector<std::filesystem::path> shards;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(model_dir, error)) {
    if (entry.path().extension() == ".safetensors") shards.push_back(entry.path());
  }
  PQ_CHECK(!error, "{}: cannot list the directory: {}", model_dir.string(), error.message());
  std::sort(shards.begin(), shards.end());
  for (const auto& shard : shards) {
    const MappedFile file(shard);
    // safetensors: 8-byte little-endian header length, then the JSON header.
    std::uint64_t header_size = 0;
    PQ_CHECK(file.size() >= 8, "{}: not a safetensors file", shard.string());
    std::memcpy(&header_size, file.data(), 8);
    PQ_CHECK(header_size <= file.size() - 8, "{}: header larger than the file", shard.string());
    const auto* header = reinterpret_cast<const char*>(file.data() + 8);
    field(shard.filename().string(), file.size());
    add(std::string_view(header, header_size));
  }
  return *this;
}

std::string Fingerprint::hex() const {
  return fmt::format("{:016x}", state_);
}

}  // namespace pq::probe
