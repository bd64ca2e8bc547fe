#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace pq::probe {

// A 64-bit FNV-1a digest of a stage's inputs and options. Stages store it in their artifacts and
// reuse an artifact (or resume from a checkpoint) only when the digest of the current inputs
// matches; it detects changed inputs, it is not a cryptographic hash.
class Fingerprint {
 public:
  Fingerprint& add(std::string_view text);
  Fingerprint& add(std::uint64_t value);
  // A labelled field, so that ("ab","c") and ("a","bc") differ.
  Fingerprint& field(std::string_view key, std::string_view value);
  Fingerprint& field(std::string_view key, std::uint64_t value);
  // The file's whole content.
  Fingerprint& file_content(const std::filesystem::path& path);
  // A checkpoint's identity without reading its weights: config.json, and for every safetensors
  // file its size and its header (names, dtypes, shapes, offsets).
  Fingerprint& checkpoint(const std::filesystem::path& model_dir);
  // Calibration data as the runtime reads it: token ids as they are, text with the checkpoint's
  // tokenizer.json that turns it into tokens; then the data file's content.
  Fingerprint& calibration_data(const std::filesystem::path& model_dir,
                                const std::filesystem::path& data, bool token_ids);
  // Token windows (a held-out evaluation's): how many, and each one's length and ids.
  Fingerprint& token_windows(std::span<const std::vector<std::int32_t>> windows);
  std::string hex() const;

 private:
  std::uint64_t state_ = 0xcbf29ce484222325ull;  // FNV-1a 64 offset basis
};

}  // namespace pq::probe
