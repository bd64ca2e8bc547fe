#pragma once

#include <cstddef>
#include <optional>
#include <span>
#include <vector>

namespace pq::scout {

// One measured candidate: bits per quantizable parameter and held-out KL.
struct MeasuredPoint {
  double bits = 0.0;
  double kl = 0.0;
};

// Indices of the points no other point dominates, ordered by bits ascending (so KL strictly
// descends). Point a dominates b when a.bits <= b.bits and a.kl <= b.kl + eta with one of them
// strict beyond the tolerance: the eta-dominance filter of PrismaSCOUT (method-facts.md §6,
// eta = 1e-5), which drops points that buy more bits for a KL gain below measurement noise.
// Among exact duplicates the first index is kept.
std::vector<std::size_t> non_dominated(std::span<const MeasuredPoint> points, double eta = 1e-5);

// The knee of a measured frontier (bits ascending, KL descending): the point of maximum
// perpendicular distance to the secant between the endpoints on min-max normalised axes with KL
// flipped (alloc::kneedle). When no interior point lies beyond the secant (an endpoint wins), the
// centre point, as PrismaSCOUT does (method-facts.md §6). Nullopt below 3 points.
std::optional<std::size_t> frontier_knee(std::span<const MeasuredPoint> frontier);

// The wider of the two gaps in bits beside the knee: [knee - 1, knee] or [knee, knee + 1].
struct FrontierGap {
  std::size_t left = 0;  // indices into the frontier, left + 1 == right
  std::size_t right = 0;
  double left_bits = 0.0;
  double right_bits = 0.0;
  double width() const { return right_bits - left_bits; }
  double midpoint() const { return (left_bits + right_bits) / 2.0; }
};
std::optional<FrontierGap> largest_gap_beside(std::span<const MeasuredPoint> frontier,
                                              std::size_t knee);

// Leave-one-out check of a knee: for every frontier point other than the knee, drop it and find
// the knee of the rest. Stable when every such knee is the same point.
struct LeaveOneOut {
  bool stable = true;
  // The frontier indices whose removal moved the knee (or left no knee at all).
  std::vector<std::size_t> moved_by;
};
LeaveOneOut leave_one_out(std::span<const MeasuredPoint> frontier, std::size_t knee);

// The smallest bits at which the frontier (bits ascending, KL descending), linearly interpolated
// between points, reaches `kl` or less; nullopt when even its last point stays above.
std::optional<double> bits_to_reach(std::span<const MeasuredPoint> frontier, double kl);

// Spearman's rank correlation of two equally long samples (average ranks for ties); nullopt with
// fewer than 2 values or when either sample is constant.
std::optional<double> spearman(std::span<const double> x, std::span<const double> y);

}  // namespace pq::scout
