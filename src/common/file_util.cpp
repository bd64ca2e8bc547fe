#include "common/file_util.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <vector>

#include "common/error.h"

namespace pq {

MappedFile::MappedFile(const std::filesystem::path& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  PQ_CHECK(fd >= 0, "{}: cannot open: {}", path.string(), std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail("{}: not a regular file", path.string());
  }
  size_ = static_cast<std::size_t>(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      fail("{}: cannot map: {}", path.string(), std::strerror(err));
    }
    data_ = static_cast<const std::uint8_t*>(p);
  }
  ::close(fd);
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<std::uint8_t*>(data_), size_);
}

MappedFile::MappedFile(MappedFile&& other) noexcept
    : path_(std::move(other.path_)), data_(other.data_), size_(other.size_) {
  other.data_ = nullptr;
  other.size_ = 0;
}

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) ::munmap(const_cast<std::uint8_t*>(data_), size_);
    path_ = std::move(other.path_);
    data_ = other.data_;
    size_ = other.size_;
    other.data_ = nullptr;
    other.size_ = 0;
  }
  return *this;
}

void MappedFile::release(std::size_t offset, std::size_t length) const {
  if (data_ == nullptr || length == 0) return;
  const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  // Only whole pages inside the range may be dropped.
  const std::size_t begin = (offset + page - 1) / page * page;
  const std::size_t end = std::min(offset + length, size_) / page * page;
  if (end > begin) {
    ::madvise(const_cast<std::uint8_t*>(data_) + begin, end - begin, MADV_DONTNEED);
  }
}

std::string read_text_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  PQ_CHECK(in.good(), "{}: cannot open: {}", path.string(), std::strerror(errno));
  std::ostringstream buffer;
  buffer << in.rdbuf();
  PQ_CHECK(!in.bad(), "{}: read error", path.string());
  return buffer.str();
}

AtomicFileWriter::AtomicFileWriter(std::filesystem::path destination)
    : destination_(std::move(destination)) {
  std::random_device rd;
  temporary_ = destination_;
  temporary_ += fmt::format(".tmp-{:08x}", rd());
  fd_ = ::open(temporary_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  PQ_CHECK(fd_ >= 0, "{}: cannot create: {}", destination_.string(), std::strerror(errno));
}

AtomicFileWriter::~AtomicFileWriter() {
  if (fd_ >= 0) {
    ::close(fd_);
    ::unlink(temporary_.c_str());
  }
}

void AtomicFileWriter::write(const void* data, std::size_t size) {
  PQ_CHECK(fd_ >= 0, "{}: write after commit", destination_.string());
  const auto* p = static_cast<const std::uint8_t*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd_, p, size);
    if (n < 0 && errno == EINTR) continue;
    PQ_CHECK(n > 0, "{}: write failed: {}", destination_.string(),
             n < 0 ? std::strerror(errno) : "no progress");
    p += n;
    size -= static_cast<std::size_t>(n);
    written_ += static_cast<std::uint64_t>(n);
  }
}

void AtomicFileWriter::append_from(int source_fd, std::uint64_t offset, std::uint64_t length) {
  PQ_CHECK(fd_ >= 0, "{}: write after commit", destination_.string());
  auto source_offset = static_cast<off_t>(offset);
  while (length > 0) {
    const ssize_t n = ::copy_file_range(source_fd, &source_offset, fd_, nullptr,
                                        static_cast<std::size_t>(length), 0);
    if (n < 0 && errno == EINTR) continue;
    // Filesystems or kernels without in-kernel copy between these files: copy the rest by hand.
    if (n < 0 && (errno == EXDEV || errno == ENOSYS || errno == EOPNOTSUPP || errno == EINVAL)) {
      break;
    }
    PQ_CHECK(n > 0, "{}: copy failed: {}", destination_.string(),
             n < 0 ? std::strerror(errno) : "source ended early");
    length -= static_cast<std::uint64_t>(n);
    written_ += static_cast<std::uint64_t>(n);
  }
  std::vector<std::uint8_t> buffer(std::min<std::uint64_t>(length, 1u << 20));
  while (length > 0) {
    const auto chunk = std::min<std::uint64_t>(length, buffer.size());
    const ssize_t n = ::pread(source_fd, buffer.data(), chunk, source_offset);
    if (n < 0 && errno == EINTR) continue;
    PQ_CHECK(n > 0, "{}: read of staged data failed: {}", destination_.string(),
             n < 0 ? std::strerror(errno) : "source ended early");
    write(buffer.data(), static_cast<std::size_t>(n));
    source_offset += n;
    length -= static_cast<std::uint64_t>(n);
  }
}

void AtomicFileWriter::commit() {
  PQ_CHECK(fd_ >= 0, "{}: committed twice", destination_.string());
  PQ_CHECK(::fsync(fd_) == 0, "{}: fsync failed: {}", destination_.string(), std::strerror(errno));
  const int rc = ::close(fd_);
  fd_ = -1;
  if (rc != 0 || ::rename(temporary_.c_str(), destination_.c_str()) != 0) {
    const int err = errno;
    ::unlink(temporary_.c_str());
    fail("{}: cannot finish writing: {}", destination_.string(), std::strerror(err));
  }
}

void write_text_file_atomic(const std::filesystem::path& path, std::string_view text) {
  AtomicFileWriter writer(path);
  writer.write(text);
  writer.commit();
}

bool is_within(const std::filesystem::path& inner, const std::filesystem::path& outer) {
  const std::filesystem::path a = std::filesystem::weakly_canonical(inner);
  const std::filesystem::path b = std::filesystem::weakly_canonical(outer);
  const auto [ai, bi] = std::mismatch(a.begin(), a.end(), b.begin(), b.end());
  return bi == b.end();
}

void write_f32_file(const std::filesystem::path& path, std::span<const float> values) {
  AtomicFileWriter file(path);
  file.write(values.data(), values.size_bytes());
  file.commit();
}

MappedFile map_f32_file(const std::filesystem::path& path, std::size_t count) {
  MappedFile file(path);
  PQ_CHECK(file.size() == count * sizeof(float), "{}: {} bytes, expected {}", path.string(),
           file.size(), count * sizeof(float));
  return file;
}

std::vector<float> read_f32_file(const std::filesystem::path& path, std::size_t count) {
  const MappedFile file = map_f32_file(path, count);
  std::vector<float> values(count);
  std::memcpy(values.data(), file.data(), file.size());
  return values;
}

}  // namespace pq
