// The allocate stage on the Linears of real checkpoints (../shared/models): their names, shapes
// and sibling structure, bytes from the formats' storage rules, and synthetic predicted dL (the
// cost stage that will measure dL is not part of this branch).
#include "alloc/allocate_stage.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <map>
#include <random>
#include <regex>

#include "common/error.h"
#include "common/file_util.h"
#include "formats/weight_format.h"
#include "io/safetensors.h"
#include "support/test_support.h"
#include "xml_check.h"

namespace pq::alloc {
namespace {

// Exact bytes and shape constraints from the formats library; dL grows as bits shrink.
std::vector<std::optional<FormatCost>> format_costs(std::int64_t out, std::int64_t in,
                                                    double sensitivity) {
  const std::pair<const char*, double> menu[] = {
      {"MXFP4", 1.5}, {"NVFP4", 1.0}, {"MXFP8", 0.01}, {"BF16", 0.0}};
  std::vector<std::optional<FormatCost>> costs;
  for (const auto& [name, factor] : menu) {
    const formats::WeightFormat& format = formats::format_by_name(name);
    if (!format.accepts({out, in})) {
      costs.emplace_back();
      continue;
    }
    FormatCost cost;
    cost.bytes = format.bytes({out, in});
    cost.predicted_dloss = factor * sensitivity;
    costs.push_back(cost);
  }
  return costs;
}

// cost.json for a checkpoint: every *_proj weight is a Linear; q/k/v, gate/up and all experts of
// one MoE layer are sibling groups (format-facts.md A.3); everything else is passthrough.
CostTable cost_table_for(const io::Checkpoint& checkpoint, const std::string& model) {
  const std::regex linear_name(
      R"((model\.layers\.\d+)\.(self_attn|mlp)\.(experts\.\d+\.)?(\w+_proj)\.weight)");
  CostTable table;
  table.model = model;
  table.formats = {"MXFP4", "NVFP4", "MXFP8", "BF16"};
  std::mt19937_64 rng(3);
  std::lognormal_distribution<double> sensitivity(-4.0, 1.5);
  for (const std::string& name : checkpoint.tensor_names()) {
    const io::TensorInfo& info = checkpoint.info(name);
    std::smatch m;
    if (!std::regex_match(name, m, linear_name) || info.shape.size() != 2) {
      table.passthrough_params += static_cast<std::uint64_t>(info.numel());
      table.passthrough_bytes += info.nbytes();
      continue;
    }
    LinearCost linear;
    linear.name = name.substr(0, name.size() - std::string(".weight").size());
    linear.shape = info.shape;
    linear.params = static_cast<std::uint64_t>(info.numel());
    const std::string proj = m[4];
    if (m[3].matched) {
      linear.group = m[1].str() + ".mlp.experts";
    } else if (proj == "q_proj" || proj == "k_proj" || proj == "v_proj") {
      linear.group = m[1].str() + ".self_attn.qkv_proj";
    } else if (proj == "gate_proj" || proj == "up_proj") {
      linear.group = m[1].str() + ".mlp.gate_up_proj";
    }
    linear.costs = format_costs(info.shape[0], info.shape[1], sensitivity(rng));
    table.linears.push_back(std::move(linear));
  }
  return table;
}

std::uint64_t total_params(const io::Checkpoint& checkpoint) {
  std::uint64_t total = 0;
  for (const std::string& name : checkpoint.tensor_names()) {
    total += static_cast<std::uint64_t>(checkpoint.info(name).numel());
  }
  return total;
}

void expect_groups_agree(const AssignmentFile& assignment) {
  std::map<std::string, std::string> format_of_group;
  for (const AssignedLinear& linear : assignment.linears) {
    if (linear.group.empty()) continue;
    const auto [it, inserted] = format_of_group.try_emplace(linear.group, linear.format);
    EXPECT_EQ(it->second, linear.format) << linear.name << " in " << linear.group;
  }
}

TEST(AllocateStageTest, Qwen3DenseTinyEndToEnd) {
  PQ_REQUIRE_SHARED();
  const auto checkpoint = io::Checkpoint::open(pq::test::shared_dir() / "models/qwen3-dense-tiny");
  const CostTable table = cost_table_for(checkpoint, "qwen3-dense-tiny");
  // 8 layers x 7 Linears; tied embeddings, so no lm_head.
  ASSERT_EQ(table.linears.size(), 56u);
  pq::test::TempDir work;
  std::filesystem::create_directories(work / "cost");
  write_cost_table(work / "cost" / "cost.json", table);

  AllocateJob job;
  job.cost = work / "cost";
  job.out = work / "alloc";
  job.target_bits = "5";
  job.pareto = "4.25,4.5,4.75,5,5.5,6,8.25,16,4";
  const AllocateOutcome outcome = run_allocate(job);
  EXPECT_EQ(outcome.items, 8u * 4u);  // qkv, o, gate_up, down per layer

  const AssignmentFile assignment = read_assignment(job.out / "assignment.json");
  EXPECT_EQ(assignment.linears.size(), 56u);
  EXPECT_LE(assignment.totals.quantizable_bytes, assignment.budget.budget_bytes);
  EXPECT_LE(assignment.totals.bits_per_quantizable_param, 5.0);
  EXPECT_GT(assignment.totals.bits_per_quantizable_param, 4.9);
  EXPECT_EQ(assignment.totals.checkpoint_params, total_params(checkpoint));
  expect_groups_agree(assignment);

  ASSERT_TRUE(outcome.sweep.has_value());
  const ParetoSweep& sweep = *outcome.sweep;
  ASSERT_EQ(sweep.points.size(), 9u);
  EXPECT_FALSE(sweep.points.front().totals.has_value());  // 4 bits < MXFP4's 4.25
  // At 16 bits everything stays BF16: exactly the source checkpoint's tensor bytes.
  const AllocationTotals& bf16 = *sweep.points.back().totals;
  EXPECT_EQ(bf16.checkpoint_bytes, checkpoint.total_tensor_bytes());
  EXPECT_EQ(bf16.per_format.at("BF16").linears, 56u);
  EXPECT_EQ(bf16.predicted_dloss, 0.0);

  const std::string svg = read_text_file(job.out / "pareto.svg");
  const test::XmlElement root = test::parse_xml(svg);
  for (const char* target : {"4", "4.25", "4.5", "4.75", "5", "5.5", "6", "8.25", "16"}) {
    EXPECT_NE(root.all_text().find(target), std::string::npos) << target;
  }
  EXPECT_NE(read_text_file(job.out / "pareto.csv").find("target_bits,feasible"), std::string::npos);
  EXPECT_NE(summarize_outcome(outcome).find("qwen3-dense-tiny: 56 Linears in 32 decisions"),
            std::string::npos);
}

TEST(AllocateStageTest, Qwen3MoeTinyExpertsShareAFormatUnderAByteTarget) {
  PQ_REQUIRE_SHARED();
  const auto checkpoint = io::Checkpoint::open(pq::test::shared_dir() / "models/qwen3-moe-tiny");
  const CostTable table = cost_table_for(checkpoint, "qwen3-moe-tiny");
  // 6 layers x (4 attention + 8 experts x 3) Linears; the routers stay passthrough.
  ASSERT_EQ(table.linears.size(), 6u * 28u);
  pq::test::TempDir work;
  write_cost_table(work / "cost.json", table);
  AllocateJob job;
  job.cost = work / "cost.json";
  job.out = work / "alloc";

  // The source checkpoint's own size buys BF16 everywhere.
  job.target_bytes = std::to_string(checkpoint.total_tensor_bytes());
  AllocateOutcome outcome = run_allocate(job);
  EXPECT_EQ(outcome.items, 6u * 3u);  // qkv, o, all experts
  EXPECT_EQ(outcome.assignment.totals.checkpoint_bytes, checkpoint.total_tensor_bytes());
  EXPECT_EQ(outcome.assignment.totals.per_format.at("BF16").linears, table.linears.size());

  // Three fifths of it: a mix, never above the target.
  const std::uint64_t target = checkpoint.total_tensor_bytes() * 3 / 5;
  job.target_bytes = std::to_string(target) + "B";
  outcome = run_allocate(job);
  EXPECT_LE(outcome.assignment.totals.checkpoint_bytes, target);
  EXPECT_EQ(outcome.assignment.budget.kind, "checkpoint_bytes");
  expect_groups_agree(outcome.assignment);
  std::size_t formats_used = 0;
  for (const auto& [format, tally] : outcome.assignment.totals.per_format) {
    formats_used += tally.linears > 0;
  }
  EXPECT_GE(formats_used, 2u);
}

// allocate --serve-on T takes only a cost table measured for T (meta.serve_on), and the
// assignment carries the target on to export.
TEST(AllocateStageTest, ServeOnMustMatchTheCostTablesTarget) {
  PQ_REQUIRE_SHARED();
  const auto checkpoint = io::Checkpoint::open(pq::test::shared_dir() / "models/qwen3-dense-tiny");
  pq::test::TempDir work;
  std::filesystem::create_directories(work / "cost");
  nlohmann::json doc = cost_table_to_json(cost_table_for(checkpoint, "qwen3-dense-tiny"));
  write_text_file_atomic(work / "cost" / "cost.json", doc.dump());
  AllocateJob job;
  job.cost = work / "cost";
  job.out = work / "alloc";
  job.target_bits = "5";
  job.serve_on = formats::ServingTarget::kHopper;
  // A table without meta.serve_on (not written by the cost stage) names no target.
  try {
    run_allocate(job);
    FAIL() << "a table without a target was taken for hopper";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("offers the formats vLLM loads on an unrecorded target, "
                                         "not on hopper; rerun cost with --serve-on hopper"),
              std::string::npos)
        << e.what();
  }
  doc["meta"] = {{"serve_on", "blackwell"}};
  write_text_file_atomic(work / "cost" / "cost.json", doc.dump());
  EXPECT_THROW(run_allocate(job), Error);
  job.serve_on = formats::ServingTarget::kBlackwell;
  EXPECT_EQ(run_allocate(job).assignment.serve_on, "blackwell");
  EXPECT_EQ(read_assignment(job.out / "assignment.json").serve_on, "blackwell");
  // Unset: whatever the table was measured for.
  job.serve_on.reset();
  EXPECT_EQ(run_allocate(job).assignment.serve_on, "blackwell");
}

TEST(AllocateStageTest, ErrorsNameTheProblem) {
  PQ_REQUIRE_SHARED();
  const auto checkpoint = io::Checkpoint::open(pq::test::shared_dir() / "models/qwen3-dense-tiny");
  pq::test::TempDir work;
  write_cost_table(work / "cost.json", cost_table_for(checkpoint, "qwen3-dense-tiny"));
  const auto expect_error = [&](AllocateJob job, const std::string& fragment) {
    job.cost = work / "cost.json";
    job.out = work / "alloc";
    try {
      run_allocate(job);
      FAIL() << "expected: " << fragment;
    } catch (const pq::Error& e) {
      EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    }
  };
  AllocateJob job;
  job.target_bits = "3.5";
  expect_error(job, "--target-bits 3.5 is infeasible: the minimum achievable is 4.2500 bits");
  job.target_bits = "4.5";
  job.formats = {"NVFP4", "NVFP5"};
  expect_error(job, "unknown format \"NVFP5\"");
  job.formats = {};
  job.target_bits.reset();
  job.target_bytes = "1KB";
  expect_error(job, "does not even hold");
  job.target_bytes = "12 parsecs";
  expect_error(job, "invalid size \"12 parsecs\"");
  job.target_bits = "5";
  expect_error(job, "exactly one of --target-bits and --target-bytes");
  EXPECT_FALSE(std::filesystem::exists(work / "alloc" / "assignment.json"));
}

// The installed command: exit codes, one-line errors, files written.
TEST(AllocateCliTest, RunsAndFailsCleanly) {
  PQ_REQUIRE_SHARED();
  const auto checkpoint = io::Checkpoint::open(pq::test::shared_dir() / "models/qwen3-dense-tiny");
  pq::test::TempDir work;
  write_cost_table(work / "cost.json", cost_table_for(checkpoint, "qwen3-dense-tiny"));
  const auto run = [&](const std::string& args) {
    const std::string command =
        fmt::format("'{}' allocate --cost '{}' --out '{}' {} >'{}' 2>'{}'", PQ_PRISMAQUANT_BIN,
                    (work / "cost.json").string(), (work / "alloc").string(), args,
                    (work / "stdout").string(), (work / "stderr").string());
    const int status = std::system(command.c_str());
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  };
  EXPECT_EQ(run("--target-bits 4.75 --pareto 4.5,5,6 --formats NVFP4,MXFP8,BF16"), 0)
      << read_text_file(work / "stderr");
  EXPECT_NE(read_text_file(work / "stdout").find("pareto"), std::string::npos);
  const AssignmentFile assignment = read_assignment(work / "alloc");
  EXPECT_EQ(assignment.totals.per_format.at("MXFP4").linears, 0u);
  EXPECT_TRUE(std::filesystem::exists(work / "alloc" / "pareto.svg"));

  EXPECT_EQ(run("--target-bits 2"), 1);
  const std::string error = read_text_file(work / "stderr");
  EXPECT_EQ(error.rfind("prismaquant: error: --target-bits 2 is infeasible", 0), 0u) << error;
  EXPECT_EQ(std::count(error.begin(), error.end(), '\n'), 1) << error;
}

}  // namespace
}  // namespace pq::alloc
