#include "io/safetensors.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <set>

#include <nlohmann/json.hpp>

#include "common/error.h"

namespace pq::io {

using nlohmann::json;

std::int64_t TensorInfo::numel() const {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

namespace {

// nlohmann keeps the last of duplicate keys silently; a checkpoint with two entries of one name
// is ambiguous, so the parse callback rejects them at any depth.
json parse_json_rejecting_duplicates(std::string_view text, std::string_view label,
                                     std::string_view what) {
  std::vector<std::set<std::string>> keys_by_depth;
  std::string duplicate;
  auto callback = [&](int depth, json::parse_event_t event, json& parsed) {
    const auto d = static_cast<std::size_t>(depth);
    if (event == json::parse_event_t::object_start) {
      if (keys_by_depth.size() <= d + 1) keys_by_depth.resize(d + 2);
      keys_by_depth[d + 1].clear();
    } else if (event == json::parse_event_t::key) {
      if (keys_by_depth.size() <= d) keys_by_depth.resize(d + 1);
      const auto& key = parsed.get_ref<const std::string&>();
      if (!keys_by_depth[d].insert(key).second && duplicate.empty()) duplicate = key;
    }
    return true;
  };
  json parsed = json::parse(text.begin(), text.end(), callback, /*allow_exceptions=*/false);
  PQ_CHECK(!parsed.is_discarded(), "{}: {} is not valid JSON", label, what);
  PQ_CHECK(duplicate.empty(), "{}: {} has duplicate key \"{}\"", label, what, duplicate);
  return parsed;
}

std::uint64_t checked_mul(std::uint64_t a, std::uint64_t b, std::string_view label,
                          std::string_view name) {
  PQ_CHECK(b == 0 || a <= std::numeric_limits<std::uint64_t>::max() / b,
           "{}: tensor \"{}\": shape is too large", label, name);
  return a * b;
}

TensorInfo parse_entry(const std::string& name, const json& entry, std::string_view label) {
  PQ_CHECK(entry.is_object(), "{}: tensor \"{}\": entry is not an object", label, name);
  for (const auto& [key, value] : entry.items()) {
    PQ_CHECK(key == "dtype" || key == "shape" || key == "data_offsets",
             "{}: tensor \"{}\": unknown field \"{}\"", label, name, key);
  }
  PQ_CHECK(entry.contains("dtype") && entry["dtype"].is_string(),
           "{}: tensor \"{}\": missing or non-string dtype", label, name);
  const auto dtype_text = entry["dtype"].get<std::string>();
  const auto dtype = parse_dtype(dtype_text);
  PQ_CHECK(dtype.has_value(), "{}: tensor \"{}\": unsupported dtype \"{}\"", label, name,
           dtype_text);
  PQ_CHECK(entry.contains("shape") && entry["shape"].is_array(),
           "{}: tensor \"{}\": missing or non-array shape", label, name);
  PQ_CHECK(entry.contains("data_offsets") && entry["data_offsets"].is_array() &&
               entry["data_offsets"].size() == 2,
           "{}: tensor \"{}\": data_offsets must be [begin, end]", label, name);
  TensorInfo info;
  info.name = name;
  info.dtype = *dtype;
  std::uint64_t numel = 1;
  for (const auto& dim : entry["shape"]) {
    PQ_CHECK(dim.is_number_unsigned(), "{}: tensor \"{}\": shape has a non-integer or negative "
             "dimension", label, name);
    const auto d = dim.get<std::uint64_t>();
    PQ_CHECK(d <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()),
             "{}: tensor \"{}\": dimension {} is too large", label, name, d);
    numel = checked_mul(numel, d, label, name);
    info.shape.push_back(static_cast<std::int64_t>(d));
  }
  for (const auto& off : entry["data_offsets"]) {
    PQ_CHECK(off.is_number_unsigned(),
             "{}: tensor \"{}\": data_offsets must be non-negative integers", label, name);
  }
  info.data_begin = entry["data_offsets"][0].get<std::uint64_t>();
  info.data_end = entry["data_offsets"][1].get<std::uint64_t>();
  PQ_CHECK(info.data_begin <= info.data_end, "{}: tensor \"{}\": data_offsets [{}, {}] run "
           "backwards", label, name, info.data_begin, info.data_end);
  const std::uint64_t expected = checked_mul(numel, dtype_size(info.dtype), label, name);
  PQ_CHECK(info.nbytes() == expected,
           "{}: tensor \"{}\": holds {} bytes but shape and dtype {} need {}", label, name,
           info.nbytes(), dtype_text, expected);
  return info;
}

}  // namespace

SafetensorsHeader parse_safetensors_header(std::span<const std::uint8_t> file,
                                           std::string_view label) {
  PQ_CHECK(file.size() >= 8, "{}: file is {} bytes, too short for a safetensors header", label,
           file.size());
  std::uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | file[static_cast<std::size_t>(i)];
  PQ_CHECK(header_len <= kMaxHeaderBytes, "{}: header length {} exceeds the {} byte limit", label,
           header_len, kMaxHeaderBytes);
  PQ_CHECK(header_len <= file.size() - 8,
           "{}: header length {} runs past the end of the {} byte file (truncated?)", label,
           header_len, file.size());
  const std::string_view text(reinterpret_cast<const char*>(file.data()) + 8, header_len);
  const json root = parse_json_rejecting_duplicates(text, label, "header");
  PQ_CHECK(root.is_object(), "{}: header is not a JSON object", label);

  SafetensorsHeader header;
  header.data_offset = 8 + header_len;
  const std::uint64_t data_size = file.size() - header.data_offset;
  for (const auto& [name, entry] : root.items()) {
    if (name == "__metadata__") {
      PQ_CHECK(entry.is_object(), "{}: __metadata__ is not an object", label);
      for (const auto& [key, value] : entry.items()) {
        PQ_CHECK(value.is_string(), "{}: __metadata__ value of \"{}\" is not a string", label,
                 key);
        header.metadata[key] = value.get<std::string>();
      }
      continue;
    }
    PQ_CHECK(!name.empty(), "{}: a tensor has an empty name", label);
    header.tensors.push_back(parse_entry(name, entry, label));
  }
  std::sort(header.tensors.begin(), header.tensors.end(), [](const auto& a, const auto& b) {
    return a.data_begin != b.data_begin ? a.data_begin < b.data_begin : a.data_end < b.data_end;
  });
  // The data section must be exactly tiled by the tensors: no overlap (one byte read as two
  // tensors), no hole (bytes that belong to nothing), nothing past the end.
  std::uint64_t cursor = 0;
  const TensorInfo* previous = nullptr;
  for (const auto& t : header.tensors) {
    PQ_CHECK(t.data_end <= data_size,
             "{}: tensor \"{}\": data_offsets [{}, {}] run past the {} byte data section "
             "(truncated?)", label, t.name, t.data_begin, t.data_end, data_size);
    PQ_CHECK(t.data_begin >= cursor, "{}: tensor \"{}\" overlaps tensor \"{}\"", label, t.name,
             previous ? previous->name : "");
    PQ_CHECK(t.data_begin == cursor, "{}: tensor \"{}\": {} unused bytes before it (data is not "
             "contiguous)", label, t.name, t.data_begin - cursor);
    cursor = t.data_end;
    previous = &t;
  }
  PQ_CHECK(cursor == data_size, "{}: {} trailing bytes after the last tensor", label,
           data_size - cursor);
  return header;
}

std::vector<float> TensorView::to_f32() const {
  std::vector<float> out(static_cast<std::size_t>(info->numel()));
  decode_to_f32(info->dtype, bytes, out);
  return out;
}

SafetensorsFile::SafetensorsFile(const std::filesystem::path& path) : file_(path) {
  header_ = parse_safetensors_header(file_.bytes(), path.string());
  for (std::size_t i = 0; i < header_.tensors.size(); ++i) {
    by_name_.emplace(header_.tensors[i].name, i);
  }
}

const TensorInfo* SafetensorsFile::find(std::string_view name) const {
  auto it = by_name_.find(std::string(name));
  return it == by_name_.end() ? nullptr : &header_.tensors[it->second];
}

TensorView SafetensorsFile::view(std::string_view name) const {
  const TensorInfo* info = find(name);
  PQ_CHECK(info != nullptr, "{}: no tensor \"{}\"", path().string(), name);
  return {info, file_.bytes().subspan(header_.data_offset + info->data_begin, info->nbytes())};
}

void SafetensorsFile::release(std::string_view name) const {
  if (const TensorInfo* info = find(name)) {
    file_.release(header_.data_offset + info->data_begin, info->nbytes());
  }
}

Checkpoint Checkpoint::open(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  Checkpoint ckpt;
  std::error_code ec;
  if (fs::is_regular_file(path, ec)) {
    ckpt.directory_ = path.parent_path();
    ckpt.files_.push_back(std::make_unique<SafetensorsFile>(path));
  } else {
    PQ_CHECK(fs::is_directory(path, ec), "{}: no such checkpoint file or directory",
             path.string());
    ckpt.directory_ = path;
    const fs::path index_path = path / "model.safetensors.index.json";
    const fs::path single_path = path / "model.safetensors";
    if (fs::exists(index_path, ec)) {
      const std::string text = read_text_file(index_path);
      const json index = parse_json_rejecting_duplicates(text, index_path.string(), "index");
      PQ_CHECK(index.is_object() && index.contains("weight_map") &&
                   index["weight_map"].is_object(),
               "{}: index has no weight_map object", index_path.string());
      std::map<std::string, std::string> wanted;  // tensor -> shard file name
      std::set<std::string> shards;
      for (const auto& [tensor, file] : index["weight_map"].items()) {
        PQ_CHECK(file.is_string(), "{}: weight_map entry \"{}\" is not a file name",
                 index_path.string(), tensor);
        const auto shard = file.get<std::string>();
        PQ_CHECK(!shard.empty() && shard.find('/') == std::string::npos && shard != "." &&
                     shard != "..",
                 "{}: weight_map entry \"{}\" names an invalid shard \"{}\"",
                 index_path.string(), tensor, shard);
        wanted[tensor] = shard;
        shards.insert(shard);
      }
      PQ_CHECK(!shards.empty(), "{}: weight_map is empty", index_path.string());
      std::map<std::string, const SafetensorsFile*> by_shard;
      for (const auto& shard : shards) {
        PQ_CHECK(fs::exists(path / shard, ec), "{}: shard \"{}\" listed in the index is missing",
                 index_path.string(), shard);
        ckpt.files_.push_back(std::make_unique<SafetensorsFile>(path / shard));
        by_shard[shard] = ckpt.files_.back().get();
      }
      for (const auto& [tensor, shard] : wanted) {
        PQ_CHECK(by_shard[shard]->find(tensor) != nullptr,
                 "{}: index places tensor \"{}\" in \"{}\", which does not contain it",
                 index_path.string(), tensor, shard);
      }
      for (const auto& file : ckpt.files_) {
        for (const auto& t : file->tensors()) {
          auto it = wanted.find(t.name);
          PQ_CHECK(it != wanted.end() && path / it->second == file->path(),
                   "{}: tensor \"{}\" is not listed in the index for this shard",
                   file->path().string(), t.name);
        }
      }
    } else {
      PQ_CHECK(fs::exists(single_path, ec),
               "{}: no model.safetensors or model.safetensors.index.json", path.string());
      ckpt.files_.push_back(std::make_unique<SafetensorsFile>(single_path));
    }
  }
  for (const auto& file : ckpt.files_) {
    for (const auto& t : file->tensors()) {
      const bool inserted = ckpt.locations_.emplace(t.name, Location{file.get(), &t}).second;
      PQ_CHECK(inserted, "{}: tensor \"{}\" appears in more than one shard",
               file->path().string(), t.name);
      ckpt.names_.push_back(t.name);
    }
  }
  std::sort(ckpt.names_.begin(), ckpt.names_.end());
  return ckpt;
}

const Checkpoint::Location& Checkpoint::locate(std::string_view name) const {
  auto it = locations_.find(std::string(name));
  PQ_CHECK(it != locations_.end(), "{}: checkpoint has no tensor \"{}\"", directory_.string(),
           name);
  return it->second;
}

bool Checkpoint::contains(std::string_view name) const {
  return locations_.count(std::string(name)) != 0;
}

const TensorInfo& Checkpoint::info(std::string_view name) const { return *locate(name).info; }

TensorView Checkpoint::view(std::string_view name) const { return locate(name).file->view(name); }

void Checkpoint::release(std::string_view name) const { locate(name).file->release(name); }

std::uint64_t Checkpoint::total_tensor_bytes() const {
  std::uint64_t total = 0;
  for (const auto& [name, loc] : locations_) total += loc.info->nbytes();
  return total;
}

}  // namespace pq::io
