#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "common/file_util.h"
#include "io/dtype.h"

namespace pq::io {

// Where one tensor lives inside a safetensors file.
struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::uint64_t data_begin = 0;  // offsets relative to the start of the data section
  std::uint64_t data_end = 0;

  std::int64_t numel() const;
  std::uint64_t nbytes() const { return data_end - data_begin; }
};

// A parsed, validated safetensors header.
struct SafetensorsHeader {
  std::vector<TensorInfo> tensors;  // in data-offset order
  std::map<std::string, std::string> metadata;
  std::uint64_t data_offset = 0;  // byte position of the data section in the file
};

// Largest header we accept: the reference reader's MAX_HEADER_SIZE (huggingface/safetensors
// safetensors/src/tensor.rs). Real checkpoints stay far below it (a 2,000-tensor shard has a
// ~250 KB header), and it bounds what a hostile length field can make us allocate.
inline constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

// Parses and validates the header of a safetensors file held in `file` (the whole file's bytes).
// Checks: length field bounds, valid JSON object without duplicate keys, every entry's dtype,
// shape and data_offsets, byte size == numel x dtype size, offsets inside the file, and tensors
// covering the data section contiguously without overlap. Errors are pq::Error naming `label`
// and, where one is at fault, the tensor.
SafetensorsHeader parse_safetensors_header(std::span<const std::uint8_t> file,
                                           std::string_view label);

// The parsed model.safetensors.index.json of a sharded checkpoint.
struct SafetensorsIndex {
  std::map<std::string, std::string> weight_map;  // tensor name -> shard file name
  std::optional<std::uint64_t> total_size;        // metadata.total_size when present
};

// Parses an index file's text: a JSON object whose "weight_map" maps every tensor to a shard
// file name in the same directory (no path separators). Errors name `label`.
SafetensorsIndex parse_safetensors_index(std::string_view text, std::string_view label);

// A zero-copy view of a tensor's bytes inside a mapped file.
struct TensorView {
  const TensorInfo* info = nullptr;
  std::span<const std::uint8_t> bytes;

  // Decodes a floating-point tensor to float32 (exact for every stored float dtype but F64).
  std::vector<float> to_f32() const;
};

// One memory-mapped safetensors file.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return file_.path(); }
  const std::vector<TensorInfo>& tensors() const { return header_.tensors; }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }
  const TensorInfo* find(std::string_view name) const;
  TensorView view(std::string_view name) const;
  // Drops the tensor's pages from this process's resident set (streaming).
  void release(std::string_view name) const;

 private:
  MappedFile file_;
  SafetensorsHeader header_;
  std::unordered_map<std::string, std::size_t> by_name_;
};

// A checkpoint: a directory with model.safetensors, or with model.safetensors.index.json and its
// shards, or a single .safetensors file, or an index file itself. Tensor names are unique across
// shards, and a sharded checkpoint's files hold exactly the tensors its index places in them.
class Checkpoint {
 public:
  static Checkpoint open(const std::filesystem::path& path);

  const std::filesystem::path& directory() const { return directory_; }
  // All tensor names, sorted.
  const std::vector<std::string>& tensor_names() const { return names_; }
  bool contains(std::string_view name) const;
  const TensorInfo& info(std::string_view name) const;
  TensorView view(std::string_view name) const;
  std::vector<float> to_f32(std::string_view name) const { return view(name).to_f32(); }
  void release(std::string_view name) const;
  const std::vector<std::unique_ptr<SafetensorsFile>>& files() const { return files_; }
  std::uint64_t total_tensor_bytes() const;

 private:
  struct Location {
    const SafetensorsFile* file;
    const TensorInfo* info;
  };
  const Location& locate(std::string_view name) const;
  void open_sharded(const std::filesystem::path& index_path);
  void add_file(std::unique_ptr<SafetensorsFile> file);

  std::filesystem::path directory_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::unordered_map<std::string, Location> locations_;
  std::vector<std::string> names_;
};

}  // namespace pq::io
