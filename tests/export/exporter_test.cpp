// The export stage on the shared tiny Qwen3 checkpoints: what it writes must decode to exactly
// what the formats library's fake quantization predicts, keep every other tensor byte for byte,
// describe itself correctly to vLLM, and cost exactly what the assignment charged.
#include "export/exporter.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <functional>
#include <regex>
#include <set>

#include "alloc/assignment.h"
#include "common/error.h"
#include "common/file_util.h"
#include "common/interrupt.h"
#include "common/json_reader.h"
#include "export/gptq.h"
#include "export/render_cache.h"
#include "formats/weight_format.h"
#include "io/safetensors.h"
#include "model/model_spec.h"
#include "probe/probe_stage.h"
#include "probe/wikitext_excerpt.h"
#include "support/test_support.h"
#include "support/unit_assignment.h"
#include "validate/ct_checkpoint.h"

namespace pq::exporter {
namespace {

namespace fs = std::filesystem;
using formats::Shape2D;
using formats::WeightFormat;
constexpr formats::ServingTarget kBlackwell = formats::ServingTarget::kBlackwell;

const std::vector<std::string> kMenu = {"NVFP4A16",   "NVFP4", "MXFP8",        "FP8_E4M3",
                                        "INT4_W4A16", "BF16",  "MXFP6_E2M3A16"};

// Unique passthrough tensor names of the source (others plus non-candidate Linear weights).
std::vector<std::string> passthrough_names(const model::ModelSpec& spec) {
  std::vector<std::string> names;
  std::set<std::string> seen;
  for (const std::string& name : spec.passthrough_tensors()) {
    if (seen.insert(name).second) names.push_back(name);
  }
  return names;
}

// An assignment of `choose`'s formats over kMenu, as the allocate stage writes it
// (test::unit_assignment).
alloc::AssignmentFile make_assignment(const fs::path& model_dir, const test::UnitChooser& choose,
                                      bool respect_groups = true) {
  return test::unit_assignment(model::load_model_spec(model_dir), io::Checkpoint::open(model_dir),
                               kMenu, choose, respect_groups);
}

using test::cycle;

fs::path save_assignment(const fs::path& dir, const alloc::AssignmentFile& assignment) {
  fs::create_directories(dir);
  alloc::write_assignment(dir / "assignment.json", assignment);
  return dir / "assignment.json";
}

std::vector<std::uint8_t> bytes_of(const io::TensorView& view) {
  return {view.bytes.begin(), view.bytes.end()};
}

bool bit_identical(std::span<const float> a, std::span<const float> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Independently of the exporter: the Linears whose NVFP4 global scale vLLM fuses.
std::vector<std::size_t> scale_siblings(const model::ModelSpec& spec, std::size_t index) {
  const model::Linear& linear = spec.linears[index];
  if (!linear.group) return {index};
  const bool w13 = linear.role.ends_with("gate_proj") || linear.role.ends_with("up_proj");
  std::vector<std::size_t> members;
  for (std::size_t i = 0; i < spec.linears.size(); ++i) {
    const model::Linear& other = spec.linears[i];
    if (other.group != linear.group) continue;
    if (!linear.expert) {
      members.push_back(i);
    } else if (other.expert == linear.expert && w13 &&
               (other.role.ends_with("gate_proj") || other.role.ends_with("up_proj"))) {
      members.push_back(i);
    }
  }
  return w13 || !linear.expert ? members : std::vector<std::size_t>{index};
}

float source_amax(const io::Checkpoint& source, const model::Linear& linear) {
  float amax = 0.0f;
  for (const float v : source.to_f32(linear.weight_tensor)) amax = std::max(amax, std::fabs(v));
  return amax;
}

// Everything the exported checkpoint must satisfy, checked against the source and assignment.
void verify_export(const fs::path& model_dir, const fs::path& out,
                   const alloc::AssignmentFile& assignment,
                   const std::map<std::string, float>& input_amax = {},
                   formats::ServingTarget target = kBlackwell) {
  const model::ModelSpec spec = model::load_model_spec(model_dir);
  const io::Checkpoint source = io::Checkpoint::open(model_dir);
  const io::Checkpoint exported = io::Checkpoint::open(out);
  std::map<std::string, const alloc::AssignedLinear*> assigned;
  for (const alloc::AssignedLinear& linear : assignment.linears) assigned[linear.name] = &linear;

  std::set<std::string> expected_names;
  std::uint64_t data_bytes = 0;
  for (const std::string& name : exported.tensor_names())
    data_bytes += exported.info(name).nbytes();

  // Passthrough tensors: same dtype, shape and bytes.
  for (const std::string& name : passthrough_names(spec)) {
    expected_names.insert(name);
    ASSERT_TRUE(exported.contains(name)) << name;
    EXPECT_EQ(exported.info(name).dtype, source.info(name).dtype) << name;
    EXPECT_EQ(exported.info(name).shape, source.info(name).shape) << name;
    EXPECT_EQ(bytes_of(exported.view(name)), bytes_of(source.view(name))) << name;
  }

  // Quantized Linears decode to fake_quantize of the source, bit for bit.
  for (std::size_t i = 0; i < spec.linears.size(); ++i) {
    const model::Linear& linear = spec.linears[i];
    if (!linear.is_candidate) continue;
    const alloc::AssignedLinear& charged = *assigned.at(linear.name);
    const WeightFormat& format = formats::format_by_name(charged.format);
    const Shape2D shape{linear.out_features, linear.in_features};
    formats::EncodedWeight encoded{std::string(format.name()), shape, {}};
    std::uint64_t stored = 0;
    for (const formats::TensorSpec& spec_of : format.tensors(shape)) {
      const std::string name = linear.name + "." + spec_of.suffix;
      expected_names.insert(name);
      ASSERT_TRUE(exported.contains(name)) << name;
      EXPECT_EQ(exported.info(name).dtype, spec_of.dtype) << name;
      EXPECT_EQ(exported.info(name).shape, spec_of.shape) << name;
      encoded.tensors.push_back({spec_of, bytes_of(exported.view(name))});
      stored += exported.info(name).nbytes();
    }
    EXPECT_EQ(stored, charged.bytes) << linear.name;

    formats::QuantizeOptions options;
    if (charged.format.starts_with("NVFP4")) {
      float amax = 0.0f;
      float in_amax = 0.0f;
      for (const std::size_t member : scale_siblings(spec, i)) {
        amax = std::max(amax, source_amax(source, spec.linears[member]));
        if (input_amax.contains(spec.linears[member].name)) {
          in_amax = std::max(in_amax, input_amax.at(spec.linears[member].name));
        }
      }
      // The scale rule of the kernel vLLM on the target serves it with (Marlin for NVFP4A16
      // everywhere, for NVFP4 below sm100).
      options.nvfp4_scales = formats::nvfp4_scales(format, linear.layer_kind(), target);
      options.weight_global_scale = formats::nvfp4_weight_global_scale(amax, options.nvfp4_scales);
      const std::vector<float> stored_scale = exported.to_f32(linear.name + ".weight_global_scale");
      EXPECT_EQ(stored_scale.at(0), *options.weight_global_scale) << linear.name;
      if (charged.format == "NVFP4") {
        options.input_global_scale = formats::nvfp4_global_scale(in_amax);
        EXPECT_EQ(exported.to_f32(linear.name + ".input_global_scale").at(0),
                  *options.input_global_scale)
            << linear.name;
      }
    }
    const std::vector<float> weight = source.to_f32(linear.weight_tensor);
    std::vector<float> expected(weight.size());
    format.fake_quantize(weight, shape, expected, options);
    EXPECT_TRUE(bit_identical(format.dequantize(encoded), expected)) << linear.name;
    if (charged.format == "BF16") {
      EXPECT_EQ(bytes_of(exported.view(linear.name + ".weight")),
                bytes_of(source.view(linear.weight_tensor)));
    }
  }
  EXPECT_EQ(std::set<std::string>(exported.tensor_names().begin(), exported.tensor_names().end()),
            expected_names);
  // What ships is what was charged: bytes on disk (tensor data) == the assignment's total.
  EXPECT_EQ(data_bytes, assignment.totals.checkpoint_bytes);

  // quantization_config: every Linear covered by exactly one group target or ignored.
  const nlohmann::json config = nlohmann::json::parse(read_text_file(out / "config.json"));
  const nlohmann::json source_config =
      nlohmann::json::parse(read_text_file(model_dir / "config.json"));
  for (const auto& [key, value] : source_config.items()) EXPECT_EQ(config.at(key), value) << key;
  const nlohmann::json& qc = config.at("quantization_config");
  EXPECT_EQ(qc.at("quant_method"), "compressed-tensors");
  EXPECT_EQ(qc.at("quantization_status"), "compressed");
  std::map<std::string, int> coverage;
  std::map<std::string, std::string> group_of;
  std::set<std::string> group_formats;
  for (const auto& [group_name, group] : qc.at("config_groups").items()) {
    group_formats.insert(group.at("format").get<std::string>());
    for (const std::string target : group.at("targets")) {
      EXPECT_NE(target, "Linear");
      coverage[target] += 1;
      group_of[target] = group_name;
      const WeightFormat& format = formats::format_by_name(assigned.at(target)->format);
      nlohmann::json expected = format.config_group();
      for (const auto& [key, value] : expected.items()) EXPECT_EQ(group.at(key), value) << target;
    }
  }
  for (const std::string name : qc.at("ignore")) coverage[name] += 1;
  EXPECT_EQ(qc.at("format"),
            group_formats.size() == 1 ? *group_formats.begin() : std::string("mixed-precision"));
  for (const model::Linear& linear : spec.linears) {
    EXPECT_EQ(coverage[linear.name], 1) << linear.name;
    const bool ignored = std::find(qc.at("ignore").begin(), qc.at("ignore").end(), linear.name) !=
                         qc.at("ignore").end();
    EXPECT_EQ(ignored, !linear.is_candidate || assigned.at(linear.name)->format == "BF16")
        << linear.name;
  }
  EXPECT_EQ(coverage.size(), spec.linears.size());
  for (const model::SiblingGroup& group : spec.groups) {
    for (const std::size_t member : group.members) {
      EXPECT_EQ(group_of[spec.linears[member].name], group_of[spec.linears[group.members[0]].name])
          << group.name;
    }
  }

  for (const char* file :
       {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "generation_config.json"}) {
    ASSERT_TRUE(fs::exists(out / file)) << file;
    EXPECT_EQ(read_text_file(out / file), read_text_file(model_dir / file)) << file;
  }
  const std::string card = read_text_file(out / "README.md");
  EXPECT_NE(card.find("vllm serve " + out.string()), std::string::npos);
  EXPECT_NE(card.find("## Precision by layer"), std::string::npos);
}

// Nothing but `keep` in `dir`: no staging directory, no partial checkpoint.
void expect_only(const fs::path& dir, const std::set<std::string>& keep) {
  std::set<std::string> names;
  for (const fs::directory_entry& entry : fs::directory_iterator(dir)) {
    names.insert(entry.path().filename().string());
  }
  EXPECT_EQ(names, keep);
}

fs::path model(const std::string& name) {
  return test::shared_dir() / "models" / name;
}

ExportJob job_for(const fs::path& source, const fs::path& assignment, const fs::path& out) {
  ExportJob job;
  job.model_dir = source;
  job.assignment = assignment;
  job.out = out;
  job.command_line = "prismaquant export (test)";
  return job;
}

TEST(Export, DenseMixOfFormatsRoundTrips) {
  PQ_REQUIRE_SHARED();
  test::TempDir work;
  const fs::path source = model("qwen3-dense-tiny");
  const alloc::AssignmentFile assignment =
      make_assignment(source, cycle({"NVFP4A16", "MXFP8", "FP8_E4M3", "INT4_W4A16", "BF16"}));
  ExportJob job = job_for(source, save_assignment(work / "alloc", assignment), work / "out");
  job.max_shard_bytes = 4'000'000;
  const ExportSummary summary = run_export(job);
  EXPECT_EQ(summary.tensor_bytes, assignment.totals.checkpoint_bytes);
  EXPECT_EQ(summary.linears_per_format.size(), 5u);
  // A small shard limit forces several shards and the index.
  EXPECT_TRUE(fs::exists(work / "out" / "model.safetensors.index.json"));
  verify_export(source, work / "out", assignment);
  expect_only(work.path(), {"alloc", "out"});
  EXPECT_NE(fs::status(work / "out").permissions() & fs::perms::others_read, fs::perms::none);
}

// For Hopper, NVFP4 (W4A4) is served by Marlin: power-of-two global scales and no subnormal group
// scale, where the Blackwell export of the same assignment keeps compressed-tensors' scales.
TEST(Export, Nvfp4ForHopperFollowsMarlinsScaleRule) {
  PQ_REQUIRE_SHARED();
  test::TempDir work;
  const fs::path source = model("qwen3-dense-tiny");
  const alloc::AssignmentFile assignment = make_assignment(source, cycle({"NVFP4", "BF16"}));
  std::map<std::string, float> amax;
  for (const alloc::AssignedLinear& linear : assignment.linears) amax[linear.name] = 2.0f;
  const fs::path path = save_assignment(work / "alloc", assignment);
  for (const formats::ServingTarget target : {kBlackwell, formats::ServingTarget::kHopper}) {
    const std::string name(formats::serving_target_name(target));
    ExportJob job = job_for(source, path, work / name);
    job.input_amax = amax;
    job.serve_on = target;
    run_export(job);
    verify_export(source, work / name, assignment, amax, target);
    const io::Checkpoint exported = io::Checkpoint::open(work / name);
    int power_of_two = 0;
    int globals = 0;
    for (const std::string& tensor : exported.tensor_names()) {
      if (!tensor.ends_with(".weight_global_scale")) continue;
      ++globals;
      int exponent = 0;
      power_of_two += std::frexp(exported.to_f32(tensor).at(0), &exponent) == 0.5f ? 1 : 0;
    }
    ASSERT_GT(globals, 0);
    if (target == kBlackwell) {
      EXPECT_LT(power_of_two, globals) << "448*6/amax is rarely a power of two";
    } else {
      EXPECT_EQ(power_of_two, globals);
    }
  }
}

TEST(Export, MoeExpertsShareGlobalScalePerExpert) {
  PQ_REQUIRE_SHARED();
  test::TempDir work;
  const fs::path source = model("qwen3-moe-tiny");
  // MoE layers alternate NVFP4A16 and MXFP8 experts; attention cycles the others.
  const alloc::AssignmentFile assignment =
      make_assignment(source, [](std::size_t unit, const model::Linear& first) -> std::string {
        if (first.expert) return unit % 2 == 0 ? "NVFP4A16" : "MXFP8";
        return std::vector<std::string>{"NVFP4A16", "FP8_E4M3", "INT4_W4A16", "BF16"}[unit % 4];
      });
  ExportJob job = job_for(source, save_assignment(work / "alloc", assignment), work / "out");
  run_export(job);
  EXPECT_TRUE(fs::exists(work / "out" / "model.safetensors"));
  verify_export(source, work / "out", assignment);
}

TEST(Export, W4a4NeedsCalibrationAmax) {
  PQ_REQUIRE_SHARED();
  test::TempDir work;
  const fs::path source = model("qwen3-dense-tiny");
  const alloc::AssignmentFile assignment = make_assignment(source, cycle({"NVFP4", "MXFP8"}));
  ExportJob job = job_for(source, save_assignment(work / "alloc", assignment), work / "out");
  try {
    run_export(job);
    FAIL() << "W4A4 without amax was exported";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("calibration activation amax"), std::string::npos)
        << e.what();
  }
  expect_only(work.path(), {"alloc"});

  // Distinct amax per Linear: fused siblings must take the largest.
  float amax = 1.0f;
  for (const alloc::AssignedLinear& linear : assignment.linears) {
    job.input_amax[linear.name] = (amax += 0.25f);
  }
  run_export(job);
  verify_export(source, work / "out", assignment, job.input_amax);
}

// Rewrites one field of the assignment's JSON, keeping it valid for the reader.
fs::path tampered(const fs::path& dir, const alloc::AssignmentFile& assignment,
                  const std::function<void(nlohmann::json&)>& edit) {
  nlohmann::json j = alloc::assignment_to_json(assignment);
  edit(j);
  fs::create_directories(dir);
  write_text_file_atomic(dir / "assignment.json", j.dump());
  return dir / "assignment.json";
}

// The export fails with one line containing `needle`, and job.out is as it was.
void expect_export_error(const ExportJob& job, const std::string& needle) {
  const bool existed = fs::exists(job.out);
  try {
    run_export(job);
    ADD_FAILURE() << "exported despite: " << needle;
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(needle), std::string::npos) << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  }
  EXPECT_EQ(fs::exists(job.out), existed);
}

TEST(Export, HostileAssignmentsLeaveNothing) {
  PQ_REQUIRE_SHARED();
  test::TempDir work;
  const fs::path source = model("qwen3-dense-tiny");
  const alloc::AssignmentFile assignment = make_assignment(source, cycle({"NVFP4A16", "MXFP8"}));
  ExportJob job = job_for(source, "", work / "nested" / "out");

  job.assignment = tampered(work / "unknown", assignment, [](nlohmann::json& j) {
    j["linears"][3]["name"] = "model.layers.0.self_attn.nope_proj";
  });
  expect_export_error(job, "'model.layers.0.self_attn.nope_proj' is not in the model");

  // An unknown format, with "counts" moved along so the assignment reader accepts the file.
  job.assignment = tampered(work / "bad-format", assignment, [](nlohmann::json& j) {
    nlohmann::json& linear = j["linears"][0];
    nlohmann::json& tally = j["counts"][linear["format"].get<std::string>()];
    tally["linears"] = tally["linears"].get<std::uint64_t>() - 1;
    tally["params"] = tally["params"].get<std::uint64_t>() - linear["params"].get<std::uint64_t>();
    tally["bytes"] = tally["bytes"].get<std::uint64_t>() - linear["bytes"].get<std::uint64_t>();
    j["counts"]["FP5"] = {{"linears", 1}, {"params", linear["params"]}, {"bytes", linear["bytes"]}};
    linear["format"] = "FP5";
  });
  expect_export_error(job, "unknown weight format 'FP5'");

  // MXFP6 has no compressed-tensors format: refused, never substituted.
  const alloc::AssignmentFile mxfp6 = make_assignment(source, cycle({"MXFP6_E2M3A16"}));
  job.assignment = save_assignment(work / "mxfp6", mxfp6);
  expect_export_error(job, "not exportable");

  // q_proj and k_proj in different formats: vLLM loads qkv_proj with one scheme.
  const alloc::AssignmentFile split =
      make_assignment(source, cycle({"NVFP4A16", "MXFP8"}), /*respect_groups=*/false);
  job.assignment = save_assignment(work / "split", split);
  expect_export_error(job, "sibling group model.layers.0.self_attn.qkv_proj mixes formats");

  // Chosen for another GPU (its costs used another NVFP4 scale rule).
  job.assignment =
      tampered(work / "hopper", assignment, [](nlohmann::json& j) { j["serve_on"] = "hopper"; });
  expect_export_error(job, "the assignment was chosen for hopper (--serve-on), not for blackwell");

  expect_only(work.path(), {"unknown", "bad-format", "mxfp6", "split", "hopper"});

  // A parent that does not exist yet is created, like `mkdir -p`.
  job.assignment = save_assignment(work / "alloc", assignment);
  run_export(job);
  verify_export(source, job.out, assignment);
}

TEST(Export, OutputDirectoryRules) {
  PQ_REQUIRE_SHARED();
  test::TempDir work;
  const fs::path source = model("qwen3-dense-tiny");
  const alloc::AssignmentFile assignment = make_assignment(source, cycle({"MXFP8", "BF16"}));
  ExportJob job = job_for(source, save_assignment(work / "alloc", assignment), work / "out");

  // Never into (or around) the source.
  ExportJob into_source = job;
  into_source.out = source / "quantized";
  into_source.force = true;
  expect_export_error(into_source, "overlap");

  // An existing directory is kept unless --force, then replaced whole.
  fs::create_directories(job.out);
  write_text_file_atomic(job.out / "keep.txt", "old");
  expect_export_error(job, "already exists");
  ASSERT_TRUE(fs::exists(job.out / "keep.txt"));
  job.force = true;
  run_export(job);
  EXPECT_FALSE(fs::exists(job.out / "keep.txt"));
  verify_export(source, job.out, assignment);
  expect_only(work.path(), {"alloc", "out"});

  // "out/" is the directory out, not a place inside it.
  ExportJob slash = job;
  slash.out = job.out.string() + "/";
  run_export(slash);
  verify_export(source, job.out, assignment);
  expect_only(work.path(), {"alloc", "out"});

  // An unwritable parent: one-line error, nothing created. Root ignores permission bits, so it
  // gets a directory under /proc, which no one can create.
  ExportJob unwritable = job;
  unwritable.force = false;
  if (geteuid() == 0) {
    unwritable.out = "/proc/prismaquant-export-test/out";
  } else {
    fs::create_directories(work / "ro");
    fs::permissions(work / "ro", fs::perms::owner_read | fs::perms::owner_exec);
    unwritable.out = work / "ro" / "out";
  }
  expect_export_error(unwritable, "cannot be written");
  if (geteuid() != 0) fs::permissions(work / "ro", fs::perms::owner_all);
}

// A full disk (files may not grow past 1 MB; the checkpoint is 20 MB): one error, and neither
// the checkpoint nor its staging directory is left behind.
TEST(Export, FullDiskLeavesNothing) {
  PQ_REQUIRE_SHARED();
  test::TempDir work;
  const fs::path source = model("qwen3-dense-tiny");
  const alloc::AssignmentFile assignment = make_assignment(source, cycle({"NVFP4A16", "MXFP8"}));
  const ExportJob job = job_for(source, save_assignment(work / "alloc", assignment), work / "out");
  EXPECT_EQ(test::run_under_file_size_limit(1'000'000, [&] { run_export(job); }),
            test::FileSizeLimitOutcome::kThrewError);
  expect_only(work.path(), {"alloc"});
}

// A rounding strategy that fails part-way, as a real one could on a bad weight: the checkpoint
// already half-written must vanish.
class FailingAfter final : public RoundingStrategy {
 public:
  explicit FailingAfter(int linears) : left_(linears) {}
  std::string_view name() const override { return "failing"; }
  formats::EncodedWeight encode(const LinearToEncode& job) const override {
    if (left_-- == 0) fail("rounding gave up");
    return NearestRounding{}.encode(job);
  }
  std::string describe(const std::map<std::string, std::string>&) const override { return {}; }
  nlohmann::json report(const std::map<std::string, std::string>&) const override { return {}; }

 private:
  mutable int left_;
};

TEST(Export, FailureMidStreamLeavesNothing) {
  PQ_REQUIRE_SHARED();
  test::TempDir work;
  const fs::path source = model("qwen3-dense-tiny");
  const alloc::AssignmentFile assignment = make_assignment(source, cycle({"MXFP8", "NVFP4A16"}));
  ExportJob job = job_for(source, save_assignment(work / "alloc", assignment), work / "out");
  job.max_shard_bytes = 2'000'000;
  try {
    run_export(job, FailingAfter(30));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("rounding gave up"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("model.layers."), std::string::npos) << e.what();
  }
  expect_only(work.path(), {"alloc"});
}

// Ctrl-C part-way (the rounding strategy raises the request after `linears` Linears, as the
// signal handler would): the run stops at the next unit, and the previous checkpoint stays.
class InterruptedAfter final : public RoundingStrategy {
 public:
  explicit InterruptedAfter(int linears) : left_(linears) {}
  std::string_view name() const override { return "interrupted"; }
  formats::EncodedWeight encode(const LinearToEncode& job) const override {
    if (left_-- == 0) request_interrupt(SIGINT);
    return NearestRounding{}.encode(job);
  }
  std::string describe(const std::map<std::string, std::string>&) const override { return {}; }
  nlohmann::json report(const std::map<std::string, std::string>&) const override { return {}; }

 private:
  mutable int left_;
};

TEST(Export, InterruptionKeepsThePreviousCheckpointAndLeavesNothingElse) {
  PQ_REQUIRE_SHARED();
  test::TempDir work;
  const fs::path source = model("qwen3-dense-tiny");
  const alloc::AssignmentFile previous = make_assignment(source, cycle({"MXFP8", "BF16"}));
  ExportJob job = job_for(source, save_assignment(work / "previous", previous), work / "out");
  run_export(job);
  const alloc::AssignmentFile next = make_assignment(source, cycle({"NVFP4A16", "MXFP8"}));
  job.assignment = save_assignment(work / "alloc", next);
  job.force = true;
  EXPECT_THROW(run_export(job, InterruptedAfter(10)), Interrupted);
  request_interrupt(0);
  verify_export(source, job.out, previous);
  expect_only(work.path(), {"alloc", "out", "previous"});
}

// What an export killed between its two renames leaves (its staging directory, and the previous
// checkpoint moved aside with nothing yet at `out`): the next run on `out` puts the previous
// checkpoint back and removes the rest, before deciding whether `out` exists.
TEST(Export, LeftoversOfAKilledExportAreRepairedByTheNextRun) {
  PQ_REQUIRE_SHARED();
  test::TempDir work;
  const fs::path source = model("qwen3-dense-tiny");
  const alloc::AssignmentFile previous = make_assignment(source, cycle({"MXFP8", "BF16"}));
  ExportJob job = job_for(source, save_assignment(work / "alloc", previous), work / "out");
  run_export(job);
  fs::create_directories(work / "out.old-Ab12Cd");
  fs::rename(work / "out", work / "out.old-Ab12Cd" / "previous");
  fs::create_directories(work / "out.tmp-Zz9Yx8");
  write_text_file_atomic(work / "out.tmp-Zz9Yx8" / "model.safetensors", "half");
  fs::create_directories(work / "out.tmp-not-ours");

  try {
    run_export(job);
    ADD_FAILURE() << "replaced the restored checkpoint without --force";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("already exists"), std::string::npos) << e.what();
  }
  verify_export(source, job.out, previous);
  expect_only(work.path(), {"alloc", "out", "out.tmp-not-ours"});

  // With `out` in place, a moved-aside copy is stale: it goes.
  fs::create_directories(work / "out.old-Qq7Rr6" / "previous");
  job.force = true;
  run_export(job);
  verify_export(source, job.out, previous);
  expect_only(work.path(), {"alloc", "out", "out.tmp-not-ours"});
}

int run_cli(const std::string& args, const fs::path& work) {
  const std::string command = fmt::format("'{}' export {} >'{}' 2>'{}'", PQ_PRISMAQUANT_BIN, args,
                                          (work / "stdout").string(), (work / "stderr").string());
  const int status = std::system(command.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST(ExportCli, WritesCheckpointOrOneLineError) {
  PQ_REQUIRE_SHARED();
  test::TempDir work;
  const fs::path source = model("qwen3-dense-tiny");
  const alloc::AssignmentFile assignment = make_assignment(source, cycle({"NVFP4A16", "FP8_E4M3"}));
  const fs::path path = save_assignment(work / "alloc", assignment);
  const std::string args = fmt::format("'{}' --assignment '{}' --out '{}' --rounding nearest",
                                       source.string(), path.string(), (work / "out").string());
  ASSERT_EQ(run_cli(args, work.path()), 0) << read_text_file(work / "stderr");
  EXPECT_NE(read_text_file(work / "stdout").find("wrote"), std::string::npos);
  // The model card records the command as typed.
  EXPECT_NE(read_text_file(work / "out" / "README.md")
                .find(fmt::format("{} export {} --assignment {} --out {} --rounding nearest\n",
                                  PQ_PRISMAQUANT_BIN, source.string(), path.string(),
                                  (work / "out").string())),
            std::string::npos);
  verify_export(source, work / "out", assignment);

  EXPECT_EQ(run_cli(args, work.path()), 1);
  const std::string error = read_text_file(work / "stderr");
  EXPECT_EQ(error.rfind("prismaquant: error: ", 0), 0u) << error;
  EXPECT_NE(error.find("already exists"), std::string::npos) << error;
  EXPECT_EQ(std::count(error.begin(), error.end(), '\n'), 1) << error;
}

// A probe of qwen3-dense-tiny over 2 x 32 WikiText tokens in `work`/probe: Hessians for GPTQ.
probe::ProbeResult small_probe(const test::TempDir& work) {
  probe::ProbeJob job;
  job.model = model("qwen3-dense-tiny");
  job.data = test::wikitext_excerpt(work);
  job.out = work / "probe";
  job.nsamples = 2;
  job.seqlen = 32;
  job.batch_size = 2;
  EXPECT_TRUE(probe::run_probe(job).complete);
  return probe::ProbeResult::read(job.out);
}

std::string file_bytes(const fs::path& path) {
  return read_text_file(path);
}

// Every file of two checkpoint directories, byte for byte.
void expect_same_files(const fs::path& a, const fs::path& b) {
  std::set<std::string> names_a, names_b;
  for (const auto& entry : fs::directory_iterator(a)) names_a.insert(entry.path().filename());
  for (const auto& entry : fs::directory_iterator(b)) names_b.insert(entry.path().filename());
  EXPECT_EQ(names_a, names_b);
  for (const std::string& name : names_a) {
    EXPECT_EQ(file_bytes(a / name), file_bytes(b / name)) << name;
  }
}

// One render per (Linear, format) and fingerprint: a second encoder over the same inputs reads
// every render back (no Hessian factored) with the same bytes and report; a changed rounding
// option or calibration amax is a new fingerprint, whose cache replaces the stale one.
TEST(RenderCache, HitsForTheSameFingerprintAndMissesWhenItChanges) {
  PQ_REQUIRE_SHARED();
  test::TempDir work;
  const probe::ProbeResult probe = small_probe(work);
  const fs::path source = model("qwen3-dense-tiny");
  const model::ModelSpec spec = model::load_model_spec(source);
  const io::Checkpoint checkpoint = io::Checkpoint::open(source);
  const std::map<std::string, float> amax = input_amax_from_probe(spec, probe);
  const fs::path root = work / "render";
  const WeightFormat& nvfp4 = formats::format_by_name("NVFP4A16");
  const WeightFormat& bf16 = formats::format_by_name("BF16");
  const std::vector<std::size_t> linears = {0, 1, 2, 3};  // layer 0: q, k, v, o
  ASSERT_EQ(spec.linears[2].name, "model.layers.0.self_attn.v_proj");

  const auto gptq = [&](double damp) {
    return GptqRounding(statistics_from_probe(probe), {.damp = damp}, probe.fingerprint());
  };
  const GptqRounding cold_rounding = gptq(0.01);
  const LinearEncoder cold(spec, checkpoint, cold_rounding, amax, kBlackwell, root);
  ASSERT_NE(cold.render_cache(), nullptr);
  std::vector<formats::EncodedWeight> rendered;
  for (const std::size_t i : linears) rendered.push_back(cold.encode(i, nvfp4));
  cold.encode(0, bf16);  // a copy of the source: not cached
  EXPECT_EQ(cold.render_cache()->stores(), 4);
  EXPECT_EQ(cold.render_cache()->hits(), 0);
  EXPECT_EQ(cold_rounding.factorizations(), 2);  // q/k/v share one Hessian, o has its own
  EXPECT_TRUE(fs::exists(cold.render_cache()->directory() /
                         "model.layers.0.self_attn.k_proj.NVFP4A16.safetensors"));

  const GptqRounding warm_rounding = gptq(0.01);
  const LinearEncoder warm(spec, checkpoint, warm_rounding, amax, kBlackwell, root);
  EXPECT_EQ(warm.render_cache()->directory(), cold.render_cache()->directory());
  for (std::size_t k = 0; k < linears.size(); ++k) {
    const formats::EncodedWeight again = warm.encode(linears[k], nvfp4);
    EXPECT_EQ(again.format, rendered[k].format);
    EXPECT_EQ(again.shape.out, rendered[k].shape.out);
    ASSERT_EQ(again.tensors.size(), rendered[k].tensors.size());
    for (std::size_t t = 0; t < again.tensors.size(); ++t) {
      EXPECT_EQ(again.tensors[t].spec.suffix, rendered[k].tensors[t].spec.suffix);
      EXPECT_EQ(again.tensors[t].spec.dtype, rendered[k].tensors[t].spec.dtype);
      EXPECT_EQ(again.tensors[t].spec.shape, rendered[k].tensors[t].spec.shape);
      EXPECT_EQ(again.tensors[t].bytes, rendered[k].tensors[t].bytes);
    }
    const std::string& name = spec.linears[linears[k]].name;
    EXPECT_EQ(warm_rounding.encoding_report(name, "NVFP4A16"),
              cold_rounding.encoding_report(name, "NVFP4A16"));
  }
  EXPECT_EQ(warm.render_cache()->hits(), 4);
  EXPECT_EQ(warm.render_cache()->stores(), 0);
  EXPECT_EQ(warm_rounding.factorizations(), 0);
  EXPECT_EQ(warm_rounding.reports().size(), 4u);

  // Another damping: a new fingerprint; its renders replace the stale ones on disk.
  const GptqRounding damped_rounding = gptq(0.02);
  const LinearEncoder damped(spec, checkpoint, damped_rounding, amax, kBlackwell, root);
  EXPECT_NE(damped.render_cache()->fingerprint(), cold.render_cache()->fingerprint());
  EXPECT_FALSE(fs::exists(cold.render_cache()->directory()));
  damped.encode(1, nvfp4);
  EXPECT_EQ(damped.render_cache()->hits(), 0);
  EXPECT_EQ(damped.render_cache()->stores(), 1);

  // Other calibration amax (W4A4 input scales): another fingerprint too.
  std::map<std::string, float> other_amax = amax;
  other_amax.begin()->second *= 2.0f;
  EXPECT_NE(render_fingerprint(source, damped_rounding, other_amax, kBlackwell),
            damped.render_cache()->fingerprint());
  // Another serving target (NVFP4's scale rule follows its kernel): another fingerprint too.
  EXPECT_NE(render_fingerprint(source, damped_rounding, amax, formats::ServingTarget::kHopper),
            damped.render_cache()->fingerprint());

  // An entry that does not parse is a miss, rendered and stored again.
  const fs::path entry =
      damped.render_cache()->directory() / "model.layers.0.self_attn.k_proj.NVFP4A16.safetensors";
  write_text_file_atomic(entry, "not safetensors");
  const LinearEncoder repaired(spec, checkpoint, damped_rounding, amax, kBlackwell, root);
  repaired.encode(1, nvfp4);
  EXPECT_EQ(repaired.render_cache()->hits(), 0);
  EXPECT_EQ(repaired.render_cache()->stores(), 1);
}

// The checkpoint is the same bytes whether export renders every Linear itself, fills a cold
// render cache, or copies every render from a warm one (where no Hessian is factored).
TEST(RenderCache, ExportIsByteIdenticalWithAndWithoutAWarmCache) {
  PQ_REQUIRE_SHARED();
  test::TempDir work;
  const probe::ProbeResult probe = small_probe(work);
  const fs::path source = model("qwen3-dense-tiny");
  const model::ModelSpec spec = model::load_model_spec(source);
  const alloc::AssignmentFile assignment =
      make_assignment(source, cycle({"NVFP4", "MXFP8", "INT4_W4A16", "BF16"}));
  const fs::path path = save_assignment(work / "alloc", assignment);
  // Each run writes `out` (the model card names it) and is then moved aside to `kept`.
  const auto export_to = [&](const std::string& kept, const fs::path& cache) {
    const GptqRounding rounding(statistics_from_probe(probe), {}, probe.fingerprint());
    ExportJob job = job_for(source, path, work / "out");
    job.input_amax = input_amax_from_probe(spec, probe);
    job.render_cache = cache;
    run_export(job, rounding);
    fs::rename(work / "out", work / kept);
    return rounding.factorizations();
  };
  EXPECT_GT(export_to("uncached", {}), 0);
  EXPECT_GT(export_to("cold", work / "render"), 0);
  EXPECT_EQ(export_to("warm", work / "render"), 0);
  expect_same_files(work / "uncached", work / "cold");
  expect_same_files(work / "uncached", work / "warm");
}

// --rounding: gptq by default, which needs --probe (one-line error without it); nearest writes
// what the library's nearest rounding writes; gptq what GptqRounding over the probe writes, its
// renders kept in WORK/render beside WORK/probe.
TEST(ExportCli, RoundingOptionIsHonoured) {
  PQ_REQUIRE_SHARED();
  test::TempDir work;
  const probe::ProbeResult probe = small_probe(work);
  const fs::path source = model("qwen3-dense-tiny");
  const model::ModelSpec spec = model::load_model_spec(source);
  const alloc::AssignmentFile assignment = make_assignment(source, cycle({"NVFP4A16", "MXFP8"}));
  const fs::path path = save_assignment(work / "alloc", assignment);
  const auto args = [&](const std::string& out, const std::string& extra) {
    return fmt::format("'{}' --assignment '{}' --out '{}' {}", source.string(), path.string(),
                       (work / out).string(), extra);
  };

  EXPECT_EQ(run_cli(args("none", ""), work.path()), 1);
  const std::string error = read_text_file(work / "stderr");
  EXPECT_NE(error.find("--probe"), std::string::npos) << error;
  EXPECT_EQ(std::count(error.begin(), error.end(), '\n'), 1) << error;
  EXPECT_FALSE(fs::exists(work / "none"));

  const std::string with_probe = fmt::format("--probe '{}'", (work / "probe").string());
  ASSERT_EQ(run_cli(args("gptq", with_probe), work.path()), 0) << read_text_file(work / "stderr");
  EXPECT_TRUE(fs::is_directory(work / "render"));
  ASSERT_EQ(run_cli(args("nearest", with_probe + " --rounding nearest"), work.path()), 0)
      << read_text_file(work / "stderr");
  verify_export(source, work / "nearest", assignment);

  ExportJob job = job_for(source, path, work / "library-gptq");
  job.input_amax = input_amax_from_probe(spec, probe);
  run_export(job, *make_rounding("gptq", &probe));
  const io::Checkpoint cli = io::Checkpoint::open(work / "gptq");
  const io::Checkpoint library = io::Checkpoint::open(work / "library-gptq");
  const io::Checkpoint nearest = io::Checkpoint::open(work / "nearest");
  ASSERT_EQ(cli.tensor_names(), library.tensor_names());
  bool differs_from_nearest = false;
  for (const std::string& name : cli.tensor_names()) {
    EXPECT_EQ(bytes_of(cli.view(name)), bytes_of(library.view(name))) << name;
    differs_from_nearest |= bytes_of(cli.view(name)) != bytes_of(nearest.view(name));
  }
  EXPECT_TRUE(differs_from_nearest);
  EXPECT_NE(read_text_file(work / "gptq" / "README.md").find("GPTQ"), std::string::npos);
}

// ---- Qwen3.5 / Qwen3.6: checkpoint names, per-expert experts, vLLM's view of the config ----

// How vLLM resolves a quantization_config for one model class: it maps every layer-path target
// and ignore entry through the class's hf_to_vllm_mapper (compressed_tensors.py
// apply_vllm_mapper; WeightsMapper orig_to_new_prefix), then asks, per module it builds, for a
// scheme (compressed_tensors/utils.py should_ignore_layer, find_matched_target,
// _match_fused_layer), fused modules through their packed_modules_mapping shards and the fused MoE
// module through the unfused names of expert 0 (compressed_tensors_moe.py get_moe_method).
struct VllmModelClass {
  std::vector<std::pair<std::string, std::string>> prefix_map;          // hf -> vLLM, in order
  std::vector<std::pair<std::string, std::vector<std::string>>> fused;  // packed_modules_mapping
};

// Qwen3_5(Moe)ForConditionalGeneration: the Qwen3-VL mapper (qwen3_vl.py) and qwen3_5.py's
// packed_modules_mapping.
const VllmModelClass kQwen3_5Main{{{"model.visual.", "visual."},
                                   {"lm_head.", "language_model.lm_head."},
                                   {"model.language_model.", "language_model.model."}},
                                  {{"qkv_proj", {"q_proj", "k_proj", "v_proj"}},
                                   {"gate_up_proj", {"gate_proj", "up_proj"}},
                                   {"in_proj_qkvz", {"in_proj_qkv", "in_proj_z"}},
                                   {"in_proj_ba", {"in_proj_b", "in_proj_a"}}}};
// Qwen3_5(Moe)MTP (qwen3_5_mtp.py): modules under "mtp.", no mapper, q/k/v and gate/up fused.
const VllmModelClass kQwen3_5Mtp{
    {}, {{"qkv_proj", {"q_proj", "k_proj", "v_proj"}}, {"gate_up_proj", {"gate_proj", "up_proj"}}}};

std::string replace_all(std::string text, const std::string& from, const std::string& to) {
  for (std::size_t at = text.find(from); at != std::string::npos;
       at = text.find(from, at + to.size())) {
    text.replace(at, from.size(), to);
  }
  return text;
}

class VllmSchemes {
 public:
  VllmSchemes(const nlohmann::json& config, VllmModelClass model) : model_(std::move(model)) {
    for (const auto& [group, body] : config.at("config_groups").items()) {
      for (const std::string target : body.at("targets")) {
        const std::string mapped = map(target);
        // A dict keyed by target: a later group replaces an earlier one's entry.
        const auto it = std::find_if(targets_.begin(), targets_.end(),
                                     [&](const auto& t) { return t.first == mapped; });
        if (it == targets_.end()) {
          targets_.emplace_back(mapped, group);
        } else {
          it->second = group;
        }
      }
    }
    for (const std::string entry : config.at("ignore")) ignore_.push_back(map(entry));
  }

  // The config group of a vLLM module, nullopt when it is left unquantized.
  std::optional<std::string> scheme_of(const std::string& module) const {
    if (ignored(module)) return std::nullopt;
    if (const auto target = matched_target(module)) return group_of(*target);
    return std::nullopt;
  }
  // The fused MoE module's scheme: its three projections of expert 0 must agree.
  std::optional<std::string> moe_scheme_of(const std::string& experts) const {
    const auto gate = scheme_of(experts + ".0.gate_proj");
    EXPECT_EQ(scheme_of(experts + ".0.up_proj"), gate) << experts;
    EXPECT_EQ(scheme_of(experts + ".0.down_proj"), gate) << experts;
    return gate;
  }
  // How many config groups, plus the ignore list, name this (unfused) module.
  int coverage(const std::string& module) const {
    std::set<std::string> groups;
    for (const auto& [target, group] : targets_) {
      if (matches(module, target)) groups.insert(group);
    }
    return static_cast<int>(groups.size()) + (matches_any(module, ignore_) ? 1 : 0);
  }
  std::string map(const std::string& name) const {
    if (name.find('.') == std::string::npos || name.starts_with("re:")) return name;
    std::string mapped = name;
    for (const auto& [from, to] : model_.prefix_map) {
      if (mapped.starts_with(from)) mapped = to + mapped.substr(from.size());
    }
    return mapped;
  }

 private:
  static bool matches(const std::string& value, const std::string& target) {
    if (target.starts_with("re:")) {
      return std::regex_search(value, std::regex(target.substr(3)),
                               std::regex_constants::match_continuous);
    }
    return value == target;
  }
  static bool matches_any(const std::string& value, const std::vector<std::string>& targets) {
    return std::any_of(targets.begin(), targets.end(),
                       [&](const std::string& t) { return matches(value, t); });
  }
  const std::vector<std::string>* shards_of(const std::string& proj) const {
    for (const auto& [fused, shards] : model_.fused) {
      if (fused == proj) return &shards;
    }
    return nullptr;
  }
  bool ignored(const std::string& module) const {
    const std::string proj = module.substr(module.rfind('.') + 1);
    const std::vector<std::string>* shards = shards_of(proj);
    if (shards == nullptr || std::find(ignore_.begin(), ignore_.end(), module) != ignore_.end()) {
      return matches_any(module, ignore_);
    }
    std::optional<bool> all;
    for (const std::string& shard : *shards) {
      const bool shard_ignored = matches_any(replace_all(module, proj, shard), ignore_);
      if (all && *all != shard_ignored) {
        ADD_FAILURE() << "vLLM: different quantization schemes for the shards of " << module;
      }
      all = shard_ignored;
    }
    return *all;
  }
  std::optional<std::string> matched_target(const std::string& module) const {
    for (const auto& [target, group] : targets_) {
      if (matches(module, target)) return target;
    }
    for (const auto& [fused, shards] : model_.fused) {
      if (!module.ends_with(fused)) continue;
      std::optional<std::string> first;
      for (const std::string& shard : shards) {
        const std::string unfused = replace_all(module, fused, shard);
        const auto it = std::find_if(targets_.begin(), targets_.end(),
                                     [&](const auto& t) { return matches(unfused, t.first); });
        if (it == targets_.end()) return std::nullopt;
        if (!first) first = it->first;
      }
      return first;
    }
    return std::nullopt;
  }
  std::string group_of(const std::string& target) const {
    return std::find_if(targets_.begin(), targets_.end(),
                        [&](const auto& t) { return t.first == target; })
        ->second;
  }

  VllmModelClass model_;
  std::vector<std::pair<std::string, std::string>> targets_;
  std::vector<std::string> ignore_;
};

// The module vLLM builds a Linear into, in HF naming: the fused MoE module of an expert, the
// fused module of a sibling group (qkv_proj, gate_up_proj, in_proj_qkvz, in_proj_ba), else
// itself.
std::string vllm_module(const model::Linear& linear) {
  if (linear.expert) return linear.name.substr(0, linear.name.rfind(".experts.") + 8);
  return linear.group.value_or(linear.name);
}

// Checks that vLLM gives every Linear of `spec` the scheme `format_of` says (a Linear absent
// from it, or BF16, unquantized), and that config groups and ignore list name each unfused
// Linear exactly once.
void expect_vllm_resolves(const model::ModelSpec& spec, const nlohmann::json& qconfig,
                          const std::map<std::string, std::string>& format_of) {
  const VllmSchemes main(qconfig, kQwen3_5Main);
  const VllmSchemes mtp(qconfig, kQwen3_5Mtp);
  for (const model::Linear& linear : spec.linears) {
    const VllmSchemes& view = linear.component == model::Component::kMtp ? mtp : main;
    const std::string module = view.map(vllm_module(linear));
    EXPECT_EQ(view.coverage(view.map(linear.name)), 1) << linear.name;
    const std::optional<std::string> group =
        linear.expert ? view.moe_scheme_of(module) : view.scheme_of(module);
    const auto it = format_of.find(linear.name);
    if (it == format_of.end() || it->second == "BF16") {
      EXPECT_FALSE(group.has_value()) << linear.name << " -> " << module << " is quantized";
      continue;
    }
    ASSERT_TRUE(group.has_value()) << linear.name << " -> " << module << " has no scheme";
    nlohmann::json body = qconfig.at("config_groups").at(*group);
    body.erase("targets");
    EXPECT_EQ(body, formats::format_by_name(it->second).config_group())
        << linear.name << " is served as " << *group << ", not " << it->second;
  }
}

// A format per Qwen3.5 Linear that vLLM serves for it, several formats per model; the experts of
// layer 1 stay BF16 so that an ignored fused MoE module is covered too.
std::string qwen3_5_format(std::size_t, const model::Linear& first) {
  if (first.expert) return first.layer == 1 ? "BF16" : "NVFP4A16";
  if (first.role == "in_proj_b" || first.role == "in_proj_a") return "FP8_E4M3";
  if (first.role == "q_proj" || first.role == "down_proj") return "FP8_E4M3";
  if (first.role == "out_proj") return "BF16";
  if (first.role.starts_with("shared_expert")) return "FP8_E4M3";
  return "NVFP4A16";
}

std::map<std::string, std::string> format_of(const alloc::AssignmentFile& assignment) {
  std::map<std::string, std::string> formats;
  for (const alloc::AssignedLinear& linear : assignment.linears) {
    formats[linear.name] = linear.format;
  }
  return formats;
}

void expect_qwen3_5_export(const std::string& name) {
  test::TempDir work;
  const fs::path source = model(name);
  const model::ModelSpec spec = model::load_model_spec(source);
  const alloc::AssignmentFile assignment = make_assignment(source, qwen3_5_format);
  ExportJob job = job_for(source, save_assignment(work / "alloc", assignment), work / "out");
  job.max_shard_bytes = 300'000;
  const ExportSummary summary = run_export(job);
  // Bits charged are bytes on disk, experts written one tensor set per expert included.
  EXPECT_EQ(summary.tensor_bytes, assignment.totals.checkpoint_bytes);

  const io::Checkpoint in = io::Checkpoint::open(source);
  const io::Checkpoint out = io::Checkpoint::open(work / "out");
  for (const std::string& tensor : out.tensor_names()) {
    EXPECT_TRUE(tensor.starts_with("model.language_model.") || tensor.starts_with("mtp.") ||
                tensor.starts_with("model.visual.") || tensor == "lm_head.weight")
        << tensor;
    EXPECT_FALSE(tensor.ends_with("mlp.experts.gate_up_proj") ||
                 tensor.ends_with("mlp.experts.down_proj"))
        << tensor;
  }
  // Passthrough tensors (norms, conv1d, A_log in F32, dt_bias, routers, embeddings, the vision
  // tower) are the source's bytes under the source's names.
  for (const std::string& tensor : passthrough_names(spec)) {
    ASSERT_TRUE(out.contains(tensor)) << tensor;
    EXPECT_EQ(out.info(tensor).dtype, in.info(tensor).dtype) << tensor;
    EXPECT_EQ(bytes_of(out.view(tensor)), bytes_of(in.view(tensor))) << tensor;
  }
  // Experts: per-expert tensors as vLLM's Qwen3.5 loader maps them (expert_params_mapping
  // "experts.{e}.gate_proj." -> w13 shard w1, up_proj -> w3, down_proj -> w2); BF16 ones are the
  // source's rows.
  for (const model::Linear& linear : spec.linears) {
    if (!linear.expert) continue;
    if (linear.layer == 1 && linear.component == model::Component::kText) {
      EXPECT_EQ(out.info(linear.name + ".weight").dtype, io::DType::BF16) << linear.name;
      EXPECT_TRUE(
          bit_identical(out.to_f32(linear.name + ".weight"), model::read_source_weight(in, linear)))
          << linear.name;
    } else {
      EXPECT_TRUE(out.contains(linear.name + ".weight_packed")) << linear.name;
    }
  }
  // config.json keeps every source field and adds quantization_config.
  nlohmann::json config = read_json_file(work / "out" / "config.json");
  const nlohmann::json qconfig = config.at("quantization_config");
  config.erase("quantization_config");
  EXPECT_EQ(config, read_json_file(source / "config.json"));
  expect_vllm_resolves(spec, qconfig, format_of(assignment));
  // A consumer's reading of the export finds the source's inventory, experts per expert instead
  // of packed.
  const validate::CompressedTensorsCheckpoint exported =
      validate::CompressedTensorsCheckpoint::open(work / "out");
  EXPECT_EQ(exported.spec().linears.size(), spec.linears.size());
}

TEST(Qwen3_5Export, DenseWritesCheckpointNamesThatVllmResolves) {
  PQ_REQUIRE_SHARED();
  expect_qwen3_5_export("qwen3_5-tiny-random");
}

TEST(Qwen3_5Export, MoeWritesExpertsPerExpertUnderNamesThatVllmResolves) {
  PQ_REQUIRE_SHARED();
  expect_qwen3_5_export("qwen3_5-moe-tiny-random");
}

TEST(Qwen3_5Export, FormatsVllmCannotServeAreNeverOfferedNorExported) {
  PQ_REQUIRE_SHARED();
  const fs::path source = model("qwen3_5-moe-tiny-random");
  const model::ModelSpec spec = model::load_model_spec(source);
  for (const model::Linear& linear : spec.linears) {
    if (linear.role == "in_proj_b" || linear.role == "in_proj_a") {
      EXPECT_FALSE(linear.allows("NVFP4A16")) << linear.name;
      EXPECT_FALSE(linear.allows("FP8_BLOCK")) << linear.name;
      EXPECT_TRUE(linear.allows("FP8_E4M3")) << linear.name;
    } else if (linear.expert) {
      EXPECT_TRUE(linear.allows("NVFP4A16")) << linear.name;
      EXPECT_FALSE(linear.allows("INT4_W4A16")) << linear.name;
      EXPECT_FALSE(linear.allows("FP8_E4M3A16")) << linear.name;
    } else {
      EXPECT_TRUE(linear.formats.empty()) << linear.name;
    }
  }
  test::TempDir work;
  const alloc::AssignmentFile beta_alpha_nvfp4 =
      make_assignment(source, [](std::size_t unit, const model::Linear& first) {
        return first.role == "in_proj_b" ? std::string("NVFP4A16") : qwen3_5_format(unit, first);
      });
  expect_export_error(job_for(source, save_assignment(work / "a", beta_alpha_nvfp4), work / "out"),
                      "which vLLM cannot serve for it");
}

TEST(Qwen3_5Export, VisionFormatStoresTheTowerRoundedToNearest) {
  PQ_REQUIRE_SHARED();
  test::TempDir work;
  const fs::path source = model("qwen3_5-tiny-random");
  const model::ModelSpec spec = model::load_model_spec(source);
  const alloc::AssignmentFile assignment = make_assignment(source, qwen3_5_format);
  ExportJob job = job_for(source, save_assignment(work / "alloc", assignment), work / "out");
  job.vision_format = "FP8_E4M3";
  run_export(job);
  const io::Checkpoint in = io::Checkpoint::open(source);
  const io::Checkpoint out = io::Checkpoint::open(work / "out");
  const WeightFormat& fp8 = formats::format_by_name("FP8_E4M3");
  std::map<std::string, std::string> formats = format_of(assignment);
  int vision = 0;
  for (const model::Linear& linear : spec.linears) {
    if (linear.component != model::Component::kVision) continue;
    ++vision;
    formats[linear.name] = "FP8_E4M3";
    const Shape2D shape{linear.out_features, linear.in_features};
    const formats::EncodedWeight expected = fp8.quantize(in.to_f32(linear.weight_tensor), shape);
    for (const formats::EncodedTensor& tensor : expected.tensors) {
      EXPECT_EQ(bytes_of(out.view(linear.name + "." + tensor.spec.suffix)), tensor.bytes)
          << linear.name << "." << tensor.spec.suffix;
    }
    // Its bias stays as stored.
    EXPECT_EQ(bytes_of(out.view(*linear.bias_tensor)), bytes_of(in.view(*linear.bias_tensor)));
  }
  EXPECT_EQ(vision, 4 * 2 + 2);
  const nlohmann::json config = read_json_file(work / "out" / "config.json");
  expect_vllm_resolves(spec, config.at("quantization_config"), formats);
  test::TempDir bad;
  job.out = bad / "out";
  job.vision_format = "MXFP6_E2M3A16";
  expect_export_error(job, "--vision-format MXFP6_E2M3A16");
}

}  // namespace
}  // namespace pq::exporter
