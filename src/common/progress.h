#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace pq {

// Progress of one long stage. On a terminal it redraws a bar on stderr; otherwise it stays quiet
// until finish(), which prints one summary line. PQ_QUIET=1 silences both. A bar destroyed
// unfinished (an error is unwinding) prints no summary.
class ProgressBar {
 public:
  ProgressBar(std::string label, std::uint64_t total);
  ~ProgressBar();
  void advance(std::uint64_t n = 1);
  void finish(const std::string& summary = "");

 private:
  void draw(bool force);

  std::string label_;
  std::uint64_t total_;
  std::uint64_t done_ = 0;
  bool tty_;
  bool quiet_;
  bool finished_ = false;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_draw_;
};

}  // namespace pq
