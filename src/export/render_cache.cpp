// Encoded Linears on disk, one file per (Linear, format), keyed by the render fingerprint.
#include "export/render_cache.h"

#include <fmt/format.h>

#include <bit>
#include <system_error>
#include <vector>

#include "common/error.h"
#include "common/json_reader.h"
#include "io/safetensors.h"
#include "io/safetensors_writer.h"
#include "probe/fingerprint.h"

namespace pq::exporter {

namespace fs = std::filesystem;

std::string render_fingerprint(const fs::path& model_dir, const RoundingStrategy& rounding,
                               const std::map<std::string, float>& input_amax,
                               formats::ServingTarget target) {
  PQ_CHECK(!rounding.fingerprint().empty(), "the {} rounding's encodings cannot be cached",
           rounding.name());
  probe::Fingerprint f;
  f.field("stage", "render/1");
  f.field("version", PQ_VERSION);
  f.checkpoint(model_dir);
  f.field("rounding", rounding.fingerprint());
  f.field("serve_on", formats::serving_target_name(target));
  for (const auto& [linear, amax] : input_amax) f.field(linear, std::bit_cast<std::uint32_t>(amax));
  return f.hex();
}

RenderCache::RenderCache(fs::path root, std::string fingerprint)
    : directory_(root / fingerprint), fingerprint_(std::move(fingerprint)) {
  PQ_CHECK(!fingerprint_.empty(), "render cache {}: no fingerprint", root.string());
  std::error_code ec;
  fs::create_directories(directory_, ec);
  PQ_CHECK(!ec, "cannot create the render cache {}: {}", directory_.string(), ec.message());
  for (const fs::directory_entry& entry : fs::directory_iterator(root)) {
    if (entry.path().filename() == fingerprint_) continue;
    fs::remove_all(entry.path(), ec);
    PQ_CHECK(!ec, "cannot remove the stale render cache {}: {}", entry.path().string(),
             ec.message());
  }
}

fs::path RenderCache::entry_path(std::string_view linear, std::string_view format) const {
  return directory_ / fmt::format("{}.{}.safetensors", linear, format);
}

std::optional<RenderCache::Entry> RenderCache::load(std::string_view linear,
                                                    std::string_view format) const {
  const fs::path path = entry_path(linear, format);
  if (!fs::exists(path)) return std::nullopt;
  try {
    const io::SafetensorsFile file(path);
    const auto& meta = file.metadata();
    const auto field = [&](const char* key) -> const std::string& {
      const auto it = meta.find(key);
      PQ_CHECK(it != meta.end(), "no {}", key);
      return it->second;
    };
    if (field("fingerprint") != fingerprint_ || field("linear") != linear ||
        field("format") != format) {
      return std::nullopt;
    }
    Entry entry;
    entry.encoded.format = field("encoded_format");
    const nlohmann::json shape = parse_json(field("shape"), "render cache shape");
    entry.encoded.shape = {shape.at(0).get<std::int64_t>(), shape.at(1).get<std::int64_t>()};
    // The format's tensor order, which the writer (ordered by element size) does not keep.
    for (const auto& suffix : parse_json(field("tensors"), "render cache tensor list")) {
      const io::TensorView view = file.view(suffix.get<std::string>());
      formats::EncodedTensor tensor;
      tensor.spec = {view.info->name, view.info->dtype, view.info->shape};
      tensor.bytes.assign(view.bytes.begin(), view.bytes.end());
      entry.encoded.tensors.push_back(std::move(tensor));
    }
    entry.report = parse_json(field("report"), "render cache report");
    ++hits_;
    return entry;
  } catch (const Error&) {
    return std::nullopt;
  } catch (const nlohmann::json::exception&) {
    return std::nullopt;
  }
}

void RenderCache::store(std::string_view linear, std::string_view format,
                        const formats::EncodedWeight& encoded, const nlohmann::json& report) const {
  nlohmann::json order = nlohmann::json::array();
  for (const formats::EncodedTensor& tensor : encoded.tensors) order.push_back(tensor.spec.suffix);
  io::SafetensorsMetadata meta = {
      {"fingerprint", fingerprint_},
      {"linear", std::string(linear)},
      {"format", std::string(format)},
      {"encoded_format", encoded.format},
      {"shape", nlohmann::json::array({encoded.shape.out, encoded.shape.in}).dump()},
      {"tensors", order.dump()},
      {"report", report.dump()}};
  io::SafetensorsWriter writer(entry_path(linear, format), std::move(meta));
  for (const formats::EncodedTensor& tensor : encoded.tensors) {
    writer.add(tensor.spec.suffix, tensor.spec.dtype, tensor.spec.shape, tensor.bytes);
  }
  writer.commit();
  ++stores_;
}

}  // namespace pq::exporter
