#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>

#include "export/rounding.h"
#include "formats/serving.h"
#include "formats/weight_format.h"

namespace pq::exporter {

// What identifies a render of a (Linear, format): the source checkpoint (config.json and the
// safetensors headers, probe::Fingerprint::checkpoint), the rounding strategy's fingerprint (its
// options and the probe's statistics), the calibration input amax of W4A4 input scales, the
// serving target (NVFP4's scale rule depends on its kernel), and the prismaquant version. Hex
// digest.
std::string render_fingerprint(const std::filesystem::path& model_dir,
                               const RoundingStrategy& rounding,
                               const std::map<std::string, float>& input_amax,
                               formats::ServingTarget target);

// Encoded Linears kept on disk, so that each (Linear, format) is rendered (GPTQ, sweeps) once per
// work directory and every later reader (quantize's measurement, scout, export) copies the stored
// tensors instead. Entries live in root/<fingerprint>/<linear>.<format>.safetensors: the format's
// tensors named by suffix, and in __metadata__ the fingerprint, the Linear, the format, the tensor
// order and the rounding report. Opening a cache removes the directories of other fingerprints
// under root, so a stale render is never read and the disk holds one fingerprint's renders. Each
// entry is written to a temporary file renamed into place (SafetensorsWriter); an entry that does
// not parse or does not match is a miss. Not thread-safe.
class RenderCache {
 public:
  RenderCache(std::filesystem::path root, std::string fingerprint);

  struct Entry {
    formats::EncodedWeight encoded;
    nlohmann::json report;  // RoundingStrategy::encoding_report at render time
  };
  std::optional<Entry> load(std::string_view linear, std::string_view format) const;
  void store(std::string_view linear, std::string_view format,
             const formats::EncodedWeight& encoded, const nlohmann::json& report) const;

  const std::filesystem::path& directory() const { return directory_; }
  const std::string& fingerprint() const { return fingerprint_; }
  std::int64_t hits() const { return hits_; }
  std::int64_t stores() const { return stores_; }

 private:
  std::filesystem::path entry_path(std::string_view linear, std::string_view format) const;

  std::filesystem::path directory_;
  std::string fingerprint_;
  // Counted from every thread that loads or stores (the KL-Fisher pass renders experts in
  // parallel).
  mutable std::atomic<std::int64_t> hits_ = 0;
  mutable std::atomic<std::int64_t> stores_ = 0;
};

}  // namespace pq::exporter
