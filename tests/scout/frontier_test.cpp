#include "scout/frontier.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace pq::scout {
namespace {

TEST(NonDominated, KeepsTheLowerLeftStaircaseOrderedByBits) {
  const std::vector<MeasuredPoint> points = {
      {5.0, 0.10},  // 0: kept
      {4.5, 0.30},  // 1: kept
      {5.5, 0.12},  // 2: dominated by 0 (more bits, more KL)
      {6.0, 0.05},  // 3: kept
      {4.5, 0.40},  // 4: dominated by 1 (same bits, more KL)
  };
  EXPECT_EQ(non_dominated(points), (std::vector<std::size_t>{1, 0, 3}));
}

TEST(NonDominated, DropsGainsWithinEta) {
  // 6 bits buys a KL drop of 5e-6 over 5 bits: below eta = 1e-5, so it is noise.
  const std::vector<MeasuredPoint> points = {{5.0, 0.1}, {6.0, 0.1 - 5e-6}, {7.0, 0.09}};
  EXPECT_EQ(non_dominated(points), (std::vector<std::size_t>{0, 2}));
  EXPECT_EQ(non_dominated(points, 0.0), (std::vector<std::size_t>{0, 1, 2}));
}

TEST(FrontierKnee, MaximumDistanceBelowTheChord) {
  // Normalised (x, y) and (1 - x) - y: (0,1) 0; (.0625,.6) .3375; (.125,.15) .725;
  // (.25,.1) .65; (.375,.06) .565; (.5,.03) .47; (1,0) 0.
  const std::vector<MeasuredPoint> frontier = {{4.0, 1.0},  {4.25, 0.6}, {4.5, 0.15}, {5.0, 0.1},
                                               {5.5, 0.06}, {6.0, 0.03}, {8.0, 0.0}};
  EXPECT_EQ(frontier_knee(frontier), 2u);
}

TEST(FrontierKnee, CentrePointWhenAnEndpointWins) {
  // Concave: every interior point lies above the chord.
  const std::vector<MeasuredPoint> frontier = {
      {4.0, 1.0}, {5.0, 0.95}, {6.0, 0.85}, {7.0, 0.6}, {8.0, 0.0}};
  EXPECT_EQ(frontier_knee(frontier), 2u);
}

TEST(FrontierKnee, NoneBelowThreePoints) {
  const std::vector<MeasuredPoint> frontier = {{4.0, 1.0}, {5.0, 0.5}};
  EXPECT_FALSE(frontier_knee(frontier).has_value());
}

TEST(LargestGapBeside, PicksTheWiderNeighbourGap) {
  const std::vector<MeasuredPoint> frontier = {{4.0, 1.0}, {4.25, 0.5}, {5.0, 0.2}, {5.1, 0.1}};
  const auto gap = largest_gap_beside(frontier, 1);
  ASSERT_TRUE(gap.has_value());
  EXPECT_EQ(gap->left, 1u);
  EXPECT_EQ(gap->right, 2u);
  EXPECT_DOUBLE_EQ(gap->width(), 0.75);
  EXPECT_DOUBLE_EQ(gap->midpoint(), 4.625);

  const auto at_end = largest_gap_beside(frontier, 3);
  ASSERT_TRUE(at_end.has_value());
  EXPECT_EQ(at_end->left, 2u);
  const auto at_start = largest_gap_beside(frontier, 0);
  ASSERT_TRUE(at_start.has_value());
  EXPECT_EQ(at_start->left, 0u);
}

TEST(LeaveOneOut, StableKneeOnACraftedFrontier) {
  // The knee (4.5, 0.15) sits deep in the elbow: dropping any other point leaves it the knee.
  const std::vector<MeasuredPoint> frontier = {{4.0, 1.0},  {4.25, 0.6}, {4.5, 0.15}, {5.0, 0.1},
                                               {5.5, 0.06}, {6.0, 0.03}, {8.0, 0.0}};
  const LeaveOneOut check = leave_one_out(frontier, 2);
  EXPECT_TRUE(check.stable);
  EXPECT_TRUE(check.moved_by.empty());
}

TEST(LeaveOneOut, UnstableWhenAnEndpointCarriesTheKnee) {
  // Knee at (1, 0.1). Without (0, 1) the rest normalises to x (0, 1/3, 2/3, 1), y (1, .5, .2, 0):
  // differences 0, .167, .133, 0, so the knee moves to (2, 0.05).
  const std::vector<MeasuredPoint> frontier = {
      {0.0, 1.0}, {1.0, 0.1}, {2.0, 0.05}, {3.0, 0.02}, {4.0, 0.0}};
  ASSERT_EQ(frontier_knee(frontier), 1u);
  const LeaveOneOut check = leave_one_out(frontier, 1);
  EXPECT_FALSE(check.stable);
  EXPECT_EQ(check.moved_by, (std::vector<std::size_t>{0}));
}

TEST(BitsToReach, InterpolatesBetweenFrontierPoints) {
  const std::vector<MeasuredPoint> frontier = {{4.5, 0.4}, {5.0, 0.2}, {6.0, 0.1}};
  EXPECT_DOUBLE_EQ(*bits_to_reach(frontier, 0.3), 4.75);
  EXPECT_DOUBLE_EQ(*bits_to_reach(frontier, 0.15), 5.5);
  EXPECT_DOUBLE_EQ(*bits_to_reach(frontier, 0.5), 4.5);  // the first point already matches
  EXPECT_FALSE(bits_to_reach(frontier, 0.05).has_value());
}

TEST(Spearman, RankCorrelation) {
  const std::vector<double> x = {1, 2, 3, 4, 5};
  EXPECT_DOUBLE_EQ(*spearman(x, std::vector<double>{10, 20, 30, 40, 50}), 1.0);
  EXPECT_DOUBLE_EQ(*spearman(x, std::vector<double>{5, 4, 3, 2, 1}), -1.0);
  // Monotone but non-linear: ranks agree exactly.
  EXPECT_DOUBLE_EQ(*spearman(x, std::vector<double>{1, 8, 27, 64, 1000}), 1.0);
  // d = (0, 0, 1, -1, 0): 1 - 6 * 2 / (5 * 24) = 0.9 (no ties).
  EXPECT_NEAR(*spearman(x, std::vector<double>{1, 2, 4, 3, 5}), 0.9, 1e-12);
  // Ties take average ranks: y ranks (1.5, 1.5, 3); Pearson of (1,2,3) with them = sqrt(3)/2.
  EXPECT_NEAR(*spearman(std::vector<double>{1, 2, 3}, std::vector<double>{7, 7, 9}),
              std::sqrt(3.0) / 2.0, 1e-12);
  EXPECT_FALSE(spearman(x, std::vector<double>{1, 1, 1, 1, 1}).has_value());
  EXPECT_FALSE(spearman(std::vector<double>{1}, std::vector<double>{2}).has_value());
}

}  // namespace
}  // namespace pq::scout
