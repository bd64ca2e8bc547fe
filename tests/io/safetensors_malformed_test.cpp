// Every kind of malformed safetensors file or index the reader must reject, each with its own
// one-line pq::Error naming the file and, where one is at fault, the tensor.
#include <gtest/gtest.h>

#include <fstream>

#include "common/error.h"
#include "common/file_util.h"
#include "io/safetensors.h"
#include "io/safetensors_writer.h"
#include "support/test_support.h"

namespace pq::io {
namespace {

namespace fs = std::filesystem;

void write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary)
      .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string length_prefix(std::uint64_t n) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  return out;
}

// A file with `header` as its JSON and `data_bytes` zero bytes of data.
std::string file_with(const std::string& header, std::size_t data_bytes) {
  return length_prefix(header.size()) + header + std::string(data_bytes, '\0');
}

// Opening `path` as a checkpoint fails with one line containing every fragment.
void expect_rejected(const fs::path& path, const std::vector<std::string>& fragments) {
  try {
    Checkpoint::open(path);
    ADD_FAILURE() << path << " was accepted";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
    for (const auto& fragment : fragments) {
      EXPECT_NE(message.find(fragment), std::string::npos)
          << "message \"" << message << "\" lacks \"" << fragment << "\"";
    }
  }
}

class MalformedFile : public ::testing::Test {
 protected:
  // Writes `bytes` as a .safetensors file and expects it rejected with the file's path and the
  // given fragments in the message.
  void expect_file_rejected(const std::string& bytes, std::vector<std::string> fragments) {
    const auto path = dir_ / "bad.safetensors";
    write_bytes(path, bytes);
    fragments.push_back(path.string());
    expect_rejected(path, fragments);
  }

  test::TempDir dir_;
};

TEST_F(MalformedFile, TooShortForTheLengthField) {
  expect_file_rejected(std::string("\x10\0\0", 3), {"3 bytes, too short"});
  expect_file_rejected("", {"0 bytes, too short"});
}

TEST_F(MalformedFile, HeaderLengthPastEndOfFile) {
  expect_file_rejected(length_prefix(100) + "{}", {"header length 100 runs past the end"});
}

TEST_F(MalformedFile, HeaderLengthOverTheLimit) {
  expect_file_rejected(length_prefix(100'000'001) + "{}", {"exceeds the 100000000 byte limit"});
  expect_file_rejected(length_prefix(~0ull) + "{}", {"exceeds the"});
}

TEST_F(MalformedFile, InvalidJson) {
  expect_file_rejected(file_with(R"({"a": {"dtype": "F32",)", 0),
                       {"header is not valid JSON", "byte"});
  expect_file_rejected(file_with("{\"\xff\": 1}", 0), {"header is not valid JSON"});
  expect_file_rejected(
      file_with(R"({"w": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}})", 4),
      {"header is not valid JSON", "out of range"});
}

TEST_F(MalformedFile, HeaderNotAnObject) {
  expect_file_rejected(file_with("[1, 2]  ", 0), {"header is not a JSON object"});
}

TEST_F(MalformedFile, MissingOrUnknownDtype) {
  expect_file_rejected(file_with(R"({"w": {"shape": [1], "data_offsets": [0, 4]}})", 4),
                       {"tensor \"w\"", "missing or non-string dtype"});
  expect_file_rejected(
      file_with(R"({"w": {"dtype": "F7", "shape": [1], "data_offsets": [0, 4]}})", 4),
      {"tensor \"w\"", "unsupported dtype \"F7\""});
}

TEST_F(MalformedFile, BadShape) {
  expect_file_rejected(
      file_with(R"({"w": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}})", 0),
      {"tensor \"w\"", "non-integer or negative"});
  expect_file_rejected(
      file_with(R"({"w": {"dtype": "U8", "shape": [1.5], "data_offsets": [0, 1]}})", 1),
      {"tensor \"w\"", "non-integer or negative"});
  expect_file_rejected(
      file_with(R"({"w": {"dtype": "U8", "shape": "2", "data_offsets": [0, 2]}})", 2),
      {"tensor \"w\"", "non-array shape"});
  // 2^62 x 4 elements overflow a signed 64-bit count.
  expect_file_rejected(file_with(R"({"w": {"dtype": "U8", "shape": [4611686018427387904, 4, 0],)"
                                 R"( "data_offsets": [0, 0]}})",
                                 0),
                       {"tensor \"w\"", "shape is too large"});
}

TEST_F(MalformedFile, ByteSizeDisagreesWithShape) {
  expect_file_rejected(
      file_with(R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", 8),
      {"tensor \"w\"", "holds 8 bytes but shape and dtype F32 need 12"});
}

TEST_F(MalformedFile, OffsetsPastTheEnd) {
  expect_file_rejected(
      file_with(R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", 10),
      {"tensor \"w\"", "run past the 10 byte data section"});
  expect_file_rejected(
      file_with(R"({"w": {"dtype": "U8", "shape": [0], "data_offsets": [5, 4]}})", 4),
      {"tensor \"w\"", "run backwards"});
}

TEST_F(MalformedFile, OverlappingTensors) {
  expect_file_rejected(
      file_with(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                R"( "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                12),
      {"tensor \"b\" overlaps tensor \"a\""});
}

TEST_F(MalformedFile, GapBetweenTensors) {
  expect_file_rejected(
      file_with(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},)"
                R"( "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}})",
                12),
      {"tensor \"b\"", "4 unused bytes before it"});
}

TEST_F(MalformedFile, TrailingBytes) {
  expect_file_rejected(
      file_with(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", 7),
      {"3 trailing bytes after the last tensor"});
}

TEST_F(MalformedFile, DuplicateTensorNames) {
  expect_file_rejected(file_with(R"({"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},)"
                                 R"( "w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}})",
                                 2),
                       {"duplicate key \"w\""});
}

TEST_F(MalformedFile, BadMetadata) {
  expect_file_rejected(file_with(R"({"__metadata__": ["pt"]})", 0),
                       {"__metadata__ is not an object"});
  expect_file_rejected(file_with(R"({"__metadata__": {"format": 1}})", 0),
                       {"__metadata__ value of \"format\" is not a string"});
}

TEST_F(MalformedFile, UnknownFieldAndBadOffsets) {
  expect_file_rejected(file_with(R"({"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1],)"
                                 R"( "stride": 1}})",
                                 1),
                       {"tensor \"w\"", "unknown field \"stride\""});
  expect_file_rejected(file_with(R"({"w": {"dtype": "U8", "shape": [1], "data_offsets": [0]}})", 1),
                       {"tensor \"w\"", "data_offsets must be [begin, end]"});
}

TEST_F(MalformedFile, ControlCharacterInName) {
  expect_file_rejected(
      file_with(R"({"a\nb": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}})", 1),
      {R"(tensor name "a\nb" contains a control character)"});
}

TEST_F(MalformedFile, NestingTooDeep) {
  expect_file_rejected(file_with(std::string(40, '[') + std::string(40, ']'), 0),
                       {"nests deeper than"});
}

// Sharded checkpoints: a valid two-shard checkpoint, then one defect at a time.
class MalformedIndex : public ::testing::Test {
 protected:
  void SetUp() override {
    write_shard("s1.safetensors", {"a", "b"});
    write_shard("s2.safetensors", {"c"});
  }
  void write_shard(const std::string& name, const std::vector<std::string>& tensors) {
    SafetensorsWriter writer(dir_ / name);
    const std::int64_t shape[] = {1};
    const std::uint8_t byte[] = {7};
    for (const auto& t : tensors) writer.add(t, DType::U8, shape, byte);
    writer.commit();
  }
  fs::path write_index(const std::string& text) {
    const auto path = dir_ / "model.safetensors.index.json";
    write_bytes(path, text);
    return path;
  }
  test::TempDir dir_;
};

constexpr const char* kGoodIndex =
    R"({"metadata": {"total_size": 3}, "weight_map": {"a": "s1.safetensors",)"
    R"( "b": "s1.safetensors", "c": "s2.safetensors"}})";

TEST_F(MalformedIndex, ValidIndexOpens) {
  write_index(kGoodIndex);
  const auto ckpt = Checkpoint::open(dir_.path());
  EXPECT_EQ(ckpt.tensor_names(), (std::vector<std::string>{"a", "b", "c"}));
  // Naming the index file itself opens the same checkpoint.
  EXPECT_EQ(Checkpoint::open(dir_ / "model.safetensors.index.json").files().size(), 2u);
}

TEST_F(MalformedIndex, PointsToMissingShard) {
  const auto index = write_index(R"({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors",)"
                                 R"( "c": "s3.safetensors"}})");
  expect_rejected(dir_.path(), {index.string(), "shard \"s3.safetensors\"", "missing"});
}

TEST_F(MalformedIndex, NamesTensorAbsentFromItsShard) {
  const auto index = write_index(R"({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors",)"
                                 R"( "c": "s2.safetensors"}})");
  expect_rejected(dir_.path(), {index.string(),
                                "tensor \"b\" in \"s2.safetensors\", which does not contain it"});
}

TEST_F(MalformedIndex, ShardHoldsTensorMissingFromIndex) {
  write_index(R"({"weight_map": {"a": "s1.safetensors", "c": "s2.safetensors"}})");
  expect_rejected(dir_.path(), {(dir_ / "s1.safetensors").string(), "tensor \"b\"", "not listed"});
}

TEST_F(MalformedIndex, TensorInTwoShards) {
  write_shard("s2.safetensors.tmp", {"c", "a"});
  fs::rename(dir_ / "s2.safetensors.tmp", dir_ / "s2.safetensors");
  write_index(kGoodIndex);
  expect_rejected(dir_.path(), {"tensor \"a\" is also in", (dir_ / "s1.safetensors").string(),
                                (dir_ / "s2.safetensors").string()});
}

TEST_F(MalformedIndex, NotJson) {
  const auto index = write_index(R"({"weight_map": {"a": "s1.safetensors",)");
  expect_rejected(dir_.path(), {index.string(), "index is not valid JSON"});
}

TEST_F(MalformedIndex, StructuralDefects) {
  auto index = write_index(R"({"weights": {}})");
  expect_rejected(dir_.path(), {index.string(), "no weight_map object"});
  write_index(R"({"weight_map": {}})");
  expect_rejected(dir_.path(), {index.string(), "weight_map is empty"});
  write_index(R"({"weight_map": {"a": "../s1.safetensors"}})");
  expect_rejected(dir_.path(), {index.string(), "entry \"a\" names an invalid shard \"../s1"});
  write_index(R"({"weight_map": {"a": "s1\nsafetensors"}})");
  expect_rejected(dir_.path(), {index.string(), R"(invalid shard "s1\nsafetensors")"});
  write_index(R"({"weight_map": {"a": 1}})");
  expect_rejected(dir_.path(), {index.string(), "entry \"a\" is not a file name"});
  write_index(R"({"metadata": {"total_size": -3}, "weight_map": {"a": "s1.safetensors"}})");
  expect_rejected(dir_.path(), {index.string(), "total_size is not a non-negative integer"});
  write_index(R"({"weight_map": {"a": "s1.safetensors", "a": "s2.safetensors"}})");
  expect_rejected(dir_.path(), {index.string(), "duplicate key \"a\""});
}

TEST(MalformedCheckpoint, MissingDirectoryOrFiles) {
  test::TempDir dir;
  expect_rejected(dir / "nope", {(dir / "nope").string(), "no such checkpoint"});
  expect_rejected(dir.path(), {dir.path().string(), "no model.safetensors"});
}

}  // namespace
}  // namespace pq::io
