#pragma once

#include <filesystem>
#include <string>

namespace pq {

// One run's exclusive hold on a location it writes (a checkpoint directory, a work directory, a
// stage's output directory), so that a second run on the same location fails at once instead of
// mixing its files with the first one's (issue 13).
//
// The lock is flock(2) on LOCATION.lock beside the location, which names the holder (pid, start
// time, command line). The kernel drops it when the holder exits, however it exits, so a killed
// run never leaves a location locked; a leftover LOCATION.lock is taken over by the next run.
// Within one process the lock is re-entrant: quantize holds its output and work directories for
// the whole run, and the stages it calls take the same locks again without conflict.
//
// Taking the lock also removes what a killed run left directly inside the location: the
// temporaries of AtomicFileWriter (NAME.tmp-XXXXXXXX), which no live run can own while the
// location is locked.
class LocationLock {
 public:
  // Throws pq::Error naming the location and the run holding it, or when the lock file cannot be
  // created (a location that cannot be written is refused here, before any work).
  explicit LocationLock(const std::filesystem::path& location);
  ~LocationLock();
  LocationLock(const LocationLock&) = delete;
  LocationLock& operator=(const LocationLock&) = delete;

 private:
  std::string key_;  // canonical location: the re-entrancy key
  std::filesystem::path lock_file_;
  int fd_ = -1;  // -1: this process already held the lock
};

// What a lock file says about its holder: the command line the CLI records here (default
// "prismaquant"), with the pid and start time added.
void set_run_description(std::string description);

}  // namespace pq
