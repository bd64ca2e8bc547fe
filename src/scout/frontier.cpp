#include "scout/frontier.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "alloc/pareto.h"
#include "common/error.h"

namespace pq::scout {

std::vector<std::size_t> non_dominated(std::span<const MeasuredPoint> points, double eta) {
  std::vector<std::size_t> order(points.size());
  std::iota(order.begin(), order.end(), 0);
  // Bits ascending, then KL ascending, then index: a sweep keeps a point only when its KL is
  // below the best KL so far by more than eta.
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    if (points[a].bits != points[b].bits) return points[a].bits < points[b].bits;
    return points[a].kl < points[b].kl;
  });
  std::vector<std::size_t> kept;
  for (const std::size_t i : order) {
    if (kept.empty() || points[i].kl < points[kept.back()].kl - eta) kept.push_back(i);
  }
  return kept;
}

std::optional<std::size_t> frontier_knee(std::span<const MeasuredPoint> frontier) {
  if (frontier.size() < 3) return std::nullopt;
  std::vector<double> x, y;
  for (const MeasuredPoint& p : frontier) {
    x.push_back(p.bits);
    y.push_back(p.kl);
  }
  if (const auto knee = alloc::kneedle(x, y)) return knee;
  return frontier.size() / 2;
}

std::optional<FrontierGap> largest_gap_beside(std::span<const MeasuredPoint> frontier,
                                              std::size_t knee) {
  PQ_CHECK(knee < frontier.size(), "scout: knee {} outside a frontier of {} points", knee,
           frontier.size());
  std::optional<FrontierGap> best;
  const auto consider = [&](std::size_t left) {
    const FrontierGap gap{left, left + 1, frontier[left].bits, frontier[left + 1].bits};
    if (!best || gap.width() > best->width()) best = gap;
  };
  if (knee > 0) consider(knee - 1);
  if (knee + 1 < frontier.size()) consider(knee);
  return best;
}

LeaveOneOut leave_one_out(std::span<const MeasuredPoint> frontier, std::size_t knee) {
  LeaveOneOut result;
  std::vector<MeasuredPoint> rest;
  for (std::size_t drop = 0; drop < frontier.size(); ++drop) {
    if (drop == knee) continue;
    rest.clear();
    for (std::size_t i = 0; i < frontier.size(); ++i) {
      if (i != drop) rest.push_back(frontier[i]);
    }
    const std::size_t knee_in_rest = knee > drop ? knee - 1 : knee;
    const std::optional<std::size_t> moved = frontier_knee(rest);
    if (moved != knee_in_rest) {
      result.stable = false;
      result.moved_by.push_back(drop);
    }
  }
  return result;
}

std::optional<double> bits_to_reach(std::span<const MeasuredPoint> frontier, double kl) {
  for (std::size_t i = 0; i < frontier.size(); ++i) {
    if (frontier[i].kl > kl) continue;
    if (i == 0) return frontier[0].bits;
    const MeasuredPoint& a = frontier[i - 1];
    const MeasuredPoint& b = frontier[i];
    const double t = (a.kl - kl) / (a.kl - b.kl);
    return a.bits + t * (b.bits - a.bits);
  }
  return std::nullopt;
}

namespace {

// Ranks 1..n, ties sharing the average of the ranks they span.
std::vector<double> average_ranks(std::span<const double> values) {
  std::vector<std::size_t> order(values.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(),
            [&](std::size_t a, std::size_t b) { return values[a] < values[b]; });
  std::vector<double> ranks(values.size());
  for (std::size_t first = 0; first < order.size();) {
    std::size_t last = first;
    while (last + 1 < order.size() && values[order[last + 1]] == values[order[first]]) ++last;
    const double rank = (static_cast<double>(first + last) / 2.0) + 1.0;
    for (std::size_t k = first; k <= last; ++k) ranks[order[k]] = rank;
    first = last + 1;
  }
  return ranks;
}

}  // namespace

std::optional<double> spearman(std::span<const double> x, std::span<const double> y) {
  PQ_CHECK(x.size() == y.size(), "spearman: samples of {} and {} values", x.size(), y.size());
  if (x.size() < 2) return std::nullopt;
  const std::vector<double> rx = average_ranks(x);
  const std::vector<double> ry = average_ranks(y);
  const double mean = (static_cast<double>(x.size()) + 1.0) / 2.0;
  double sxy = 0.0, sxx = 0.0, syy = 0.0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    sxy += (rx[i] - mean) * (ry[i] - mean);
    sxx += (rx[i] - mean) * (rx[i] - mean);
    syy += (ry[i] - mean) * (ry[i] - mean);
  }
  if (sxx == 0.0 || syy == 0.0) return std::nullopt;
  return sxy / std::sqrt(sxx * syy);
}

}  // namespace pq::scout
