#include "common/location_lock.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "common/error.h"
#include "support/test_support.h"

namespace pq {
namespace {

namespace fs = std::filesystem;

// Tries the lock in a child process (another run) and returns what it saw: "locked" or the
// error message.
std::string lock_from_another_process(const fs::path& location) {
  int pipe_fds[2];
  EXPECT_EQ(::pipe(pipe_fds), 0);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(pipe_fds[0]);
    std::string seen;
    try {
      const LocationLock lock(location);
      seen = "locked";
    } catch (const Error& e) {
      seen = e.what();
    }
    [[maybe_unused]] const ssize_t n = ::write(pipe_fds[1], seen.data(), seen.size());
    ::_exit(0);
  }
  ::close(pipe_fds[1]);
  std::string seen;
  char buffer[4096];
  for (ssize_t n; (n = ::read(pipe_fds[0], buffer, sizeof(buffer))) > 0;) seen.append(buffer, n);
  ::close(pipe_fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  return seen;
}

TEST(LocationLock, SecondRunFailsAtOnceNamingTheHolder) {
  test::TempDir dir;
  set_run_description("prismaquant quantize M --out ckpt");
  {
    const LocationLock lock(dir / "ckpt");
    EXPECT_TRUE(fs::exists(dir / "ckpt.lock"));
    const std::string seen = lock_from_another_process(dir / "ckpt");
    EXPECT_NE(seen.find("is in use by another run"), std::string::npos) << seen;
    EXPECT_NE(seen.find("prismaquant quantize M --out ckpt"), std::string::npos) << seen;
    EXPECT_NE(seen.find(fmt::format("pid {}", ::getpid())), std::string::npos) << seen;
    // The same location spelt differently is the same location.
    EXPECT_NE(lock_from_another_process(dir.path() / "x" / ".." / "ckpt/").find("in use"),
              std::string::npos);
    // Another location is free.
    EXPECT_EQ(lock_from_another_process(dir / "other"), "locked");
  }
  EXPECT_FALSE(fs::exists(dir / "ckpt.lock"));
  EXPECT_EQ(lock_from_another_process(dir / "ckpt"), "locked");
}

TEST(LocationLock, ReentrantWithinOneProcess) {
  test::TempDir dir;
  const LocationLock outer(dir / "work");
  {
    const LocationLock inner(dir / "work/");
    EXPECT_TRUE(fs::exists(dir / "work.lock"));
  }
  // The inner lock did not release the outer one.
  EXPECT_TRUE(fs::exists(dir / "work.lock"));
  EXPECT_NE(lock_from_another_process(dir / "work").find("in use"), std::string::npos);
}

TEST(LocationLock, LeftoverLockFileOfAKilledRunIsTakenOver) {
  test::TempDir dir;
  std::ofstream(dir / "ckpt.lock") << "prismaquant quantize (pid 1, since long ago)\n";
  const LocationLock lock(dir / "ckpt");
  EXPECT_NE(lock_from_another_process(dir / "ckpt").find("in use"), std::string::npos);
}

TEST(LocationLock, RemovesTemporariesLeftInsideByAKilledRun) {
  test::TempDir dir;
  fs::create_directories(dir / "probe");
  std::ofstream(dir / "probe/probe.json.tmp-0123abcd") << "half";
  std::ofstream(dir / "probe/probe.json") << "{}";
  std::ofstream(dir / "probe/notes.tmp-xyz") << "not ours";
  const LocationLock lock(dir / "probe");
  EXPECT_FALSE(fs::exists(dir / "probe/probe.json.tmp-0123abcd"));
  EXPECT_TRUE(fs::exists(dir / "probe/probe.json"));
  EXPECT_TRUE(fs::exists(dir / "probe/notes.tmp-xyz"));
}

TEST(LocationLock, UnwritableLocationIsRefused) {
  // Below a regular file nothing can be created, whoever runs the test (root included).
  test::TempDir dir;
  std::ofstream(dir / "file") << "x";
  try {
    const LocationLock lock(dir / "file" / "ckpt");
    ADD_FAILURE() << "locked a location below a file";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot be written"), std::string::npos) << e.what();
  }
}

TEST(LocationLock, EmptyLocationIsRefused) {
  EXPECT_THROW(LocationLock(""), Error);
}

}  // namespace
}  // namespace pq
