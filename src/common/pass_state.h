#pragma once

#include <cstddef>
#include <filesystem>
#include <string>

namespace pq {

// The state file (state.json) of a resumable pass (the probe's, the KL-Fisher pass's, a forward
// pass's layer checkpoint): how many steps are finished, under which fingerprint.
// read_pass_steps_done gives 0 for an absent, damaged or foreign state, and warns about a count
// that is not a step count of the pass (0 to steps_total), which is never trusted.
std::size_t read_pass_steps_done(const std::filesystem::path& pass_dir,
                                 const std::string& fingerprint, std::size_t steps_total);
void write_pass_steps_done(const std::filesystem::path& pass_dir, const std::string& fingerprint,
                           std::size_t steps_done);

}  // namespace pq
