#include "common/progress.h"

#include <fmt/format.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace pq {

ProgressBar::ProgressBar(std::string label, std::uint64_t total)
    : label_(std::move(label)),
      total_(total),
      tty_(::isatty(STDERR_FILENO) == 1),
      quiet_(std::getenv("PQ_QUIET") != nullptr && std::strcmp(std::getenv("PQ_QUIET"), "0") != 0),
      start_(std::chrono::steady_clock::now()),
      last_draw_(start_) {}

ProgressBar::~ProgressBar() {
  // Unfinished: an error or an interruption is unwinding, and its message is the one line that
  // reports it. A drawn bar only has its line ended so the message starts on a line of its own.
  if (!finished_ && tty_ && !quiet_) std::fputc('\n', stderr);
}

void ProgressBar::advance(std::uint64_t n) {
  done_ += n;
  draw(false);
}

void ProgressBar::draw(bool force) {
  if (quiet_ || !tty_) return;
  const auto now = std::chrono::steady_clock::now();
  if (!force && now - last_draw_ < std::chrono::milliseconds(100)) return;
  last_draw_ = now;
  constexpr int kWidth = 30;
  const double fraction = total_ == 0 ? 1.0 : static_cast<double>(done_) / total_;
  const int filled = static_cast<int>(fraction * kWidth + 0.5);
  const double seconds = std::chrono::duration<double>(now - start_).count();
  std::fprintf(stderr, "\r%-16s [%s%s] %llu/%llu %.1fs", label_.c_str(),
               std::string(static_cast<std::size_t>(filled), '#').c_str(),
               std::string(static_cast<std::size_t>(kWidth - filled), '.').c_str(),
               static_cast<unsigned long long>(done_), static_cast<unsigned long long>(total_),
               seconds);
  std::fflush(stderr);
}

void ProgressBar::finish(const std::string& summary) {
  if (finished_) return;
  finished_ = true;
  if (quiet_) return;
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  if (tty_) {
    draw(true);
    std::fputc('\n', stderr);
  }
  std::fprintf(stderr, "%s: %llu/%llu done in %.1fs%s%s\n", label_.c_str(),
               static_cast<unsigned long long>(done_), static_cast<unsigned long long>(total_),
               seconds, summary.empty() ? "" : ", ", summary.c_str());
}

}  // namespace pq
