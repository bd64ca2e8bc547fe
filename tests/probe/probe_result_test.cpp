#include "probe/probe_result.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/file_util.h"
#include "support/test_support.h"

namespace pq::probe {
namespace {

using ::testing::HasSubstr;
using Json = nlohmann::json;

constexpr const char* kKey = "model.layers.0.self_attn.qkv_proj";

// A safetensors file of F32 tensors, its header padded with spaces to a multiple of 8 bytes as the
// writer does, plus `misalign` more (which moves every tensor by that many bytes).
std::string f32_file(const std::vector<std::pair<std::string, std::vector<float>>>& tensors,
                     std::size_t misalign) {
  Json header = Json::object();
  std::string data;
  for (const auto& [name, values] : tensors) {
    header[name] = {{"dtype", "F32"},
                    {"shape", {values.size()}},
                    {"data_offsets", {data.size(), data.size() + values.size() * 4}}};
    data.append(reinterpret_cast<const char*>(values.data()), values.size() * 4);
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8 + misalign, ' ');
  std::string file(8, '\0');
  const std::uint64_t length = text.size();
  std::memcpy(file.data(), &length, 8);
  return file + text + data;
}

// probe.json of one Linear reading an input of 4 features, as run_probe writes it.
Json probe_json() {
  return {{"schema", "prismaquant.probe/2"},
          {"model", "tiny"},
          {"fingerprint", "0123"},
          {"calibration", {{"sequences", 2}}},
          {"files", {"probe.layer-0000.safetensors"}},
          {"linears",
           {{{"name", "model.layers.0.self_attn.q_proj"},
             {"shape", {8, 4}},
             {"input_key", kKey},
             {"fisher_trace", 0.5},
             {"tokens", 32}}}},
          {"inputs", {{{"key", kKey}, {"in_features", 4}, {"tokens", 32}, {"amax", 2.5}}}},
          {"moe", Json::array()}};
}

class ProbeResultFiles : public ::testing::Test {
 protected:
  // Writes probe.json and a part with a Hessian of `hessian` and second moments of `moments`
  // values (f32_file's `misalign`); returns the directory.
  const std::filesystem::path& write(const Json& doc, std::size_t hessian = 16,
                                     std::size_t moments = 4, std::size_t misalign = 0) {
    const std::string part =
        f32_file({{std::string("hessian.") + kKey, std::vector<float>(hessian, 1.0f)},
                  {std::string("act_second_moment.") + kKey, std::vector<float>(moments, 0.25f)}},
                 misalign);
    write_text_file_atomic(dir_ / "probe.layer-0000.safetensors", part);
    write_text_file_atomic(dir_ / "probe.json", doc.dump());
    return dir_.path();
  }

  void expect_error(const std::filesystem::path& dir, const std::string& fragment) {
    EXPECT_THAT([&] { ProbeResult::read(dir); },
                ::testing::ThrowsMessage<Error>(HasSubstr(fragment)))
        << fragment;
  }

  test::TempDir dir_;
};

TEST_F(ProbeResultFiles, ReadsWhatTheProbeWrites) {
  const ProbeResult probe = ProbeResult::read(write(probe_json()));
  EXPECT_EQ(probe.sequences(), 2);
  ASSERT_EQ(probe.linears().size(), 1u);
  EXPECT_EQ(probe.linears()[0].in_features, 4);
  EXPECT_EQ(probe.hessian(kKey).size(), 16u);
  EXPECT_EQ(probe.act_second_moment(kKey)[3], 0.25f);
  EXPECT_EQ(probe.input_amax(kKey), 2.5f);
  EXPECT_EQ(probe.input_tokens(kKey), 32);
}

// probe.json's numbers size what the stages read: floats such as 1e300 went through nlohmann's
// undefined float-to-integer conversion, a negative width -4 passed the Hessian check
// ((-4)^2 = 16), and a width of 2^32 overflowed its square.
TEST_F(ProbeResultFiles, IntegersAreExactAndBounded) {
  const auto with_linear = [](const char* key, const Json& value) {
    Json doc = probe_json();
    doc["linears"][0][key] = value;
    return doc;
  };
  expect_error(write(with_linear("shape", {8, 1e300})), "in_features is a number, not an integer");
  expect_error(write(with_linear("shape", {8, -4})), "in_features is -4, outside [1, 1048576]");
  expect_error(write(with_linear("shape", {8, 4294967296})), "in_features is 4294967296, outside");
  expect_error(write(with_linear("shape", {8})), "\"shape\" is not [out, in]");
  expect_error(write(with_linear("tokens", 2.5)), "tokens is a number, not an integer");
  expect_error(write(with_linear("fisher_trace", -1.0)), "fisher_trace is -1, outside");
  expect_error(write(with_linear("fisher_trace", "0.5")), "fisher_trace is a string");
  Json doc = probe_json();
  doc["inputs"][0]["amax"] = 1e300;
  expect_error(write(doc), "amax is 1e+300, outside [0, 3.4028234663852886e+38]");
  doc = probe_json();
  doc["calibration"]["sequences"] = -1;
  expect_error(write(doc), "calibration.sequences is -1, outside");
  doc = probe_json();
  doc["schema"] = 2;
  expect_error(write(doc), "\"schema\" is not a string");
}

// Each Linear and input once, every Linear's input described, and its statistics of its width:
// the cost stage reads them without further checks.
TEST_F(ProbeResultFiles, StatisticsMatchTheLinearsThatReadThem) {
  const std::string json_path = (dir_ / "probe.json").string();
  Json doc = probe_json();
  doc["linears"].push_back(doc["linears"][0]);
  expect_error(write(doc),
               json_path + ": linear \"model.layers.0.self_attn.q_proj\" is listed twice");
  doc = probe_json();
  doc["inputs"].push_back(doc["inputs"][0]);
  expect_error(write(doc), "is listed twice");
  doc = probe_json();
  doc["inputs"] = Json::array();
  expect_error(write(doc),
               "input \"model.layers.0.self_attn.qkv_proj\" of "
               "\"model.layers.0.self_attn.q_proj\" is not in \"inputs\"");
  expect_error(write(probe_json(), 16, 3),
               "do not match \"model.layers.0.self_attn.q_proj\"'s input width 4");
  expect_error(write(probe_json(), 9, 4), "do not match");
  doc = probe_json();
  doc["files"] = {7};
  expect_error(write(doc), "files: an entry is a number, not a file name");
  doc["files"] = {"probe.layer-0000.safetensors", "probe.layer-0000.safetensors"};
  expect_error(write(doc), "or is listed twice");
  doc["files"] = {"../probe.layer-0000.safetensors"};
  expect_error(write(doc), "is not a file name");
}

// A probe with held-out Hessians lists their rows per input; the reader hands them out only where
// listed, never more rows than the input's, always of the input's width.
TEST_F(ProbeResultFiles, HoldoutHessiansAreListedAndOfTheInputsWidth) {
  const auto write_holdout = [&](const Json& doc, std::size_t holdout) {
    write_text_file_atomic(
        dir_ / "probe.layer-0000.safetensors",
        f32_file({{std::string("hessian.") + kKey, std::vector<float>(16, 1.0f)},
                  {std::string("holdout_hessian.") + kKey, std::vector<float>(holdout, 0.5f)},
                  {std::string("act_second_moment.") + kKey, std::vector<float>(4, 0.25f)}},
                 0));
    write_text_file_atomic(dir_ / "probe.json", doc.dump());
    return dir_.path();
  };
  Json doc = probe_json();
  EXPECT_TRUE(ProbeResult::read(write_holdout(doc, 16)).holdout_hessian(kKey).empty());
  EXPECT_EQ(ProbeResult::read(write_holdout(doc, 16)).holdout_tokens(kKey), 0);
  doc["inputs"][0]["holdout_tokens"] = 8;
  const ProbeResult probe = ProbeResult::read(write_holdout(doc, 16));
  EXPECT_EQ(probe.holdout_tokens(kKey), 8);
  ASSERT_EQ(probe.holdout_hessian(kKey).size(), 16u);
  EXPECT_EQ(probe.holdout_hessian(kKey)[5], 0.5f);
  expect_error(write_holdout(doc, 9), "the held-out Hessian of input");
  expect_error(write(doc), "no tensor \"holdout_hessian.");
  doc["inputs"][0]["holdout_tokens"] = 33;
  expect_error(write_holdout(doc, 16), "33 held-out tokens of 32");
  doc["inputs"][0]["holdout_tokens"] = -1;
  expect_error(write_holdout(doc, 16), "holdout_tokens is -1, outside");
}

// The floats are used in place in the mapped file, so they must be aligned: a header padded to a
// length that is no multiple of 4 put them at odd addresses (undefined behaviour on every read).
TEST_F(ProbeResultFiles, RefusesMisalignedTensors) {
  expect_error(write(probe_json(), 16, 4, 1), "is not aligned to 4 bytes in the file");
  EXPECT_NO_THROW(ProbeResult::read(write(probe_json(), 16, 4, 4)));
}

}  // namespace
}  // namespace pq::probe
