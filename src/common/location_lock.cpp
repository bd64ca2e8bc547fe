#include "common/location_lock.h"

#include <fcntl.h>
#include <fmt/chrono.h>
#include <fmt/format.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <map>
#include <mutex>
#include <regex>

#include "common/error.h"

namespace pq {

namespace fs = std::filesystem;

namespace {

std::mutex held_mutex;
// Canonical location -> the pid that locked it: a child forked while a lock is held does not
// hold it (its own open of the lock file conflicts with the parent's).
std::map<std::string, pid_t>& held_locations() {
  static std::map<std::string, pid_t> held;
  return held;
}

std::string& run_description() {
  static std::string description = "prismaquant";
  return description;
}

std::string read_holder(int fd) {
  char buffer[512];
  const ssize_t n = ::pread(fd, buffer, sizeof(buffer) - 1, 0);
  if (n <= 0) return "it has not said which yet";
  std::string text(buffer, static_cast<std::size_t>(n));
  while (!text.empty() && (text.back() == '\n' || text.back() == '\0')) text.pop_back();
  return text;
}

// AtomicFileWriter's temporary names: DESTINATION.tmp- and eight hex digits.
void remove_stale_temporaries(const fs::path& location) {
  static const std::regex temporary(R"(.+\.tmp-[0-9a-f]{8})");
  std::error_code ec;
  for (fs::directory_iterator it(location, ec), end; !ec && it != end; it.increment(ec)) {
    if (it->is_regular_file(ec) && std::regex_match(it->path().filename().string(), temporary)) {
      fs::remove(it->path(), ec);
    }
  }
}

}  // namespace

void set_run_description(std::string description) {
  run_description() = std::move(description);
}

LocationLock::LocationLock(const fs::path& location) {
  fs::path normal = location.lexically_normal();
  if (!normal.has_filename()) normal = normal.parent_path();
  PQ_CHECK(!normal.empty(), "no output location given");
  key_ = fs::weakly_canonical(fs::absolute(normal)).string();
  lock_file_ = normal;
  lock_file_ += ".lock";

  const std::lock_guard<std::mutex> guard(held_mutex);
  if (const auto it = held_locations().find(key_);
      it != held_locations().end() && it->second == ::getpid()) {
    return;  // this process holds it already
  }
  std::error_code ignored;
  if (lock_file_.has_parent_path()) fs::create_directories(lock_file_.parent_path(), ignored);
  for (;;) {
    const int fd = ::open(lock_file_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    PQ_CHECK(fd >= 0, "{}: cannot be written (creating {}: {})", normal.string(),
             lock_file_.string(), std::strerror(errno));
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      const int err = errno;
      const std::string holder = err == EWOULDBLOCK ? read_holder(fd) : "";
      ::close(fd);
      PQ_CHECK(err != EWOULDBLOCK,
               "{} is in use by another run: {}; wait for it to finish or choose another "
               "location",
               normal.string(), holder);
      fail("{}: cannot lock {}: {}", normal.string(), lock_file_.string(), std::strerror(err));
    }
    // The holder we waited on may have removed the file between our open and flock: then the
    // lock is on a file nobody else can find, so start again with the current one.
    struct stat opened {};
    struct stat named {};
    if (::fstat(fd, &opened) == 0 && ::stat(lock_file_.c_str(), &named) == 0 &&
        opened.st_ino == named.st_ino && opened.st_dev == named.st_dev) {
      fd_ = fd;
      break;
    }
    ::close(fd);
  }
  const std::string holder =
      fmt::format("{} (pid {}, since {:%Y-%m-%d %H:%M:%S} UTC)\n", run_description(), ::getpid(),
                  fmt::gmtime(std::time(nullptr)));
  // Best effort: the description only helps the message of a run that finds the lock taken.
  if (::ftruncate(fd_, 0) == 0) {
    [[maybe_unused]] const ssize_t written = ::pwrite(fd_, holder.data(), holder.size(), 0);
  }
  held_locations()[key_] = ::getpid();
  remove_stale_temporaries(normal);
}

LocationLock::~LocationLock() {
  if (fd_ < 0) return;
  const std::lock_guard<std::mutex> guard(held_mutex);
  held_locations().erase(key_);
  // Removed while still locked, so no run can take a lock on a file that is about to vanish.
  ::unlink(lock_file_.c_str());
  ::close(fd_);
}

}  // namespace pq
