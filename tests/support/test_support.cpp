#include "support/test_support.h"

#include <fmt/format.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdlib>
#include <fstream>
#include <random>

#include "common/error.h"

namespace pq::test {

std::filesystem::path shared_dir() {
  if (const char* env = std::getenv("PQ_SHARED_DIR")) return env;
  return std::filesystem::path(PQ_TEST_DEFAULT_SHARED_DIR);
}

bool have_shared() {
  return std::filesystem::exists(shared_dir() / "models");
}

std::filesystem::path write_token_ids(const std::filesystem::path& path, std::int64_t vocab,
                                      std::size_t count, std::uint64_t seed) {
  std::ofstream out(path);
  std::uint64_t state = seed;
  for (std::size_t i = 0; i < count; ++i) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    out << (state >> 33) % static_cast<std::uint64_t>(vocab) << (i % 16 == 15 ? '\n' : ' ');
  }
  return path;
}

TempDir::TempDir() {
  std::random_device rd;
  path_ =
      std::filesystem::temp_directory_path() / fmt::format("pq-test-{}-{:08x}", ::getpid(), rd());
  std::filesystem::create_directories(path_);
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

FileSizeLimitOutcome run_under_file_size_limit(std::uint64_t max_file_bytes,
                                               const std::function<void()>& body) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    std::signal(SIGXFSZ, SIG_IGN);
    const rlimit limit{max_file_bytes, max_file_bytes};
    ::setrlimit(RLIMIT_FSIZE, &limit);
    int code = 2;
    try {
      body();
      code = 0;
    } catch (const Error&) {
      code = 1;
    } catch (...) {
    }
    ::_exit(code);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) > 1) return FileSizeLimitOutcome::kCrashedOrOther;
  return WEXITSTATUS(status) == 0 ? FileSizeLimitOutcome::kReturned
                                  : FileSizeLimitOutcome::kThrewError;
}

}  // namespace pq::test
