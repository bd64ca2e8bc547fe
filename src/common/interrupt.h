#pragma once

#include <string>

#include "common/error.h"

namespace pq {

// Ctrl-C (SIGINT) and SIGTERM stop a run cleanly: the first signal only records itself, and the
// run stops at its next check point (before each decoder layer, each exported unit, each costed
// Linear) by throwing Interrupted. Unwinding removes what is half-written (staging directories,
// temporary files) and keeps what is complete, so rerunning the same command resumes. A second
// signal ends the process at once with the default action; the next run on the same location
// cleans up what that leaves behind.
class Interrupted : public Error {
 public:
  explicit Interrupted(int signal_number);
  int signal_number() const { return signal_number_; }

 private:
  int signal_number_;
};

// Installs the handlers for SIGINT and SIGTERM (the CLI does, once, before running a command).
void install_interrupt_handlers();

// The signal that asked the run to stop, or 0.
int interrupt_signal();

// A check point: throws Interrupted when a signal asked the run to stop.
void throw_if_interrupted();

// Marks the run as interrupted by `signal_number` (0 clears it) without a signal: tests use it to
// exercise the check points.
void request_interrupt(int signal_number);

}  // namespace pq
