#include "alloc/budget.h"

#include <gtest/gtest.h>

#include "common/error.h"

namespace pq::alloc {
namespace {

TEST(BudgetTest, BitsTargetIsExactDecimal) {
  const BitsTarget target = parse_bits_target("4.6");
  EXPECT_EQ(target.mantissa, 46u);
  EXPECT_EQ(target.decimals, 1u);
  EXPECT_DOUBLE_EQ(target.value, 4.6);
  // 4.6 * 200 / 8 = 115 exactly; in binary floating point 4.6 * 200 / 8 is just below 115.
  EXPECT_EQ(target.budget_bytes(200), 115u);
  EXPECT_EQ(parse_bits_target("4.35").budget_bytes(800), 435u);
  EXPECT_EQ(parse_bits_target("4.75").budget_bytes(1000), 593u);  // floor(593.75)
  EXPECT_EQ(parse_bits_target("16").budget_bytes(3), 6u);
  // A 1-trillion-parameter model does not overflow.
  EXPECT_EQ(parse_bits_target("8.25").budget_bytes(1'000'000'000'000ull), 1'031'250'000'000ull);
}

TEST(BudgetTest, BitsTargetRejectsNonNumbers) {
  for (const char* bad : {"", "abc", "4.5x", "-4", "0", "0.0", "4..5", "1e3", "4,5"}) {
    EXPECT_THROW(parse_bits_target(bad), pq::Error) << bad;
  }
}

TEST(BudgetTest, BitsTargetList) {
  const auto targets = parse_bits_targets("4.5, 4.75,5");
  ASSERT_EQ(targets.size(), 3u);
  EXPECT_EQ(targets[0].text, "4.5");
  EXPECT_EQ(targets[1].text, "4.75");
  EXPECT_EQ(targets[2].text, "5");
  EXPECT_THROW(parse_bits_targets("4.5,,5"), pq::Error);
}

TEST(BudgetTest, ByteSizesWithUnits) {
  EXPECT_EQ(parse_byte_size("123456"), 123456u);
  EXPECT_EQ(parse_byte_size("512B"), 512u);
  EXPECT_EQ(parse_byte_size("24GB"), 24'000'000'000ull);
  EXPECT_EQ(parse_byte_size("24 gb"), 24'000'000'000ull);
  EXPECT_EQ(parse_byte_size("1.5GiB"), 1'610'612'736ull);
  EXPECT_EQ(parse_byte_size("2KiB"), 2048u);
  EXPECT_EQ(parse_byte_size("3MB"), 3'000'000u);
  EXPECT_EQ(parse_byte_size("1TiB"), 1ull << 40);
  EXPECT_EQ(parse_byte_size("0.0015KB"), 1u);  // rounds down to whole bytes
}

TEST(BudgetTest, ByteSizeErrors) {
  for (const char* bad : {"", "GB", "24XB", "24 G B x", "0", "0.0001KB", "-5GB"}) {
    EXPECT_THROW(parse_byte_size(bad), pq::Error) << bad;
  }
  EXPECT_THROW(parse_byte_size("99999999999999TB"), pq::Error);  // beyond 2^64 bytes
}

}  // namespace
}  // namespace pq::alloc
