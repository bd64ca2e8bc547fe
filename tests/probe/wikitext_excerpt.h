#pragma once

#include <filesystem>
#include <string>

#include "common/file_util.h"
#include "support/test_support.h"

namespace pq::test {

// The first 48 KB (whole lines) of ../shared/data/wikitext-2-test.txt written into `dir`: enough
// windows for small calibrations (about 12k tokens), and quick to tokenize, which the probe does
// on every run. Used by the probe, cost and pipeline tests.
inline std::filesystem::path wikitext_excerpt(const TempDir& dir) {
  std::string text = read_text_file(shared_dir() / "data/wikitext-2-test.txt");
  text.resize(text.rfind('\n', 48 * 1024) + 1);
  const std::filesystem::path path = dir / "wikitext-excerpt.txt";
  write_text_file_atomic(path, text);
  return path;
}

}  // namespace pq::test
