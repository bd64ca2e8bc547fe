// The strict JSON reader every file the tool consumes goes through (common/json_reader.h).
#include "common/json_reader.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>

#include "common/error.h"
#include "common/file_util.h"
#include "model/config.h"
#include "support/test_support.h"

namespace pq {
namespace {

using ::testing::HasSubstr;

// A value `depth` arrays deep.
std::string nested(int depth) {
  return std::string(depth, '[') + "1" + std::string(depth, ']');
}

std::string error_of(std::string_view text, int max_depth = kMaxJsonDepth) {
  try {
    parse_json(text, "x.json", max_depth);
  } catch (const Error& error) {
    return error.what();
  }
  return "";
}

TEST(JsonReader, BoundsNestingBeforeAnyRecursion) {
  EXPECT_NO_THROW(parse_json(nested(kMaxJsonDepth), "x.json"));
  EXPECT_EQ(error_of(nested(kMaxJsonDepth + 1)), "x.json nests deeper than 64 levels");
  EXPECT_EQ(error_of(R"({"a": {"b": 1}})", 1), "x.json nests deeper than 1 levels");
  // 150,000 levels once overflowed the stack of every command through a recursive copy.
  EXPECT_EQ(error_of(nested(150000)), "x.json nests deeper than 64 levels");
}

TEST(JsonReader, RejectsDuplicateKeysSyntaxErrorsAndHugeNumbers) {
  EXPECT_EQ(error_of(R"({"a": 1, "b": {"a": 2}, "a": 3})"), R"(x.json has duplicate key "a")");
  EXPECT_NO_THROW(parse_json(R"({"a": {"a": 1}, "b": {"a": 2}})", "x.json"));
  EXPECT_EQ(error_of(R"({"a": 1,})"), "x.json is not valid JSON (syntax error at byte 9)");
  EXPECT_EQ(error_of("[1e400]"), "x.json is not valid JSON (a number is out of range)");
  // Raw input bytes never reach the message.
  EXPECT_EQ(error_of(R"({"a\n\u0001": 1, "a\n\u0001": 2})"),
            R"(x.json has duplicate key "a\n\u0001")");
}

// The regression of issue 13: a config.json with an unused field nested 150,000 deep.
TEST(JsonReader, DeeplyNestedConfigIsAOneLineError) {
  test::TempDir dir;
  write_text_file_atomic(dir / "config.json", R"({"unused": )" + nested(150000) + "}");
  try {
    model::ModelConfig::load(dir.path());
    ADD_FAILURE() << "accepted";
  } catch (const Error& error) {
    EXPECT_THAT(error.what(), HasSubstr((dir / "config.json").string()));
    EXPECT_THAT(error.what(), HasSubstr("nests deeper than 64 levels"));
  }
}

}  // namespace
}  // namespace pq
