#pragma once

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <string>

namespace pq::test {

// ../shared (models, fixtures, data). Tests needing it call GTEST_SKIP when it is absent outside
// CI; under CI=true its absence is a failure.
std::filesystem::path shared_dir();
bool have_shared();

// A fresh directory under the system temp dir, removed when the object dies.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

// Writes `count` deterministic token ids below `vocab` to `path`, whitespace-separated (a 64-bit
// LCG with Knuth's MMIX constants from `seed`: calibration data for checkpoints without a
// tokenizer); returns `path`.
std::filesystem::path write_token_ids(const std::filesystem::path& path, std::int64_t vocab,
                                      std::size_t count, std::uint64_t seed = 1);

enum class FileSizeLimitOutcome { kReturned, kThrewError, kCrashedOrOther };

// Runs `body` in a child process whose files may not grow past `max_file_bytes` (writes past it
// fail with EFBIG, standing in for a full disk). kThrewError: body threw pq::Error.
FileSizeLimitOutcome run_under_file_size_limit(std::uint64_t max_file_bytes,
                                               const std::function<void()>& body);

}  // namespace pq::test

// Skips the current test when ../shared is missing (fails instead under CI=true).
#define PQ_REQUIRE_SHARED()                                                        \
  do {                                                                             \
    if (!::pq::test::have_shared()) {                                              \
      if (std::getenv("CI") != nullptr) FAIL() << "../shared is missing under CI"; \
      GTEST_SKIP() << "../shared not found";                                       \
    }                                                                              \
  } while (0)
