#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace pq {

// A read-only memory map of a whole file. Zero-copy tensor access points into it.
class MappedFile {
 public:
  MappedFile() = default;
  explicit MappedFile(const std::filesystem::path& path);
  ~MappedFile();
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::uint8_t* data() const { return data_; }
  std::size_t size() const { return size_; }
  std::span<const std::uint8_t> bytes() const { return {data_, size_}; }
  const std::filesystem::path& path() const { return path_; }

  // Tells the kernel a byte range will not be needed soon, so streaming readers keep resident
  // memory near one layer.
  void release(std::size_t offset, std::size_t length) const;

 private:
  std::filesystem::path path_;
  const std::uint8_t* data_ = nullptr;
  std::size_t size_ = 0;
};

std::string read_text_file(const std::filesystem::path& path);

// Writes a file so that it is either absent or complete: the bytes go to a temporary name in the
// same directory, are flushed, and are renamed over the destination only after every write
// succeeded. Any error (full disk, read-only directory) removes the temporary and throws.
class AtomicFileWriter {
 public:
  explicit AtomicFileWriter(std::filesystem::path destination);
  ~AtomicFileWriter();
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  void write(const void* data, std::size_t size);
  void write(std::string_view text) { write(text.data(), text.size()); }
  // Appends `length` bytes of the open file `source_fd` starting at `offset`, in the kernel
  // (copy_file_range) where the filesystem allows, else through a small buffer.
  void append_from(int source_fd, std::uint64_t offset, std::uint64_t length);
  std::uint64_t bytes_written() const { return written_; }
  // Flushes, fsyncs and renames into place. Without commit(), the destructor discards the file.
  void commit();

 private:
  std::filesystem::path destination_;
  std::filesystem::path temporary_;
  int fd_ = -1;
  std::uint64_t written_ = 0;
};

void write_text_file_atomic(const std::filesystem::path& path, std::string_view text);

// Raw float32 arrays on disk (a layer-major pass's boundary activations): written atomically,
// and read back mapped or copied; a file of another size than `count` floats is a pq::Error.
void write_f32_file(const std::filesystem::path& path, std::span<const float> values);
MappedFile map_f32_file(const std::filesystem::path& path, std::size_t count);
std::vector<float> read_f32_file(const std::filesystem::path& path, std::size_t count);

// Whether `inner` is `outer` or lies below it, after resolving links and "..", for paths that may
// not exist yet.
bool is_within(const std::filesystem::path& inner, const std::filesystem::path& outer);

}  // namespace pq
