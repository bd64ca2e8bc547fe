#include "io/safetensors.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "common/error.h"
#include "common/json_reader.h"

namespace pq::io {

using nlohmann::json;

std::int64_t TensorInfo::numel() const {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

namespace {

// Deepest nesting either file kind can legitimately have (a header is object -> entry -> shape
// array; an index is object -> weight_map); anything deeper is rejected before it can cost memory.
constexpr int kMaxHeaderDepth = 16;

// Error messages are one line, so names that reach them must not carry line breaks.
bool has_control_character(std::string_view text) {
  return std::any_of(text.begin(), text.end(),
                     [](char c) { return static_cast<unsigned char>(c) < 0x20 || c == 0x7f; });
}

// Element and byte counts stay below 2^63 so TensorInfo::numel() (signed) cannot overflow.
std::uint64_t checked_mul(std::uint64_t a, std::uint64_t b, std::string_view label,
                          std::string_view name) {
  constexpr auto kLimit = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
  PQ_CHECK(b == 0 || a <= kLimit / b, "{}: tensor \"{}\": shape is too large", label, name);
  return a * b;
}

TensorInfo parse_entry(const std::string& name, const json& entry, std::string_view label) {
  PQ_CHECK(entry.is_object(), "{}: tensor \"{}\": entry is not an object", label, name);
  for (const auto& [key, value] : entry.items()) {
    PQ_CHECK(key == "dtype" || key == "shape" || key == "data_offsets",
             "{}: tensor \"{}\": unknown field {}", label, name, quoted_json_string(key));
  }
  PQ_CHECK(entry.contains("dtype") && entry["dtype"].is_string(),
           "{}: tensor \"{}\": missing or non-string dtype", label, name);
  const auto dtype_text = entry["dtype"].get<std::string>();
  const auto dtype = parse_dtype(dtype_text);
  PQ_CHECK(dtype.has_value(), "{}: tensor \"{}\": unsupported dtype {}", label, name,
           quoted_json_string(dtype_text));
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
    PQ_CHECK(dim.is_number_unsigned(),
             "{}: tensor \"{}\": shape has a non-integer or negative dimension", label, name);
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
  PQ_CHECK(info.data_begin <= info.data_end,
           "{}: tensor \"{}\": data_offsets [{}, {}] run backwards", label, name, info.data_begin,
           info.data_end);
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
  const json root = parse_json(text, fmt::format("{}: header", label), kMaxHeaderDepth);
  PQ_CHECK(root.is_object(), "{}: header is not a JSON object", label);

  SafetensorsHeader header;
  header.data_offset = 8 + header_len;
  const std::uint64_t data_size = file.size() - header.data_offset;
  for (const auto& [name, entry] : root.items()) {
    if (name == "__metadata__") {
      PQ_CHECK(entry.is_object(), "{}: __metadata__ is not an object", label);
      for (const auto& [key, value] : entry.items()) {
        PQ_CHECK(value.is_string(), "{}: __metadata__ value of {} is not a string", label,
                 quoted_json_string(key));
        header.metadata[key] = value.get<std::string>();
      }
      continue;
    }
    PQ_CHECK(!name.empty(), "{}: a tensor has an empty name", label);
    PQ_CHECK(!has_control_character(name), "{}: tensor name {} contains a control character", label,
             quoted_json_string(name));
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
    PQ_CHECK(
        t.data_end <= data_size,
        "{}: tensor \"{}\": data_offsets [{}, {}] run past the {} byte data section (truncated?)",
        label, t.name, t.data_begin, t.data_end, data_size);
    PQ_CHECK(t.data_begin >= cursor, "{}: tensor \"{}\" overlaps tensor \"{}\"", label, t.name,
             previous ? previous->name : "");
    PQ_CHECK(t.data_begin == cursor,
             "{}: tensor \"{}\": {} unused bytes before it (data is not contiguous)", label, t.name,
             t.data_begin - cursor);
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

namespace {

bool is_plain_file_name(std::string_view name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string_view::npos &&
         !has_control_character(name);
}

}  // namespace

SafetensorsIndex parse_safetensors_index(std::string_view text, std::string_view label) {
  const json root = parse_json(text, fmt::format("{}: index", label), kMaxHeaderDepth);
  PQ_CHECK(root.is_object(), "{}: index is not a JSON object", label);
  const auto weight_map = root.find("weight_map");
  PQ_CHECK(weight_map != root.end() && weight_map->is_object(),
           "{}: index has no weight_map object", label);
  SafetensorsIndex index;
  for (const auto& [tensor, file] : weight_map->items()) {
    PQ_CHECK(!has_control_character(tensor),
             "{}: weight_map tensor name {} contains a control character", label,
             quoted_json_string(tensor));
    PQ_CHECK(file.is_string(), "{}: weight_map entry \"{}\" is not a file name", label, tensor);
    const auto& shard = file.get_ref<const std::string&>();
    PQ_CHECK(is_plain_file_name(shard), "{}: weight_map entry \"{}\" names an invalid shard {}",
             label, tensor, quoted_json_string(shard));
    index.weight_map.emplace(tensor, shard);
  }
  PQ_CHECK(!index.weight_map.empty(), "{}: weight_map is empty", label);
  // transformers and huggingface_hub write {"metadata": {"total_size": <bytes>}}; other keys in
  // metadata (e.g. total_parameters) are informational and ignored.
  if (const auto metadata = root.find("metadata"); metadata != root.end()) {
    PQ_CHECK(metadata->is_object(), "{}: index metadata is not an object", label);
    if (const auto total = metadata->find("total_size"); total != metadata->end()) {
      PQ_CHECK(total->is_number_unsigned(),
               "{}: index metadata.total_size is not a non-negative integer", label);
      index.total_size = total->get<std::uint64_t>();
    }
  }
  return index;
}

Checkpoint Checkpoint::open(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  constexpr std::string_view kIndexName = "model.safetensors.index.json";
  Checkpoint ckpt;
  std::error_code ec;
  if (fs::is_regular_file(path, ec)) {
    ckpt.directory_ = path.parent_path();
    if (path.filename().string().ends_with(".index.json")) {
      ckpt.open_sharded(path);
    } else {
      ckpt.add_file(std::make_unique<SafetensorsFile>(path));
    }
  } else {
    PQ_CHECK(fs::is_directory(path, ec), "{}: no such checkpoint file or directory", path.string());
    ckpt.directory_ = path;
    if (fs::exists(path / kIndexName, ec)) {
      ckpt.open_sharded(path / kIndexName);
    } else {
      PQ_CHECK(fs::exists(path / "model.safetensors", ec), "{}: no model.safetensors or {}",
               path.string(), kIndexName);
      ckpt.add_file(std::make_unique<SafetensorsFile>(path / "model.safetensors"));
    }
  }
  std::sort(ckpt.names_.begin(), ckpt.names_.end());
  return ckpt;
}

void Checkpoint::open_sharded(const std::filesystem::path& index_path) {
  const std::string label = index_path.string();
  const SafetensorsIndex index = parse_safetensors_index(read_text_file(index_path), label);
  std::set<std::string> shards;
  for (const auto& [tensor, shard] : index.weight_map) shards.insert(shard);
  for (const auto& shard : shards) {
    const auto shard_path = index_path.parent_path() / shard;
    std::error_code ec;
    PQ_CHECK(std::filesystem::is_regular_file(shard_path, ec),
             "{}: shard \"{}\" listed in the index is missing", label, shard);
    add_file(std::make_unique<SafetensorsFile>(shard_path));
  }
  // The index and the shards must agree both ways, so a reader trusting either sees the same model.
  for (const auto& [tensor, shard] : index.weight_map) {
    const auto it = locations_.find(tensor);
    PQ_CHECK(it != locations_.end() && it->second.file->path().filename() == shard,
             "{}: index places tensor \"{}\" in \"{}\", which does not contain it", label, tensor,
             shard);
  }
  for (const auto& [tensor, location] : locations_) {
    PQ_CHECK(index.weight_map.count(tensor) != 0, "{}: tensor \"{}\" is not listed in {}",
             location.file->path().string(), tensor, label);
  }
}

void Checkpoint::add_file(std::unique_ptr<SafetensorsFile> file) {
  for (const auto& t : file->tensors()) {
    const auto [it, inserted] = locations_.emplace(t.name, Location{file.get(), &t});
    PQ_CHECK(inserted, "{}: tensor \"{}\" is also in {}", file->path().string(), t.name,
             it->second.file->path().string());
    names_.push_back(t.name);
  }
  files_.push_back(std::move(file));
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

const TensorInfo& Checkpoint::info(std::string_view name) const {
  return *locate(name).info;
}

TensorView Checkpoint::view(std::string_view name) const {
  return locate(name).file->view(name);
}

void Checkpoint::release(std::string_view name) const {
  locate(name).file->release(name);
}

std::uint64_t Checkpoint::total_tensor_bytes() const {
  std::uint64_t total = 0;
  for (const auto& [name, loc] : locations_) total += loc.info->nbytes();
  return total;
}

}  // namespace pq::io
