#pragma once

#include <span>
#include <string>

namespace pq::report {

// One measured candidate of `prismaquant scout`.
struct ScoutPlotPoint {
  std::string label;  // candidate id, e.g. "L2@4.75/1"
  std::string stage;  // L1, L2, L3, bisect, polish: picks the marker colour
  double bits = 0.0;
  double predicted_dloss = 0.0;
  double measured_kl = 0.0;
  bool chosen = false;  // ringed
};

// scout.svg: measured held-out KL against the surrogate's predicted dL, both on log axes (points
// with a non-positive value are listed but not drawn), one colour per stage, the shipped choice
// ringed, and a table of every candidate's bits, predicted dL and KL.
std::string scout_svg(std::span<const ScoutPlotPoint> points);

}  // namespace pq::report
