// Export of the DeepSeek-V3 tiny checkpoint (native FP8 128x128 block weights, MLA, the MTP layer
// as model.layers.4): FP8_SOURCE keeps the source's bytes, every other format quantizes the
// dequantized source, vLLM's fusions share one scheme, the quantization config names the modules
// vLLM looks up (deepseek_v3-architecture-facts.md §8: the checkpoint's names, the MTP layer's
// included), and what ships is what was charged.
#include <gtest/gtest.h>

#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "alloc/assignment.h"
#include "common/file_util.h"
#include "export/exporter.h"
#include "export/rounding.h"
#include "formats/weight_format.h"
#include "io/safetensors.h"
#include "model/model_spec.h"
#include "support/test_support.h"
#include "support/unit_assignment.h"
#include "validate/ct_checkpoint.h"

namespace pq::exporter {
namespace {

namespace fs = std::filesystem;

const std::vector<std::string> kMenu = {"FP8_SOURCE", "NVFP4A16", "MXFP8", "BF16"};

std::vector<std::uint8_t> bytes_of(const io::TensorView& view) {
  return {view.bytes.begin(), view.bytes.end()};
}

TEST(DeepSeekV3Export, SchemesFollowVllmFusionsAndFp8SourceKeepsTheSourceBytes) {
  PQ_REQUIRE_SHARED();
  const fs::path source_dir = test::shared_dir() / "models" / "deepseek_v3-tiny-random";
  const model::ModelSpec spec = model::load_model_spec(source_dir);
  const io::Checkpoint source = io::Checkpoint::open(source_dir);
  // Units cycle through the menu, skipping a format the unit's shape rejects (MXFP8 needs 128
  // output rows and 128 inputs, which the tiny MLA projections lack).
  const alloc::AssignmentFile assignment =
      test::unit_assignment(spec, source, kMenu, [](std::size_t unit, const model::Linear& first) {
        for (std::size_t i = 0;; ++i) {
          const std::string& format = kMenu[(unit + i) % kMenu.size()];
          if (formats::format_by_name(format).accepts({first.out_features, first.in_features})) {
            return format;
          }
        }
      });
  test::TempDir dir;
  fs::create_directories(dir / "alloc");
  alloc::write_assignment(dir / "alloc" / "assignment.json", assignment);
  ExportJob job;
  job.model_dir = source_dir;
  job.assignment = dir / "alloc" / "assignment.json";
  job.out = dir / "out";
  job.command_line = "prismaquant export (test)";
  const NearestRounding nearest;
  const ExportSummary summary = run_export(job, nearest);

  const io::Checkpoint exported = io::Checkpoint::open(job.out);
  std::uint64_t data_bytes = 0;
  for (const std::string& name : exported.tensor_names()) {
    data_bytes += exported.info(name).nbytes();
    EXPECT_FALSE(name.ends_with("weight_scale_inv")) << name;
  }
  EXPECT_EQ(data_bytes, assignment.totals.checkpoint_bytes);
  EXPECT_EQ(summary.tensor_bytes, data_bytes);

  std::map<std::string, std::string> format_of;
  std::map<std::string, int> count;
  for (const alloc::AssignedLinear& linear : assignment.linears) {
    format_of[linear.name] = linear.format;
  }
  for (const model::Linear& linear : spec.linears) {
    if (!linear.is_candidate) continue;
    const std::string& format = format_of.at(linear.name);
    ++count[format];
    if (format != "FP8_SOURCE") continue;
    EXPECT_EQ(bytes_of(exported.view(linear.name + ".weight")),
              bytes_of(source.view(linear.weight_tensor)))
        << linear.name;
    EXPECT_EQ(bytes_of(exported.view(linear.name + ".weight_scale")),
              bytes_of(source.view(*linear.scale_tensor)))
        << linear.name;
  }
  for (const std::string& format : kMenu) EXPECT_GT(count[format], 0) << format;
  // vLLM's fused modules take one scheme: fused_qkv_a_proj, gate_up_proj, each FusedMoE.
  for (const model::SiblingGroup& group : spec.groups) {
    std::set<std::string> formats;
    for (const std::size_t member : group.members) {
      formats.insert(format_of.at(spec.linears[member].name));
    }
    EXPECT_EQ(formats.size(), 1u) << group.name;
  }

  const nlohmann::json config = nlohmann::json::parse(read_text_file(job.out / "config.json"));
  const nlohmann::json& qc = config.at("quantization_config");
  EXPECT_EQ(qc.at("quant_method"), "compressed-tensors");
  std::set<std::string> targets;
  for (const auto& [name, group] : qc.at("config_groups").items()) {
    for (const std::string target : group.at("targets")) targets.insert(target);
  }
  const std::set<std::string> ignore(qc.at("ignore").begin(), qc.at("ignore").end());
  for (const char* name : {"model.layers.1.mlp.gate", "model.layers.4.mlp.gate", "lm_head",
                           "model.layers.4.eh_proj", "model.layers.4.shared_head.head"}) {
    EXPECT_TRUE(ignore.contains(name)) << name;
  }
  for (const model::Linear& linear : spec.linears) {
    EXPECT_EQ(linear.serving_name, linear.name);
    EXPECT_EQ(targets.contains(linear.name) + ignore.contains(linear.name), 1) << linear.name;
  }

  // validate's reader resolves every Linear's scheme through the same names.
  const validate::CompressedTensorsCheckpoint read =
      validate::CompressedTensorsCheckpoint::open(job.out);
  EXPECT_EQ(read.spec().linears.size(), spec.linears.size());
}

}  // namespace
}  // namespace pq::exporter
