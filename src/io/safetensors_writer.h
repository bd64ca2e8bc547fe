#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <unordered_set>
#include <vector>

#include "io/dtype.h"

namespace pq::io {

// The `__metadata__` object of a safetensors header: string keys to string values.
using SafetensorsMetadata = std::map<std::string, std::string>;

// {"format": "pt"}, what transformers' save_pretrained writes; transformers refuses to load a file
// whose __metadata__ names another format (modeling_utils.py, "Incompatible safetensors file").
SafetensorsMetadata default_safetensors_metadata();

// Writes one safetensors file. Tensor bytes are staged in unlinked spool files beside the
// destination as they are added, so memory holds only the header entries; commit() writes the
// header and appends the spooled data (copy_file_range) into a temporary file that is renamed
// over the destination. Until commit() succeeds the destination is untouched, and a failure or
// destruction without commit() leaves nothing behind.
//
// Layout matches the reference serializer (huggingface/safetensors safetensors/src/tensor.rs,
// prepare()): tensors ordered by descending element size, so every tensor starts aligned to its
// element size; __metadata__ first, then tensors in data order; compact JSON padded with spaces
// to a multiple of 8 bytes.
class SafetensorsWriter {
 public:
  explicit SafetensorsWriter(std::filesystem::path destination,
                             SafetensorsMetadata metadata = default_safetensors_metadata());
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  // Stages one tensor. `data` holds numel(shape) x dtype_size(dtype) little-endian bytes. Names
  // must be non-empty UTF-8, unique, and not "__metadata__".
  void add(std::string_view name, DType dtype, std::span<const std::int64_t> shape,
           std::span<const std::uint8_t> data);
  void commit();

  const std::filesystem::path& destination() const { return destination_; }
  std::size_t tensor_count() const { return entries_.size(); }
  std::uint64_t data_bytes() const;

 private:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<std::int64_t> shape;
    std::uint64_t nbytes;
  };
  // Data of all tensors whose element size is 8, 4, 2 or 1 bytes, in the order they were added.
  struct Spool {
    int fd = -1;
    std::uint64_t size = 0;
  };
  Spool& spool_for(DType dtype);

  std::filesystem::path destination_;
  SafetensorsMetadata metadata_;
  std::vector<Entry> entries_;
  std::unordered_set<std::string> names_;
  std::array<Spool, 4> spools_;
  bool committed_ = false;
};

struct ShardedWriterOptions {
  // huggingface_hub's default shard limit, MAX_SHARD_SIZE = "5GB" = 5 x 10^9 bytes
  // (huggingface_hub/serialization/_base.py). Counts tensor data bytes, not headers.
  std::uint64_t max_shard_bytes = 5'000'000'000;
  SafetensorsMetadata metadata = default_safetensors_metadata();  // written into every shard
};

// Writes a Hugging Face checkpoint directory: model.safetensors when all tensors fit one shard,
// else model-0000i-of-0000N.safetensors plus model.safetensors.index.json
// ({"metadata": {"total_size": data bytes}, "weight_map": {tensor: shard}}).
// Tensors fill shards in the order added; a tensor that would push the open shard past the
// limit starts a new one, and a tensor larger than the limit gets a shard of its own (the
// splitting rule of huggingface_hub split_state_dict_into_shards_factory). Closed shards wait
// under temporary names until commit() knows N; commit() names them and writes the index last.
// Without a successful commit() no checkpoint file is left in the directory.
class ShardedCheckpointWriter {
 public:
  // Creates `directory` if needed; refuses one that already holds model.safetensors or an index.
  explicit ShardedCheckpointWriter(std::filesystem::path directory,
                                   ShardedWriterOptions options = {});
  ~ShardedCheckpointWriter();
  ShardedCheckpointWriter(const ShardedCheckpointWriter&) = delete;
  ShardedCheckpointWriter& operator=(const ShardedCheckpointWriter&) = delete;

  void add(std::string_view name, DType dtype, std::span<const std::int64_t> shape,
           std::span<const std::uint8_t> data);
  // Returns the names of the files written, shards first and the index (if any) last.
  std::vector<std::string> commit();

 private:
  void close_shard();
  void remove_files(const std::vector<std::filesystem::path>& paths);

  std::filesystem::path directory_;
  ShardedWriterOptions options_;
  std::string temporary_tag_;
  std::unique_ptr<SafetensorsWriter> open_shard_;
  std::vector<std::filesystem::path> closed_shards_;  // under temporary names
  std::map<std::string, std::size_t> shard_of_tensor_;
  std::uint64_t total_size_ = 0;
  bool committed_ = false;
};

}  // namespace pq::io
