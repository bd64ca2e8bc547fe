#include "runtime/forward_checkpoint.h"

#include <fmt/format.h>

#include <exception>
#include <system_error>
#include <utility>
#include <vector>

#include "common/error.h"
#include "common/file_util.h"
#include "common/pass_state.h"

namespace pq::runtime {

ForwardCheckpoint::ForwardCheckpoint(std::filesystem::path dir, std::string fingerprint)
    : dir_(std::move(dir)), fingerprint_(std::move(fingerprint)) {}

std::filesystem::path ForwardCheckpoint::boundary_path(std::int64_t layers_done) const {
  return dir_ / fmt::format("x.{}.f32", layers_done);
}

std::int64_t ForwardCheckpoint::restore(std::int64_t layers, std::span<float> x) const {
  const auto done = static_cast<std::int64_t>(
      read_pass_steps_done(dir_, fingerprint_, static_cast<std::size_t>(layers)));
  if (done > 0) {
    try {
      const std::vector<float> saved = read_f32_file(boundary_path(done), x.size());
      std::copy(saved.begin(), saved.end(), x.begin());
      return done;
    } catch (const std::exception& e) {
      fmt::print(stderr, "warning: {}; starting the pass over\n", e.what());
    }
  }
  std::error_code error;
  std::filesystem::remove_all(dir_, error);
  return 0;
}

void ForwardCheckpoint::save(std::int64_t layers_done, std::span<const float> x) const {
  std::error_code error;
  std::filesystem::create_directories(dir_, error);
  PQ_CHECK(!error, "{}: cannot create the pass directory: {}", dir_.string(), error.message());
  write_f32_file(boundary_path(layers_done), x);
  write_pass_steps_done(dir_, fingerprint_, static_cast<std::size_t>(layers_done));
  if (layers_done > 0) std::filesystem::remove(boundary_path(layers_done - 1), error);
}

std::uint64_t ForwardCheckpoint::disk_bytes(std::int64_t rows, std::int64_t hidden) {
  return 2 * static_cast<std::uint64_t>(rows) * static_cast<std::uint64_t>(hidden) * sizeof(float);
}

}  // namespace pq::runtime
