#include "common/interrupt.h"

#include <signal.h>
#include <string.h>
#include <unistd.h>

#include <atomic>

namespace pq {

namespace {

// Lock-free, so the handler may write it (async-signal-safe).
std::atomic<int> pending_signal{0};
static_assert(std::atomic<int>::is_always_lock_free);

void on_signal(int signal_number) {
  if (pending_signal.exchange(signal_number) != 0) {
    // Asked twice: stop now, as if no handler were installed.
    ::signal(signal_number, SIG_DFL);
    ::raise(signal_number);
    return;
  }
  // write(2) and strlen are async-signal-safe (POSIX.1-2016, signal-safety(7)); nothing else runs.
  const char* message = signal_number == SIGINT
                            ? "\nprismaquant: interrupted (SIGINT); stopping at the next check "
                              "point, press Ctrl-C again to stop at once\n"
                            : "\nprismaquant: terminated (SIGTERM); stopping at the next check "
                              "point\n";
  [[maybe_unused]] const ssize_t written = ::write(STDERR_FILENO, message, ::strlen(message));
}

}  // namespace

Interrupted::Interrupted(int signal_number)
    : Error(fmt::format("stopped by {}; half-written files were removed and finished work is "
                        "kept: rerun the same command to resume",
                        signal_number == SIGINT    ? "SIGINT (Ctrl-C)"
                        : signal_number == SIGTERM ? "SIGTERM"
                                                   : fmt::format("signal {}", signal_number))),
      signal_number_(signal_number) {}

void install_interrupt_handlers() {
  struct sigaction action {};
  action.sa_handler = on_signal;
  ::sigemptyset(&action.sa_mask);
  // Restart interrupted reads and writes: the run stops at a check point, not inside a syscall.
  action.sa_flags = SA_RESTART;
  ::sigaction(SIGINT, &action, nullptr);
  ::sigaction(SIGTERM, &action, nullptr);
}

int interrupt_signal() {
  return pending_signal.load();
}

void throw_if_interrupted() {
  if (const int signal_number = pending_signal.load(); signal_number != 0) {
    throw Interrupted(signal_number);
  }
}

void request_interrupt(int signal_number) {
  pending_signal.store(signal_number);
}

}  // namespace pq
