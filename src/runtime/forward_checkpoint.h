#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <string>

namespace pq::runtime {

// A forward pass's progress on disk (Model::forward): after each decoder layer, its output (the
// next layer's input, [rows, hidden] float32) and how many layers are done, so that a pass killed
// after layer l starts again at layer l + 1 instead of the embedding, and a pass whose layers are
// all done runs only the head. The fingerprint names what the pass computes (the weights, the
// windows, the runtime options); a state of another fingerprint, or a damaged one, is cleared and
// the pass starts over. At most two boundaries are on disk at once: the new one is written before
// the old one goes. The directory is the caller's to remove when it no longer needs the pass.
class ForwardCheckpoint {
 public:
  ForwardCheckpoint(std::filesystem::path dir, std::string fingerprint);

  const std::filesystem::path& dir() const { return dir_; }
  // The layers already done of a pass of `layers` (0: none; the directory is then cleared) and,
  // when there are some, the last one's output in x.
  std::int64_t restore(std::int64_t layers, std::span<float> x) const;
  // Records that `layers_done` layers are done, x the last one's output.
  void save(std::int64_t layers_done, std::span<const float> x) const;
  // The most disk a pass over `rows` rows of `hidden` features holds: two boundaries.
  static std::uint64_t disk_bytes(std::int64_t rows, std::int64_t hidden);

 private:
  std::filesystem::path boundary_path(std::int64_t layers_done) const;

  std::filesystem::path dir_;
  std::string fingerprint_;
};

}  // namespace pq::runtime
