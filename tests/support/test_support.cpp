#include "support/test_support.h"

#include <unistd.h>

#include <cstdlib>
#include <random>

#include <fmt/format.h>

namespace pq::test {

std::filesystem::path shared_dir() {
  if (const char* env = std::getenv("PQ_SHARED_DIR")) return env;
  return std::filesystem::path(PQ_TEST_DEFAULT_SHARED_DIR);
}

bool have_shared() { return std::filesystem::exists(shared_dir() / "models"); }

TempDir::TempDir() {
  std::random_device rd;
  path_ = std::filesystem::temp_directory_path() /
          fmt::format("pq-test-{}-{:08x}", ::getpid(), rd());
  std::filesystem::create_directories(path_);
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

}  // namespace pq::test
