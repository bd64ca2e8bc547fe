#pragma once

#include <cmath>
#include <string>

#include "runtime/observer.h"

namespace pq::runtime {

// The Linear whose weight gradient in `other` differs most from `reference`, by the relative
// Frobenius error ||other - reference|| / ||reference||; Linears with a zero reference gradient
// (an expert no token was routed to) are skipped.
struct GradientDifference {
  double relative = 0.0;
  std::string linear;
};

inline GradientDifference worst_gradient_difference(const WeightGradientCollector& reference,
                                                    const WeightGradientCollector& other) {
  GradientDifference worst;
  for (const auto& [linear, g] : reference.gradients()) {
    const auto& h = other.gradients().at(linear);
    double diff = 0.0, norm = 0.0;
    for (std::size_t i = 0; i < g.size(); ++i) {
      diff += (static_cast<double>(h[i]) - g[i]) * (static_cast<double>(h[i]) - g[i]);
      norm += static_cast<double>(g[i]) * g[i];
    }
    if (norm == 0.0) continue;
    const double relative = std::sqrt(diff / norm);
    if (relative > worst.relative) worst = {relative, linear};
  }
  return worst;
}

}  // namespace pq::runtime
