// Export of the MiniMax-M2 tiny checkpoint (native FP8 128x128 block weights): FP8_SOURCE keeps
// the source's bytes (checked against the sha256 the fixture took of the source), the scale under
// compressed-tensors' name, every other format quantizes the dequantized source, the quantization
// config names vLLM's modules (minimax_m2-architecture-facts.md §8), and what ships is what was
// charged.
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "alloc/assignment.h"
#include "common/error.h"
#include "common/file_util.h"
#include "export/exporter.h"
#include "export/rounding.h"
#include "formats/weight_format.h"
#include "io/fp8_block.h"
#include "io/safetensors.h"
#include "model/model_spec.h"
#include "support/sha256.h"
#include "support/test_support.h"
#include "support/unit_assignment.h"
#include "validate/ct_checkpoint.h"

namespace pq::exporter {
namespace {

namespace fs = std::filesystem;
using formats::Shape2D;

const std::vector<std::string> kMenu = {"FP8_SOURCE", "NVFP4A16", "MXFP8", "BF16"};

fs::path source_dir() {
  return test::shared_dir() / "models" / "minimax_m2-tiny-random";
}

// One format per decision unit (sibling group or lone Linear) from `choose`, charged what the
// format stores, as the allocate stage writes it (test::unit_assignment).
alloc::AssignmentFile make_assignment(const model::ModelSpec& spec,
                                      const io::Checkpoint& checkpoint,
                                      const std::function<std::string(std::size_t)>& choose) {
  return test::unit_assignment(
      spec, checkpoint, kMenu,
      [&](std::size_t unit, const model::Linear&) { return choose(unit); });
}

std::vector<std::uint8_t> bytes_of(const io::TensorView& view) {
  return {view.bytes.begin(), view.bytes.end()};
}

TEST(MiniMaxM2Export, Fp8SourceKeepsTheSourceBytesAndOtherFormatsQuantizeTheDequantizedWeights) {
  PQ_REQUIRE_SHARED();
  ASSERT_EQ(test::sha256_hex(std::vector<std::uint8_t>{'a', 'b', 'c'}),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  const model::ModelSpec spec = model::load_model_spec(source_dir());
  const io::Checkpoint source = io::Checkpoint::open(source_dir());
  // Units cycle through the menu: per layer qkv, o_proj and the experts group.
  const alloc::AssignmentFile assignment =
      make_assignment(spec, source, [](std::size_t unit) { return kMenu[unit % kMenu.size()]; });
  test::TempDir dir;
  fs::create_directories(dir / "alloc");
  alloc::write_assignment(dir / "alloc" / "assignment.json", assignment);
  ExportJob job;
  job.model_dir = source_dir();
  job.assignment = dir / "alloc" / "assignment.json";
  job.out = dir / "out";
  job.command_line = "prismaquant export (test)";
  const NearestRounding nearest;
  const ExportSummary summary = run_export(job, nearest);

  std::ifstream in(test::shared_dir() / "fixtures" / "minimax_m2-tiny-random-logits.json");
  const nlohmann::json digests = nlohmann::json::parse(in).at("fp8_source_sha256");
  const io::Checkpoint exported = io::Checkpoint::open(job.out);
  std::map<std::string, std::string> format_of;
  for (const alloc::AssignedLinear& linear : assignment.linears) {
    format_of[linear.name] = linear.format;
  }
  std::uint64_t data_bytes = 0;
  for (const std::string& name : exported.tensor_names()) {
    data_bytes += exported.info(name).nbytes();
    EXPECT_FALSE(name.ends_with("weight_scale_inv")) << name;
  }
  EXPECT_EQ(data_bytes, assignment.totals.checkpoint_bytes);
  EXPECT_EQ(summary.tensor_bytes, data_bytes);

  std::map<std::string, int> count;
  for (const model::Linear& linear : spec.linears) {
    if (!linear.is_candidate) continue;
    SCOPED_TRACE(linear.name);
    const std::string& format = format_of.at(linear.name);
    ++count[format];
    if (format == "FP8_SOURCE") {
      const io::TensorView weight = exported.view(linear.name + ".weight");
      const io::TensorView scale = exported.view(linear.name + ".weight_scale");
      EXPECT_EQ(weight.info->dtype, io::DType::F8_E4M3);
      EXPECT_EQ(scale.info->dtype, io::DType::F32);
      EXPECT_EQ(bytes_of(weight), bytes_of(source.view(linear.weight_tensor)));
      EXPECT_EQ(test::sha256_hex(weight.bytes), digests.at(linear.weight_tensor));
      EXPECT_EQ(test::sha256_hex(scale.bytes), digests.at(*linear.scale_tensor));
      continue;
    }
    // Every other format quantizes the dequantized source weight.
    const formats::WeightFormat& f = formats::format_by_name(format);
    const Shape2D shape{linear.out_features, linear.in_features};
    formats::EncodedWeight encoded{std::string(f.name()), shape, {}};
    for (const formats::TensorSpec& tensor : f.tensors(shape)) {
      encoded.tensors.push_back(
          {tensor, bytes_of(exported.view(linear.name + "." + tensor.suffix))});
    }
    const std::vector<float> dequantized = io::decode_weight(source, linear.weight_tensor);
    formats::QuantizeOptions options;
    if (format.starts_with("NVFP4")) {
      options.weight_global_scale = exported.to_f32(linear.name + ".weight_global_scale").at(0);
    }
    std::vector<float> expected(dequantized.size());
    f.fake_quantize(dequantized, shape, expected, options);
    EXPECT_EQ(f.dequantize(encoded), expected);
  }
  for (const std::string& format : kMenu) EXPECT_GT(count[format], 0) << format;

  // vLLM's names (§8.2, §8.4): experts under mlp.experts.E.{gate,up,down}_proj, the router as
  // mlp.gate (ignored); attention as stored.
  const nlohmann::json config = nlohmann::json::parse(read_text_file(job.out / "config.json"));
  const nlohmann::json& qc = config.at("quantization_config");
  EXPECT_EQ(qc.at("quant_method"), "compressed-tensors");
  std::set<std::string> targets;
  for (const auto& [name, group] : qc.at("config_groups").items()) {
    for (const std::string target : group.at("targets")) targets.insert(target);
    if (group.at("targets")[0] == "model.layers.0.self_attn.q_proj") {
      EXPECT_EQ(group, [&] {
        nlohmann::json expected = formats::format_by_name("FP8_SOURCE").config_group();
        expected["targets"] = group.at("targets");
        return expected;
      }());
      EXPECT_EQ(group.at("weights").at("block_structure"), nlohmann::json({128, 128}));
    }
  }
  const std::set<std::string> ignore(qc.at("ignore").begin(), qc.at("ignore").end());
  EXPECT_TRUE(ignore.contains("model.layers.0.mlp.gate"));
  EXPECT_TRUE(ignore.contains("lm_head"));
  for (const model::Linear& linear : spec.linears) {
    EXPECT_EQ(targets.contains(linear.serving_name) + ignore.contains(linear.serving_name), 1)
        << linear.serving_name;
    EXPECT_FALSE(targets.contains(linear.name) && linear.name != linear.serving_name);
  }
  EXPECT_TRUE(targets.contains("model.layers.2.mlp.experts.7.down_proj") ||
              ignore.contains("model.layers.2.mlp.experts.7.down_proj"));

  // validate's reader resolves every Linear's scheme through the same names.
  const validate::CompressedTensorsCheckpoint read =
      validate::CompressedTensorsCheckpoint::open(job.out);
  EXPECT_EQ(read.spec().linears.size(), spec.linears.size());
}

}  // namespace
}  // namespace pq::exporter
