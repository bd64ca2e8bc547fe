// Two runs on one location and Ctrl-C, through the built binary as a user meets them (issue 13):
// the second run fails at once naming the first, and an interrupted run leaves its finished work
// and nothing half-written. PQ_PRISMAQUANT_PATH is the binary's path, set by CMake.
#include <fcntl.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cli/cli_runner.h"
#include "support/test_support.h"

namespace pq {
namespace {

namespace fs = std::filesystem;

using test::read_file;

// A prismaquant process with its stdout and stderr in files.
class ChildRun {
 public:
  ChildRun(const std::vector<std::string>& args, const fs::path& log_prefix)
      : out_(log_prefix.string() + ".out"), err_(log_prefix.string() + ".err") {
    std::vector<std::string> argv_storage = {PQ_PRISMAQUANT_PATH};
    argv_storage.insert(argv_storage.end(), args.begin(), args.end());
    pid_ = ::fork();
    if (pid_ == 0) {
      const int out = ::open(out_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      const int err = ::open(err_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(out, STDOUT_FILENO);
      ::dup2(err, STDERR_FILENO);
      std::vector<char*> argv;
      for (std::string& arg : argv_storage) argv.push_back(arg.data());
      argv.push_back(nullptr);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
  }
  ~ChildRun() {
    if (!finished_) {
      ::kill(pid_, SIGKILL);
      wait();
    }
  }
  bool running() {
    if (finished_) return false;
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == 0) return true;
    record(status);
    return false;
  }
  // The exit status, or 128 + the signal that ended it (as a shell reports it).
  int wait() {
    if (!finished_) {
      int status = 0;
      ::waitpid(pid_, &status, 0);
      record(status);
    }
    return status_;
  }
  void signal(int signal_number) const { ::kill(pid_, signal_number); }
  std::string out() const { return read_file(out_); }
  std::string err() const { return read_file(err_); }

 private:
  void record(int status) {
    finished_ = true;
    status_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
  fs::path out_, err_;
  pid_t pid_ = -1;
  bool finished_ = false;
  int status_ = -1;
};

// Polls until `ready` holds or the run ends; true when it held while the run was still going.
bool wait_until(ChildRun& run, const std::function<bool()>& ready) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(5);
  while (std::chrono::steady_clock::now() < deadline) {
    if (ready()) return run.running();
    if (!run.running()) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return false;
}

std::vector<std::string> quantize_args(const fs::path& out, const std::string& target_bits,
                                       const std::string& nsamples) {
  return {"quantize",       (test::shared_dir() / "models" / "qwen3-dense-tiny").string(),
          "--data",         (test::shared_dir() / "data" / "wikitext-2-test.txt").string(),
          "--out",          out.string(),
          "--nsamples",     nsamples,
          "--seqlen",       "128",
          "--eval-windows", "2",
          "--eval-seqlen",  "64",
          "--target-bits",  target_bits};
}

// Every file or directory below `dir`, relative to it.
std::vector<std::string> tree(const fs::path& dir) {
  std::vector<std::string> names;
  for (const fs::directory_entry& entry : fs::recursive_directory_iterator(dir)) {
    names.push_back(fs::relative(entry.path(), dir).string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

TEST(RunControlCli, SecondQuantizeOnOneOutputFailsAtOnceAndTheFirstShipsItsOwnResult) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  ChildRun first(quantize_args(dir / "ckpt", "4.75", "8"), dir / "first");
  ASSERT_TRUE(wait_until(first, [&] { return fs::exists(dir / "ckpt.lock"); })) << first.err();

  ChildRun second(quantize_args(dir / "ckpt", "6", "8"), dir / "second");
  EXPECT_EQ(second.wait(), 1);
  // It failed while the first was still working, before doing any work of its own.
  EXPECT_TRUE(first.running());
  const std::string err = second.err();
  EXPECT_TRUE(err.starts_with("prismaquant: error: ")) << err;
  EXPECT_EQ(err.find('\n'), err.size() - 1) << err;
  EXPECT_NE(err.find("is in use by another run"), std::string::npos) << err;
  EXPECT_NE(err.find("--target-bits 4.75"), std::string::npos) << err;

  ASSERT_EQ(first.wait(), 0) << first.err();
  const std::string card = read_file(dir / "ckpt" / "README.md");
  EXPECT_NE(card.find("--target-bits 4.75"), std::string::npos);
  EXPECT_EQ(card.find("--target-bits 6"), std::string::npos);
  // Nothing of the second run's and no lock is left.
  for (const std::string& name : tree(dir.path())) {
    EXPECT_FALSE(name.ends_with(".lock")) << name;
  }
  EXPECT_TRUE(fs::exists(dir / "ckpt.work" / "alloc" / "assignment.json"));
}

TEST(RunControlCli, SigintStopsCleanlyKeepsFinishedStepsAndTheRerunResumes) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  const std::vector<std::string> args = quantize_args(dir / "ckpt", "4.75", "16");
  const fs::path state = dir / "ckpt.work" / "probe" / "pass" / "state.json";
  {
    ChildRun run(args, dir / "interrupted");
    // Ctrl-C once the probe has finished its first step.
    ASSERT_TRUE(wait_until(run, [&] { return fs::exists(state); })) << run.err();
    run.signal(SIGINT);
    EXPECT_EQ(run.wait(), 128 + SIGINT) << run.err();
    const std::string err = run.err();
    EXPECT_NE(err.find("prismaquant: stopped by SIGINT (Ctrl-C)"), std::string::npos) << err;
    EXPECT_NE(err.find("rerun the same command to resume"), std::string::npos) << err;
    EXPECT_EQ(err.find("error"), std::string::npos) << err;
  }
  EXPECT_FALSE(fs::exists(dir / "ckpt"));
  EXPECT_TRUE(fs::exists(state));
  for (const std::string& name : tree(dir.path())) {
    EXPECT_FALSE(name.ends_with(".lock")) << name;
    EXPECT_EQ(name.find(".tmp-"), std::string::npos) << name;
  }

  ChildRun rerun(args, dir / "rerun");
  ASSERT_EQ(rerun.wait(), 0) << rerun.err();
  EXPECT_NE(rerun.err().find("resumed after step"), std::string::npos) << rerun.err();
  EXPECT_TRUE(fs::exists(dir / "ckpt" / "config.json"));
}

}  // namespace
}  // namespace pq
