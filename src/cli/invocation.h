#pragma once

#include <string>

#include "common/file_util.h"

namespace pq::cli {

// The command line exactly as typed, for the model card: argv from /proc/self/cmdline (NUL
// separated), words holding shell metacharacters single-quoted so it can be pasted back.
inline std::string invocation() {
  const std::string raw = read_text_file("/proc/self/cmdline");
  std::string line;
  std::size_t begin = 0;
  while (begin < raw.size()) {
    std::size_t end = raw.find('\0', begin);
    if (end == std::string::npos) end = raw.size();
    std::string word = raw.substr(begin, end - begin);
    if (word.empty() || word.find_first_of(" \t\n'\"\\$`*?[]{}()<>|&;#~") != std::string::npos) {
      std::string quoted = "'";
      for (const char c : word) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
      word = quoted + "'";
    }
    line += line.empty() ? word : " " + word;
    begin = end + 1;
  }
  return line;
}

}  // namespace pq::cli
