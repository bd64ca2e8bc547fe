#include "io/safetensors_writer.h"

#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstring>
#include <fstream>
#include <random>

#include "common/error.h"
#include "common/file_util.h"
#include "io/safetensors.h"
#include "support/test_support.h"

namespace pq::io {
namespace {

namespace fs = std::filesystem;

std::vector<std::uint8_t> file_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::vector<std::uint8_t> random_bytes(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::uint8_t> out(n);
  for (auto& b : out) b = static_cast<std::uint8_t>(rng());
  return out;
}

std::vector<std::uint8_t> f32_bytes(std::initializer_list<float> values) {
  std::vector<std::uint8_t> out(values.size() * 4);
  std::memcpy(out.data(), values.begin(), out.size());
  return out;
}

std::vector<std::string> directory_listing(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) names.push_back(entry.path().filename());
  std::sort(names.begin(), names.end());
  return names;
}

// The reference serializer's own test vectors (huggingface/safetensors safetensors/src/tensor.rs:
// test_serialization, test_serialization_forced_alignement, test_empty), reproduced byte for byte.
TEST(SafetensorsWriter, MatchesReferenceSerializerBytes) {
  test::TempDir dir;
  const auto data = f32_bytes({0, 1, 2, 3, 4, 5});
  {
    SafetensorsWriter writer(dir / "a.safetensors", {});
    const std::int64_t shape[] = {1, 2, 3};
    writer.add("attn.0", DType::F32, shape, data);
    writer.commit();
    const std::string header =
        R"({"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}})";
    std::vector<std::uint8_t> expected = {64, 0, 0, 0, 0, 0, 0, 0};
    expected.insert(expected.end(), header.begin(), header.end());
    expected.insert(expected.end(), data.begin(), data.end());
    EXPECT_EQ(file_bytes(dir / "a.safetensors"), expected);
  }
  {
    SafetensorsWriter writer(dir / "b.safetensors", {});
    const std::int64_t shape[] = {1, 1, 2, 3};
    writer.add("attn0", DType::F32, shape, data);
    writer.commit();
    const std::string header =
        R"({"attn0":{"dtype":"F32","shape":[1,1,2,3],"data_offsets":[0,24]}})"
        "       ";  // padded with 7 spaces to 72 bytes
    std::vector<std::uint8_t> expected = {72, 0, 0, 0, 0, 0, 0, 0};
    expected.insert(expected.end(), header.begin(), header.end());
    expected.insert(expected.end(), data.begin(), data.end());
    EXPECT_EQ(file_bytes(dir / "b.safetensors"), expected);
  }
  {
    SafetensorsWriter writer(dir / "c.safetensors", {{"framework", "pt"}});
    writer.commit();
    const std::string header = R"({"__metadata__":{"framework":"pt"}}     )";
    std::vector<std::uint8_t> expected = {40, 0, 0, 0, 0, 0, 0, 0};
    expected.insert(expected.end(), header.begin(), header.end());
    EXPECT_EQ(file_bytes(dir / "c.safetensors"), expected);
  }
}

TEST(SafetensorsWriter, EveryDTypeRoundTripsBytesAndAlignment) {
  test::TempDir dir;
  const auto path = dir / "all.safetensors";
  std::map<std::string, std::vector<std::uint8_t>> written;
  {
    SafetensorsWriter writer(path);
    std::uint32_t seed = 1;
    for (const DType dtype : kAllDTypes) {
      // Odd element counts so a careless layout would misalign the wider types after these.
      const std::int64_t shape[] = {3, 5};
      auto bytes = random_bytes(15 * dtype_size(dtype), seed++);
      if (dtype == DType::BOOL) {
        for (auto& b : bytes) b &= 1;
      }
      const std::string name = fmt::format("t.{}", dtype_name(dtype));
      writer.add(name, dtype, shape, bytes);
      written[name] = bytes;
    }
    writer.commit();
  }
  const SafetensorsFile file(path);
  EXPECT_EQ(file.metadata(), default_safetensors_metadata());
  ASSERT_EQ(file.tensors().size(), std::size(kAllDTypes));
  const auto raw = file_bytes(path);
  std::uint64_t data_offset = 8;
  for (int i = 0; i < 8; ++i) data_offset += std::uint64_t{raw[i]} << (8 * i);
  EXPECT_EQ(data_offset % 8, 0u);
  for (const DType dtype : kAllDTypes) {
    const std::string name = fmt::format("t.{}", dtype_name(dtype));
    const TensorInfo* info = file.find(name);
    ASSERT_NE(info, nullptr) << name;
    EXPECT_EQ(info->dtype, dtype);
    EXPECT_EQ(info->shape, (std::vector<std::int64_t>{3, 5}));
    EXPECT_EQ(info->data_begin % dtype_size(dtype), 0u) << name << " is misaligned";
    const auto view = file.view(name);
    EXPECT_TRUE(std::equal(view.bytes.begin(), view.bytes.end(), written[name].begin(),
                           written[name].end()))
        << name;
  }
}

TEST(SafetensorsWriter, FloatValuesDecodeAfterRoundTrip) {
  test::TempDir dir;
  const auto path = dir / "f.safetensors";
  // F16: 1.0, smallest subnormal, largest subnormal, -65504, +inf.
  const std::uint16_t f16[] = {0x3c00, 0x0001, 0x03ff, 0xfbff, 0x7c00};
  // E4M3: 448, -min subnormal, NaN; E5M2: 57344, -inf, min subnormal.
  const std::uint8_t e4m3[] = {0x7e, 0x81, 0x7f};
  const std::uint8_t e5m2[] = {0x7b, 0xfc, 0x01};
  const std::uint16_t bf16[] = {0x3f80, 0xc040};
  {
    SafetensorsWriter writer(path);
    const std::int64_t s5[] = {5}, s3[] = {3}, s2[] = {2};
    writer.add("f16", DType::F16, s5, {reinterpret_cast<const std::uint8_t*>(f16), sizeof f16});
    writer.add("e4m3", DType::F8_E4M3, s3, e4m3);
    writer.add("e5m2", DType::F8_E5M2, s3, e5m2);
    writer.add("bf16", DType::BF16, s2, {reinterpret_cast<const std::uint8_t*>(bf16), sizeof bf16});
    writer.commit();
  }
  const auto ckpt = Checkpoint::open(path);
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(ckpt.to_f32("f16"), (std::vector<float>{1.0f, std::ldexp(1.0f, -24),
                                                    1023 * std::ldexp(1.0f, -24), -65504.0f, inf}));
  const auto e4 = ckpt.to_f32("e4m3");
  EXPECT_EQ(e4[0], 448.0f);
  EXPECT_EQ(e4[1], -std::ldexp(1.0f, -9));
  EXPECT_TRUE(std::isnan(e4[2]));
  EXPECT_EQ(ckpt.to_f32("e5m2"), (std::vector<float>{57344.0f, -inf, std::ldexp(1.0f, -16)}));
  EXPECT_EQ(ckpt.to_f32("bf16"), (std::vector<float>{1.0f, -3.0f}));
}

TEST(SafetensorsWriter, ScalarsEmptyTensorsAndCustomMetadata) {
  test::TempDir dir;
  const auto path = dir / "s.safetensors";
  {
    SafetensorsWriter writer(path, {{"format", "pt"}, {"quantization", "prismaquant"}});
    writer.add("scalar", DType::F32, {}, f32_bytes({2.5f}));
    const std::int64_t empty_shape[] = {0, 4};
    writer.add("empty", DType::BF16, empty_shape, {});
    writer.add("after", DType::F32, std::vector<std::int64_t>{1}, f32_bytes({-1}));
    writer.commit();
  }
  const SafetensorsFile file(path);
  EXPECT_EQ(file.metadata(),
            (SafetensorsMetadata{{"format", "pt"}, {"quantization", "prismaquant"}}));
  EXPECT_TRUE(file.find("scalar")->shape.empty());
  EXPECT_EQ(file.view("scalar").to_f32(), (std::vector<float>{2.5f}));
  EXPECT_EQ(file.find("empty")->nbytes(), 0u);
  EXPECT_EQ(file.find("empty")->shape, (std::vector<std::int64_t>{0, 4}));
  EXPECT_TRUE(file.view("empty").to_f32().empty());
  EXPECT_EQ(file.view("after").to_f32(), (std::vector<float>{-1}));
}

TEST(SafetensorsWriter, MissingDirectoryIsAnError) {
  test::TempDir dir;
  try {
    SafetensorsWriter writer(dir / "no/such/dir/x.safetensors");
    writer.add("a", DType::U8, std::vector<std::int64_t>{1}, std::vector<std::uint8_t>{1});
    writer.commit();
    ADD_FAILURE() << "writing into a missing directory succeeded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no/such/dir/x.safetensors"), std::string::npos)
        << e.what();
  }
}

TEST(SafetensorsWriter, RejectsBadTensors) {
  test::TempDir dir;
  SafetensorsWriter writer(dir / "x.safetensors");
  const std::int64_t shape[] = {2};
  const auto data = f32_bytes({1, 2});
  writer.add("a", DType::F32, shape, data);
  EXPECT_THROW(writer.add("a", DType::F32, shape, data), Error);
  EXPECT_THROW(writer.add("", DType::F32, shape, data), Error);
  EXPECT_THROW(writer.add("__metadata__", DType::F32, shape, data), Error);
  EXPECT_THROW(writer.add("\xff\xfe", DType::F32, shape, data), Error);
  EXPECT_THROW(writer.add("b", DType::BF16, shape, data), Error);  // 8 bytes for 4 needed
  const std::int64_t negative[] = {-2};
  EXPECT_THROW(writer.add("c", DType::F32, negative, data), Error);
  writer.commit();
  EXPECT_THROW(writer.add("d", DType::F32, shape, data), Error);
  EXPECT_EQ(SafetensorsFile(dir / "x.safetensors").tensors().size(), 1u);
}

TEST(SafetensorsWriter, WithoutCommitLeavesNothing) {
  test::TempDir dir;
  {
    SafetensorsWriter writer(dir / "x.safetensors");
    const std::int64_t shape[] = {2};
    writer.add("a", DType::F32, shape, f32_bytes({1, 2}));
  }
  {
    ShardedCheckpointWriter writer(dir / "ckpt", {.max_shard_bytes = 8});
    const std::int64_t shape[] = {2};
    for (const char* name : {"a", "b", "c"}) writer.add(name, DType::F32, shape, f32_bytes({1, 2}));
  }
  EXPECT_EQ(directory_listing(dir.path()), (std::vector<std::string>{"ckpt"}));
  EXPECT_TRUE(directory_listing(dir / "ckpt").empty());
}

TEST(SafetensorsWriter, WriteFailureLeavesNoPartialFile) {
  test::TempDir dir;
  const auto f32 = random_bytes(40'000, 1);
  const auto bf16 = random_bytes(40'000, 2);
  // Each staging file stays below the 64,000 byte limit; the assembled file does not.
  const auto write_single = [&](const fs::path& path) {
    SafetensorsWriter writer(path);
    const std::int64_t s32[] = {10'000}, s16[] = {20'000};
    writer.add("a", DType::F32, s32, f32);
    writer.add("b", DType::BF16, s16, bf16);
    writer.commit();
  };
  // Shard 1 (a) closes fine; shard 2 (b, c: 64,000 data bytes) fails while being assembled, and
  // shard 1, waiting under a temporary name, must be removed too.
  const auto write_sharded = [&](const fs::path& path) {
    ShardedCheckpointWriter writer(path, {.max_shard_bytes = 70'000});
    const std::int64_t s_a[] = {10'000}, s_b[] = {8'500}, s_c[] = {15'000};
    writer.add("a", DType::F32, s_a, f32);
    writer.add("b", DType::F32, s_b, std::span(f32).first(34'000));
    writer.add("c", DType::BF16, s_c, std::span(bf16).first(30'000));
    writer.commit();
  };
  EXPECT_EQ(test::FileSizeLimitOutcome::kThrewError,
            test::run_under_file_size_limit(64'000, [&] { write_single(dir / "x.st"); }));
  EXPECT_EQ(test::FileSizeLimitOutcome::kThrewError,
            test::run_under_file_size_limit(64'000, [&] { write_sharded(dir / "ckpt"); }));
  EXPECT_EQ(directory_listing(dir.path()), (std::vector<std::string>{"ckpt"}));
  EXPECT_TRUE(directory_listing(dir / "ckpt").empty());
  // Control: with room to spare the same writes succeed.
  EXPECT_EQ(test::FileSizeLimitOutcome::kReturned,
            test::run_under_file_size_limit(1 << 20, [&] { write_single(dir / "y.st"); }));
  EXPECT_EQ(test::FileSizeLimitOutcome::kReturned,
            test::run_under_file_size_limit(1 << 20, [&] { write_sharded(dir / "ok"); }));
  EXPECT_EQ(SafetensorsFile(dir / "y.st").tensors().size(), 2u);
  EXPECT_EQ(Checkpoint::open(dir / "ok").files().size(), 2u);
}

// A tensor whose staging write fails part-way must not shift the data of tensors added after it.
TEST(SafetensorsWriter, FailedAddLeavesLaterTensorsIntact) {
  test::TempDir dir;
  const auto a = random_bytes(40'000, 1);
  const auto b = random_bytes(40'000, 2);
  const auto c = random_bytes(4'000, 3);
  const std::int64_t s10k[] = {10'000}, s1k[] = {1'000};
  EXPECT_EQ(test::FileSizeLimitOutcome::kReturned, test::run_under_file_size_limit(64'000, [&] {
              SafetensorsWriter writer(dir / "x.safetensors");
              writer.add("a", DType::F32, s10k, a);
              bool rejected = false;
              try {
                writer.add("b", DType::F32, s10k, b);  // its spool would pass 64,000 bytes
              } catch (const Error&) {
                rejected = true;
              }
              if (!rejected) throw std::logic_error("b was staged past the file size limit");
              writer.add("c", DType::F32, s1k, c);
              writer.commit();
            }));
  const SafetensorsFile file(dir / "x.safetensors");
  ASSERT_EQ(file.tensors().size(), 2u);
  const auto va = file.view("a").bytes;
  const auto vc = file.view("c").bytes;
  EXPECT_TRUE(std::equal(va.begin(), va.end(), a.begin(), a.end()));
  EXPECT_TRUE(std::equal(vc.begin(), vc.end(), c.begin(), c.end()));
}

TEST(ShardedCheckpointWriter, SplitsLikeHuggingFaceAndReadsBack) {
  test::TempDir dir;
  // Data sizes in bytes; limit 1000. Expected shards: [a b] [c] [d (oversize, alone)] [e f].
  const std::vector<std::pair<std::string, std::size_t>> tensors = {
      {"a", 400}, {"b", 600}, {"c", 500}, {"d", 1600}, {"e", 200}, {"f", 300}};
  std::map<std::string, std::vector<std::uint8_t>> written;
  std::vector<std::string> files;
  {
    ShardedCheckpointWriter writer(dir.path(), {.max_shard_bytes = 1000});
    std::uint32_t seed = 7;
    for (const auto& [name, size] : tensors) {
      const std::int64_t shape[] = {static_cast<std::int64_t>(size / 2)};
      written[name] = random_bytes(size, seed++);
      writer.add(name, DType::BF16, shape, written[name]);
    }
    files = writer.commit();
  }
  const std::vector<std::string> expected_files = {
      "model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors",
      "model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors",
      "model.safetensors.index.json"};
  EXPECT_EQ(files, expected_files);
  EXPECT_EQ(directory_listing(dir.path()), expected_files);

  const auto index_path = dir / "model.safetensors.index.json";
  const auto index = parse_safetensors_index(read_text_file(index_path), index_path.string());
  EXPECT_EQ(index.total_size, 3600u);
  const std::map<std::string, std::string> expected_map = {
      {"a", expected_files[0]}, {"b", expected_files[0]}, {"c", expected_files[1]},
      {"d", expected_files[2]}, {"e", expected_files[3]}, {"f", expected_files[3]}};
  EXPECT_EQ(index.weight_map, expected_map);

  const auto ckpt = Checkpoint::open(dir.path());
  EXPECT_EQ(ckpt.files().size(), 4u);
  EXPECT_EQ(ckpt.total_tensor_bytes(), 3600u);
  for (const auto& [name, bytes] : written) {
    const auto view = ckpt.view(name);
    EXPECT_TRUE(std::equal(view.bytes.begin(), view.bytes.end(), bytes.begin(), bytes.end()))
        << name;
  }
  for (const auto& file : ckpt.files()) {
    EXPECT_EQ(file->metadata(), default_safetensors_metadata()) << file->path();
  }
}

TEST(ShardedCheckpointWriter, WritesOneModelSafetensorsWhenItFits) {
  test::TempDir dir;
  ShardedCheckpointWriter writer(dir.path());
  const std::int64_t shape[] = {2};
  writer.add("x", DType::F32, shape, f32_bytes({1.5f, -2}));
  EXPECT_EQ(writer.commit(), (std::vector<std::string>{"model.safetensors"}));
  EXPECT_EQ(directory_listing(dir.path()), (std::vector<std::string>{"model.safetensors"}));
  EXPECT_EQ(Checkpoint::open(dir.path()).to_f32("x"), (std::vector<float>{1.5f, -2}));
}

TEST(ShardedCheckpointWriter, EmptyCheckpointIsOneEmptyFile) {
  test::TempDir dir;
  ShardedCheckpointWriter writer(dir.path());
  EXPECT_EQ(writer.commit(), (std::vector<std::string>{"model.safetensors"}));
  const auto ckpt = Checkpoint::open(dir.path());
  EXPECT_TRUE(ckpt.tensor_names().empty());
  EXPECT_EQ(ckpt.files().front()->metadata(), default_safetensors_metadata());
}

TEST(ShardedCheckpointWriter, RefusesDirectoryWithACheckpointAndDuplicateNames) {
  test::TempDir dir;
  write_text_file_atomic(dir / "model.safetensors", "x");
  EXPECT_THROW(ShardedCheckpointWriter writer(dir.path()), Error);
  ShardedCheckpointWriter writer(dir / "out", {.max_shard_bytes = 4});
  const std::int64_t shape[] = {1};
  writer.add("x", DType::F32, shape, f32_bytes({1}));
  EXPECT_THROW(writer.add("x", DType::F32, shape, f32_bytes({1})), Error);
}

// Rewrites a real checkpoint into small shards and checks every tensor survives bit for bit.
TEST(ShardedCheckpointWriter, ReshardsStories260K) {
  PQ_REQUIRE_SHARED();
  const auto source = Checkpoint::open(test::shared_dir() / "models/stories260K");
  test::TempDir dir;
  ShardedCheckpointWriter writer(dir.path(), {.max_shard_bytes = 100'000});
  for (const auto& name : source.tensor_names()) {
    const auto& info = source.info(name);
    writer.add(name, info.dtype, info.shape, source.view(name).bytes);
  }
  const auto files = writer.commit();
  EXPECT_GT(files.size(), 3u);
  const auto copy = Checkpoint::open(dir.path());
  EXPECT_EQ(copy.tensor_names(), source.tensor_names());
  EXPECT_EQ(copy.total_tensor_bytes(), source.total_tensor_bytes());
  for (const auto& name : source.tensor_names()) {
    const auto a = source.view(name);
    const auto b = copy.view(name);
    EXPECT_EQ(copy.info(name).shape, source.info(name).shape) << name;
    EXPECT_TRUE(std::equal(a.bytes.begin(), a.bytes.end(), b.bytes.begin(), b.bytes.end())) << name;
  }
}

}  // namespace
}  // namespace pq::io
