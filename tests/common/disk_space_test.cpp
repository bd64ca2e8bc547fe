#include "common/disk_space.h"

#include <gtest/gtest.h>

#include <string>

#include "common/error.h"
#include "support/test_support.h"

namespace pq {
namespace {

TEST(DiskSpace, LocationsNotYetCreatedUseTheirNearestAncestor) {
  test::TempDir dir;
  const auto here = available_disk_bytes(dir.path());
  const auto below = available_disk_bytes(dir / "a" / "b" / "c");
  ASSERT_TRUE(here.has_value());
  ASSERT_TRUE(below.has_value());
  EXPECT_GT(*here, 0u);
  EXPECT_TRUE(same_filesystem(dir / "a" / "b", dir.path()));
  EXPECT_FALSE(same_filesystem(dir.path(), "/proc/self"));
}

TEST(DiskSpace, MoreThanIsFreeIsRefusedNamingWhatItIsFor) {
  test::TempDir dir;
  const std::uint64_t free = *available_disk_bytes(dir.path());
  EXPECT_NO_THROW(require_disk_space(dir / "out", 1, "a test"));
  try {
    require_disk_space(dir / "out", free + (std::uint64_t{1} << 40), "the checkpoint");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("the checkpoint needs about"), std::string::npos) << message;
    EXPECT_NE(message.find("GB are free there"), std::string::npos) << message;
    EXPECT_NE(message.find((dir / "out").string()), std::string::npos) << message;
  }
}

}  // namespace
}  // namespace pq
