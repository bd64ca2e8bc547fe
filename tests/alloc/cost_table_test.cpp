#include "alloc/cost_table.h"

#include <gtest/gtest.h>

#include <fstream>

#include "common/error.h"
#include "formats/weight_format.h"
#include "support/test_support.h"

namespace pq::alloc {
namespace {

using nlohmann::json;

std::uint64_t bytes_of(const char* format, std::int64_t out, std::int64_t in) {
  return formats::format_by_name(format).bytes({out, in});
}

json valid_cost_json() {
  json j = json::parse(R"({
    "schema": "prismaquant.cost/1",
    "model": "tiny",
    "formats": ["NVFP4", "MXFP8", "BF16"],
    "passthrough": {"params": 1000, "bytes": 2000},
    "linears": [
      {"name": "model.layers.0.self_attn.q_proj", "shape": [128, 256], "params": 32768,
       "group": "model.layers.0.self_attn.qkv_proj",
       "costs": {"NVFP4": {"bytes": 0, "predicted_dloss": 0.25, "weight_mse": 1e-3,
                           "act_weighted_mse": 2e-3, "output_mse": 3e-3},
                 "BF16": {"bytes": 0, "predicted_dloss": 0}}},
      {"name": "model.layers.0.mlp.down_proj", "shape": [128, 128], "params": 16384,
       "costs": {"MXFP8": {"bytes": 0, "predicted_dloss": 0.01, "weight_mse": null}}}
    ]})");
  j["linears"][0]["costs"]["NVFP4"]["bytes"] = bytes_of("NVFP4", 128, 256);
  j["linears"][0]["costs"]["BF16"]["bytes"] = bytes_of("BF16", 128, 256);
  j["linears"][1]["costs"]["MXFP8"]["bytes"] = bytes_of("MXFP8", 128, 128);
  return j;
}

TEST(CostTableTest, ParsesEveryField) {
  const CostTable table = cost_table_from_json(valid_cost_json(), "cost.json");
  EXPECT_EQ(table.model, "tiny");
  ASSERT_EQ(table.formats.size(), 3u);
  EXPECT_EQ(table.passthrough_params, 1000u);
  EXPECT_EQ(table.passthrough_bytes, 2000u);
  ASSERT_EQ(table.linears.size(), 2u);
  const LinearCost& q = table.linears[0];
  EXPECT_EQ(q.group, "model.layers.0.self_attn.qkv_proj");
  EXPECT_EQ(q.shape, (std::vector<std::int64_t>{128, 256}));
  ASSERT_TRUE(q.costs[0].has_value());
  // E2M1 codes, one E4M3 scale per 16, and the two FP32 global scales of W4A4.
  EXPECT_EQ(q.costs[0]->bytes, 128u * 256 / 2 + 128 * 256 / 16 + 8);
  EXPECT_EQ(q.costs[0]->weight_mse, 1e-3);
  EXPECT_EQ(q.costs[0]->act_weighted_mse, 2e-3);
  EXPECT_EQ(q.costs[0]->output_mse, 3e-3);
  EXPECT_FALSE(q.costs[1].has_value());
  EXPECT_TRUE(q.costs[2].has_value());
  EXPECT_EQ(table.linears[1].group, "");
  EXPECT_FALSE(table.linears[1].costs[1]->weight_mse.has_value());
  EXPECT_EQ(table.quantizable_params(), 49152u);
}

TEST(CostTableTest, RoundTripsThroughAFile) {
  const CostTable table = cost_table_from_json(valid_cost_json(), "cost.json");
  test::TempDir dir;
  write_cost_table(dir / "cost.json", table);
  const CostTable back = read_cost_table(dir.path());  // a directory means dir/cost.json
  EXPECT_EQ(cost_table_to_json(back), cost_table_to_json(table));
}

void expect_error(const json& j, const std::string& fragment) {
  try {
    cost_table_from_json(j, "cost.json");
    FAIL() << "expected an error containing: " << fragment;
  } catch (const pq::Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

TEST(CostTableTest, RejectsBadInput) {
  json j = valid_cost_json();
  j["linears"][0]["costs"]["NVFP5"] = {{"bytes", 1}, {"predicted_dloss", 0}};
  expect_error(j, "linear model.layers.0.self_attn.q_proj: unknown format \"NVFP5\"");

  j = valid_cost_json();
  j["schema"] = "prismaquant.cost/0";
  expect_error(j, "\"schema\" must be \"prismaquant.cost/1\"");

  j = valid_cost_json();
  j["linears"][1]["params"] = 2047;
  expect_error(j, "\"params\" 2047 is not out*in = 128*128");

  j = valid_cost_json();
  j["linears"][1]["name"] = "model.layers.0.self_attn.q_proj";
  expect_error(j, "listed twice");

  j = valid_cost_json();
  j["linears"][0]["costs"]["NVFP4"]["predicted_dloss"] = -1.0;
  expect_error(j, "format NVFP4: \"predicted_dloss\" must be finite and >= 0");

  j = valid_cost_json();
  j["linears"][0]["costs"]["NVFP4"]["bytes"] = 0;
  expect_error(j, "\"bytes\" must be positive");

  j = valid_cost_json();
  j["linears"][0]["costs"] = json::object();
  expect_error(j, "\"costs\" must be a non-empty object");

  j = valid_cost_json();
  j.erase("passthrough");
  expect_error(j, "missing \"passthrough\"");

  j = valid_cost_json();
  j["formats"] = {"NVFP4", "NVFP4"};
  expect_error(j, "format \"NVFP4\" listed twice");

  // Charged bytes must be what the formats library will write.
  j = valid_cost_json();
  j["linears"][0]["costs"]["NVFP4"]["bytes"] = 128 * 256 / 2 + 128 * 256 / 16;
  expect_error(j, "format NVFP4: \"bytes\" 18432 differs from the format's exact size 18440");

  j = valid_cost_json();
  j["linears"][0]["shape"] = {64, 512};
  j["linears"][0]["costs"] = {{"MXFP8", {{"bytes", 1}, {"predicted_dloss", 0}}}};
  expect_error(j, "linear model.layers.0.self_attn.q_proj cannot take MXFP8: MXFP8 kernels need");

  j = valid_cost_json();
  j["formats"].push_back("NVFP5");
  expect_error(j, "unknown format \"NVFP5\"; the formats library has: NVFP4");
}

TEST(CostTableTest, UnreadableFilesAreErrors) {
  test::TempDir dir;
  EXPECT_THROW(read_cost_table(dir.path()), pq::Error);  // no cost.json in it
  std::ofstream(dir / "cost.json") << "{not json";
  EXPECT_THROW(read_cost_table(dir / "cost.json"), pq::Error);
}

}  // namespace
}  // namespace pq::alloc
