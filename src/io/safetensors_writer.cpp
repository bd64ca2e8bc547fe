#include "io/safetensors_writer.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>

#include "common/error.h"
#include "common/file_util.h"

namespace pq::io {
namespace {

constexpr std::string_view kSingleFileName = "model.safetensors";
constexpr std::string_view kIndexFileName = "model.safetensors.index.json";

// Well-formed UTF-8 (RFC 3629: no overlong forms, no surrogates, nothing past U+10FFFF). JSON
// text must be UTF-8 (RFC 8259), and the reference reader rejects a header that is not.
bool is_valid_utf8(std::string_view text) {
  std::size_t i = 0;
  while (i < text.size()) {
    const auto lead = static_cast<unsigned char>(text[i]);
    std::size_t length = 0;
    std::uint32_t code = 0;
    std::uint32_t minimum = 0;
    if (lead < 0x80) {
      ++i;
      continue;
    } else if ((lead & 0xe0) == 0xc0) {
      length = 2, code = lead & 0x1f, minimum = 0x80;
    } else if ((lead & 0xf0) == 0xe0) {
      length = 3, code = lead & 0x0f, minimum = 0x800;
    } else if ((lead & 0xf8) == 0xf0) {
      length = 4, code = lead & 0x07, minimum = 0x10000;
    } else {
      return false;
    }
    if (i + length > text.size()) return false;
    for (std::size_t k = 1; k < length; ++k) {
      const auto next = static_cast<unsigned char>(text[i + k]);
      if ((next & 0xc0) != 0x80) return false;
      code = (code << 6) | (next & 0x3f);
    }
    if (code < minimum || code > 0x10ffff || (code >= 0xd800 && code <= 0xdfff)) return false;
    i += length;
  }
  return true;
}

// Spool slot for a dtype: element sizes 8, 4, 2, 1 map to slots 0..3, the order data is laid out.
std::size_t spool_slot(DType dtype) {
  switch (dtype_size(dtype)) {
    case 8:
      return 0;
    case 4:
      return 1;
    case 2:
      return 2;
    default:
      return 3;
  }
}

// Writes at an explicit offset, so bytes of a write that failed part-way are overwritten by the
// next tensor instead of shifting every later tensor's data.
void write_at(int fd, std::uint64_t offset, std::span<const std::uint8_t> data,
              const std::string& label) {
  while (!data.empty()) {
    const ssize_t n = ::pwrite(fd, data.data(), data.size(), static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    PQ_CHECK(n > 0, "{}: staging tensor data failed: {}", label,
             n < 0 ? std::strerror(errno) : "no progress");
    data = data.subspan(static_cast<std::size_t>(n));
    offset += static_cast<std::uint64_t>(n);
  }
}

std::string random_tag() {
  std::random_device rd;
  return fmt::format("{:08x}", rd());
}

}  // namespace

SafetensorsMetadata default_safetensors_metadata() {
  return {{"format", "pt"}};
}

SafetensorsWriter::SafetensorsWriter(std::filesystem::path destination,
                                     SafetensorsMetadata metadata)
    : destination_(std::move(destination)), metadata_(std::move(metadata)) {
  for (const auto& [key, value] : metadata_) {
    PQ_CHECK(is_valid_utf8(key) && is_valid_utf8(value),
             "{}: __metadata__ entry \"{}\" is not valid UTF-8", destination_.string(), key);
  }
}

SafetensorsWriter::~SafetensorsWriter() {
  for (auto& spool : spools_) {
    if (spool.fd >= 0) ::close(spool.fd);
  }
}

std::uint64_t SafetensorsWriter::data_bytes() const {
  std::uint64_t total = 0;
  for (const auto& spool : spools_) total += spool.size;
  return total;
}

SafetensorsWriter::Spool& SafetensorsWriter::spool_for(DType dtype) {
  Spool& spool = spools_[spool_slot(dtype)];
  if (spool.fd < 0) {
    // Beside the destination so staging uses the same filesystem (same free space, and
    // copy_file_range can stay in the kernel); unlinked at once so nothing outlives the process.
    auto path = destination_;
    path += ".spool-" + random_tag();
    spool.fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    PQ_CHECK(spool.fd >= 0, "{}: cannot create staging file: {}", destination_.string(),
             std::strerror(errno));
    ::unlink(path.c_str());
  }
  return spool;
}

void SafetensorsWriter::add(std::string_view name, DType dtype, std::span<const std::int64_t> shape,
                            std::span<const std::uint8_t> data) {
  const std::string label = destination_.string();
  PQ_CHECK(!committed_, "{}: tensor \"{}\" added after commit", label, name);
  PQ_CHECK(!name.empty() && name != "__metadata__" && is_valid_utf8(name),
           "{}: invalid tensor name \"{}\"", label, name);
  PQ_CHECK(!names_.contains(std::string(name)), "{}: tensor \"{}\" added twice", label, name);
  std::uint64_t expected = dtype_size(dtype);
  for (const auto dim : shape) {
    PQ_CHECK(dim >= 0, "{}: tensor \"{}\": negative dimension {}", label, name, dim);
    const auto d = static_cast<std::uint64_t>(dim);
    PQ_CHECK(d == 0 || expected <= std::numeric_limits<std::int64_t>::max() / d,
             "{}: tensor \"{}\": shape is too large", label, name);
    expected *= d;
  }
  PQ_CHECK(data.size() == expected, "{}: tensor \"{}\": {} bytes given, shape and dtype {} need {}",
           label, name, data.size(), dtype_name(dtype), expected);
  Spool& spool = spool_for(dtype);
  write_at(spool.fd, spool.size, data, label);
  spool.size += data.size();
  names_.emplace(name);
  entries_.push_back({std::string(name), dtype, {shape.begin(), shape.end()}, data.size()});
}

void SafetensorsWriter::commit() {
  PQ_CHECK(!committed_, "{}: committed twice", destination_.string());
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  std::uint64_t offset = 0;
  for (std::size_t slot = 0; slot < spools_.size(); ++slot) {
    for (const auto& e : entries_) {
      if (spool_slot(e.dtype) != slot) continue;
      header[e.name] = {{"dtype", dtype_name(e.dtype)},
                        {"shape", e.shape},
                        {"data_offsets", {offset, offset + e.nbytes}}};
      offset += e.nbytes;
    }
  }
  std::string text = header.dump();
  // The reference serializer pads with spaces so the data section starts 8-byte aligned.
  text.append((8 - text.size() % 8) % 8, ' ');

  AtomicFileWriter out(destination_);
  std::uint8_t length[8];
  for (int i = 0; i < 8; ++i) length[i] = static_cast<std::uint8_t>(text.size() >> (8 * i));
  out.write(length, sizeof length);
  out.write(text);
  for (const auto& spool : spools_) {
    if (spool.fd >= 0) out.append_from(spool.fd, 0, spool.size);
  }
  out.commit();
  committed_ = true;
  for (auto& spool : spools_) {
    if (spool.fd >= 0) ::close(spool.fd);
    spool = {};
  }
}

ShardedCheckpointWriter::ShardedCheckpointWriter(std::filesystem::path directory,
                                                 ShardedWriterOptions options)
    : directory_(std::move(directory)), options_(std::move(options)), temporary_tag_(random_tag()) {
  std::error_code ec;
  std::filesystem::create_directories(directory_, ec);
  PQ_CHECK(!ec, "{}: cannot create directory: {}", directory_.string(), ec.message());
  for (const auto name : {kSingleFileName, kIndexFileName}) {
    PQ_CHECK(!std::filesystem::exists(directory_ / name, ec),
             "{}: already holds {}; choose an empty output directory", directory_.string(), name);
  }
  PQ_CHECK(options_.max_shard_bytes > 0, "{}: max shard size must be positive",
           directory_.string());
}

ShardedCheckpointWriter::~ShardedCheckpointWriter() {
  if (!committed_) remove_files(closed_shards_);
}

void ShardedCheckpointWriter::remove_files(const std::vector<std::filesystem::path>& paths) {
  std::error_code ec;
  for (const auto& path : paths) std::filesystem::remove(path, ec);
}

void ShardedCheckpointWriter::add(std::string_view name, DType dtype,
                                  std::span<const std::int64_t> shape,
                                  std::span<const std::uint8_t> data) {
  PQ_CHECK(!committed_, "{}: tensor \"{}\" added after commit", directory_.string(), name);
  PQ_CHECK(!shard_of_tensor_.contains(std::string(name)), "{}: tensor \"{}\" added twice",
           directory_.string(), name);
  const std::uint64_t nbytes = data.size();
  if (open_shard_ && open_shard_->tensor_count() > 0 &&
      open_shard_->data_bytes() + nbytes > options_.max_shard_bytes) {
    close_shard();
  }
  if (!open_shard_) {
    const auto path = directory_ / fmt::format(".model-{:05d}.safetensors.{}.partial",
                                               closed_shards_.size() + 1, temporary_tag_);
    open_shard_ = std::make_unique<SafetensorsWriter>(path, options_.metadata);
  }
  open_shard_->add(name, dtype, shape, data);
  shard_of_tensor_.emplace(name, closed_shards_.size());
  total_size_ += nbytes;
  if (nbytes > options_.max_shard_bytes) close_shard();
}

void ShardedCheckpointWriter::close_shard() {
  open_shard_->commit();
  closed_shards_.push_back(open_shard_->destination());
  open_shard_.reset();
}

std::vector<std::string> ShardedCheckpointWriter::commit() {
  PQ_CHECK(!committed_, "{}: committed twice", directory_.string());
  // An empty checkpoint is still one valid (empty) model.safetensors.
  if (open_shard_ || closed_shards_.empty()) {
    if (!open_shard_) {
      open_shard_ = std::make_unique<SafetensorsWriter>(
          directory_ / fmt::format(".model-00001.safetensors.{}.partial", temporary_tag_),
          options_.metadata);
    }
    close_shard();
  }
  const std::size_t count = closed_shards_.size();
  std::vector<std::string> names;
  if (count == 1) {
    names.emplace_back(kSingleFileName);
  } else {
    // Shard names as huggingface_hub formats them: model-{i:05d}-of-{N:05d}.safetensors.
    for (std::size_t i = 0; i < count; ++i) {
      names.push_back(fmt::format("model-{:05d}-of-{:05d}.safetensors", i + 1, count));
    }
  }
  std::vector<std::filesystem::path> renamed;
  try {
    for (std::size_t i = 0; i < count; ++i) {
      const auto target = directory_ / names[i];
      std::error_code ec;
      std::filesystem::rename(closed_shards_[i], target, ec);
      PQ_CHECK(!ec, "{}: cannot name shard: {}", target.string(), ec.message());
      renamed.push_back(target);
    }
    if (count > 1) {
      nlohmann::json weight_map = nlohmann::json::object();
      for (const auto& [tensor, shard] : shard_of_tensor_) weight_map[tensor] = names[shard];
      const nlohmann::json index = {{"metadata", {{"total_size", total_size_}}},
                                    {"weight_map", weight_map}};
      // transformers writes the index with json.dumps(indent=2, sort_keys=True) + "\n".
      write_text_file_atomic(directory_ / kIndexFileName, index.dump(2) + "\n");
      names.emplace_back(kIndexFileName);
    }
  } catch (...) {
    remove_files(renamed);
    throw;
  }
  committed_ = true;
  return names;
}

}  // namespace pq::io
