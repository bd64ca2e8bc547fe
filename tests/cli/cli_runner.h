#pragma once
// Runs the built `prismaquant` binary as a user would (PQ_PRISMAQUANT_PATH, set by CMake) and
// checks the one-line error contract of every command.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "support/test_support.h"

namespace pq::test {

struct RunResult {
  int exit_code = -1;
  std::string out;
  std::string err;
};

inline std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

inline std::string quoted(const std::filesystem::path& path) {
  return fmt::format("'{}'", path.string());
}

// The shared WikiText-2 test text, shell-quoted, for commands that take --data.
inline std::string data_file() {
  return quoted(shared_dir() / "data" / "wikitext-2-test.txt");
}

// Runs prismaquant with `args` (already shell-quoted) and captures stdout, stderr and status.
inline RunResult run_prismaquant(const std::string& args) {
  TempDir dir;
  const std::string command = fmt::format("'{}' {} > '{}' 2> '{}'", PQ_PRISMAQUANT_PATH, args,
                                          (dir / "out").string(), (dir / "err").string());
  const int status = std::system(command.c_str());
  RunResult result;
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  result.out = read_file(dir / "out");
  result.err = read_file(dir / "err");
  return result;
}

// Exit status 1, and stderr holds exactly one line, "prismaquant: error: <what>", containing
// `fragment`.
inline void expect_one_line_error(const RunResult& result, const std::string& fragment) {
  EXPECT_EQ(result.exit_code, 1);
  EXPECT_TRUE(result.out.empty()) << result.out;
  ASSERT_FALSE(result.err.empty());
  EXPECT_EQ(result.err.find('\n'), result.err.size() - 1) << result.err;
  EXPECT_TRUE(result.err.starts_with("prismaquant: error: ")) << result.err;
  EXPECT_NE(result.err.find(fragment), std::string::npos) << result.err;
}

}  // namespace pq::test
