#include "common/disk_space.h"

#include <sys/stat.h>

#include "common/error.h"

namespace pq {

namespace fs = std::filesystem;

namespace {

fs::path nearest_existing(const fs::path& location) {
  fs::path path = fs::absolute(location).lexically_normal();
  std::error_code ec;
  while (!fs::exists(path, ec) && path.has_parent_path() && path != path.parent_path()) {
    path = path.parent_path();
  }
  return path;
}

}  // namespace

std::optional<std::uint64_t> available_disk_bytes(const fs::path& location) {
  std::error_code ec;
  const fs::space_info space = fs::space(nearest_existing(location), ec);
  if (ec) return std::nullopt;
  return static_cast<std::uint64_t>(space.available);
}

std::uint64_t bytes_under(const fs::path& dir) {
  std::uint64_t bytes = 0;
  std::error_code ec;
  for (fs::recursive_directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    if (it->is_regular_file(ec)) bytes += it->file_size(ec);
  }
  return bytes;
}

bool same_filesystem(const fs::path& a, const fs::path& b) {
  struct stat sa {};
  struct stat sb {};
  return ::stat(nearest_existing(a).c_str(), &sa) == 0 &&
         ::stat(nearest_existing(b).c_str(), &sb) == 0 && sa.st_dev == sb.st_dev;
}

void require_disk_space(const fs::path& location, std::uint64_t needed, std::string_view what) {
  const std::optional<std::uint64_t> available = available_disk_bytes(location);
  PQ_CHECK(!available || *available >= needed,
           "{}: {} needs about {:.2f} GB of disk but {:.2f} GB are free there", location.string(),
           what, static_cast<double>(needed) / 1e9, static_cast<double>(*available) / 1e9);
}

}  // namespace pq
