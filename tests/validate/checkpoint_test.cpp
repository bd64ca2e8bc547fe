// The consumer-side reader on a real export of ../shared/models/qwen3-dense-tiny in a mix of every
// scheme: it decodes what the formats library predicts bit for bit (two independent
// implementations agreeing), runs as a model against its source, and refuses hostile variants of
// the checkpoint with one line naming the culprit.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <bit>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>

#include "alloc/assignment.h"
#include "common/error.h"
#include "common/file_util.h"
#include "export/exporter.h"
#include "export/linear_encoder.h"
#include "formats/serving.h"
#include "formats/weight_format.h"
#include "io/safetensors.h"
#include "io/safetensors_writer.h"
#include "model/model_spec.h"
#include "pipeline/measure.h"
#include "runtime/evaluate.h"
#include "runtime/model.h"
#include "runtime/weights.h"
#include "support/test_support.h"
#include "support/unit_assignment.h"
#include "validate/ct_checkpoint.h"
#include "validate/ct_decode.h"
#include "validate/validate.h"

namespace pq::validate {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// One unit (sibling group or lone Linear) after another takes the next format of this cycle, so
// every exported scheme appears, NVFP4 and NVFP4A16 on q/k/v and on gate/up.
const std::vector<std::string> kCycle = {
    "NVFP4",     "NVFP4A16",   "MXFP8",           "INT4_W4A16", "FP8_E4M3", "BF16",       "MXFP4",
    "FP8_BLOCK", "INT8_W8A16", "FP8_E4M3_TENSOR", "MXFP4A16",   "MXFP8A16", "FP8_E4M3A16"};

fs::path source_dir() {
  return test::shared_dir() / "models" / "qwen3-dense-tiny";
}

// An assignment in the allocate stage's file format: each decision unit gets the next format of
// the cycle that vLLM serves for it (model::Linear::formats).
alloc::AssignmentFile cycle_assignment(const model::ModelSpec& spec, const io::Checkpoint& source,
                                       const std::vector<std::string>& cycle) {
  return test::unit_assignment(spec, source, cycle,
                               [&](std::size_t unit, const model::Linear& first) {
                                 std::size_t index = unit % cycle.size();
                                 while (!first.allows(cycle[index]))
                                   index = (index + 1) % cycle.size();
                                 return cycle[index];
                               });
}

// A plausible activation amax per Linear for the W4A4 input_global_scale.
std::map<std::string, float> input_amax(const model::ModelSpec& spec) {
  std::map<std::string, float> amax;
  for (std::size_t i = 0; i < spec.linears.size(); ++i) {
    amax[spec.linears[i].name] = 4.0f + static_cast<float>(i % 7);
  }
  return amax;
}

// Exports `model_dir` with the cycle of formats into `out`; returns the assignment.
alloc::AssignmentFile export_cycle(
    const fs::path& model_dir, const std::vector<std::string>& cycle, const fs::path& work,
    const fs::path& out, formats::ServingTarget target = formats::ServingTarget::kBlackwell) {
  const model::ModelSpec spec = model::load_model_spec(model_dir);
  const io::Checkpoint source = io::Checkpoint::open(model_dir);
  alloc::AssignmentFile assignment = cycle_assignment(spec, source, cycle);
  fs::create_directories(work);
  alloc::write_assignment(work / "assignment.json", assignment);
  exporter::ExportJob job;
  job.model_dir = model_dir;
  job.assignment = work / "assignment.json";
  job.out = out;
  job.input_amax = input_amax(spec);
  job.serve_on = target;
  exporter::run_export(job);
  return assignment;
}

// Independently of the exporter: the Linears whose NVFP4 global scale vLLM fuses with this one's
// (format-facts.md A.3.2): a dense sibling group, or one expert's gate_proj and up_proj.
bool shares_global_scale(const model::Linear& a, const model::Linear& b) {
  if (a.name == b.name) return true;
  if (!a.group || a.group != b.group) return false;
  if (!a.expert) return true;
  auto w13 = [](const model::Linear& l) {
    return l.role.ends_with("gate_proj") || l.role.ends_with("up_proj");
  };
  return a.expert == b.expert && w13(a) && w13(b);
}

// Every Linear of the exported checkpoint (exported for Blackwell), decoded by the reader, equals
// the formats library's fake quantization of the source weight (BF16 and unassigned Linears: the
// source values).
void expect_decodes_like_formats_library(const fs::path& exported, const fs::path& model_dir,
                                         const alloc::AssignmentFile& assignment,
                                         std::size_t expected_formats) {
  const CompressedTensorsCheckpoint ct = CompressedTensorsCheckpoint::open(exported);
  const model::ModelSpec spec = model::load_model_spec(model_dir);
  const io::Checkpoint source = io::Checkpoint::open(model_dir);
  const DecodedCheckpointWeightSource decoded(ct);
  std::map<std::string, std::string> format_of;
  for (const alloc::AssignedLinear& a : assignment.linears) format_of[a.name] = a.format;
  std::set<std::string> formats_seen;
  for (const model::Linear& linear : spec.linears) {
    const std::vector<float> weight = model::read_source_weight(source, linear);
    const std::vector<float> got = decoded.load_f32(linear.name + ".weight");
    ASSERT_EQ(got.size(), weight.size()) << linear.name;
    const auto it = format_of.find(linear.name);
    if (it == format_of.end() || it->second == "BF16") {
      EXPECT_EQ(ct.scheme_of(linear.name), nullptr) << linear.name;
      EXPECT_EQ(std::memcmp(got.data(), weight.data(), got.size() * 4), 0) << linear.name;
      continue;
    }
    formats_seen.insert(it->second);
    ASSERT_NE(ct.scheme_of(linear.name), nullptr) << linear.name;
    const formats::WeightFormat& format = formats::format_by_name(it->second);
    formats::QuantizeOptions options;
    if (it->second.starts_with("NVFP4")) {
      float amax = 0.0f;
      for (const model::Linear& other : spec.linears) {
        if (!shares_global_scale(linear, other)) continue;
        for (const float v : model::read_source_weight(source, other))
          amax = std::max(amax, std::fabs(v));
      }
      options.nvfp4_scales =
          formats::nvfp4_scales(format, linear.layer_kind(), formats::ServingTarget::kBlackwell);
      options.weight_global_scale = formats::nvfp4_weight_global_scale(amax, options.nvfp4_scales);
      if (it->second == "NVFP4") {
        // Required by the W4A4 format, unused by its weight arithmetic.
        options.input_global_scale = decoded.load_f32(linear.name + ".input_global_scale").at(0);
      }
    }
    std::vector<float> expected(weight.size());
    format.fake_quantize(weight, {linear.out_features, linear.in_features}, expected, options);
    EXPECT_EQ(std::memcmp(got.data(), expected.data(), got.size() * 4), 0)
        << linear.name << " (" << it->second << ")";
  }
  EXPECT_EQ(formats_seen.size(), expected_formats);
}

class ExportedCheckpoint : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!test::have_shared()) return;
    dir_ = std::make_unique<test::TempDir>();
    assignment_ = std::make_unique<alloc::AssignmentFile>(
        export_cycle(source_dir(), kCycle, dir_->path(), *dir_ / "exported"));
    // Beside the exported checkpoint: a short text whose last 10% is the held-out split.
    std::ifstream wiki(test::shared_dir() / "data" / "wikitext-2-test.txt", std::ios::binary);
    std::string text(60000, '\0');
    wiki.read(text.data(), static_cast<std::streamsize>(text.size()));
    text.resize(static_cast<std::size_t>(wiki.gcount()));
    write_text_file_atomic(*dir_ / "data.txt", text);
  }
  static void TearDownTestSuite() {
    assignment_.reset();
    dir_.reset();
  }
  void SetUp() override { PQ_REQUIRE_SHARED(); }

  static fs::path exported() { return *dir_ / "exported"; }
  static fs::path data() { return *dir_ / "data.txt"; }
  // validate on the exported checkpoint: 3 held-out windows of 64 tokens.
  static ValidateJob validate_exported(std::int64_t sample_tokens) {
    ValidateJob job;
    job.checkpoint = exported();
    job.reference = source_dir();
    job.data = data();
    job.seqlen = 64;
    job.max_seqs = 3;
    job.sample_tokens = sample_tokens;
    return job;
  }

  struct OwnedTensor {
    std::string name;
    io::DType dtype;
    std::vector<std::int64_t> shape;
    std::vector<std::uint8_t> bytes;
  };

  // A copy of the exported checkpoint with its tensors and config.json edited; returns its path.
  static fs::path variant(const std::string& name,
                          const std::function<void(std::vector<OwnedTensor>&)>& edit_tensors,
                          const std::function<void(json&)>& edit_config = nullptr) {
    const fs::path out = *dir_ / name;
    fs::remove_all(out);
    fs::create_directories(out);
    for (const fs::directory_entry& entry : fs::directory_iterator(exported())) {
      if (entry.path().extension() != ".safetensors")
        fs::copy_file(entry.path(), out / entry.path().filename());
    }
    const io::Checkpoint checkpoint = io::Checkpoint::open(exported());
    std::vector<OwnedTensor> tensors;
    for (const std::string& t : checkpoint.tensor_names()) {
      const io::TensorView view = checkpoint.view(t);
      tensors.push_back(
          {t, view.info->dtype, view.info->shape, {view.bytes.begin(), view.bytes.end()}});
    }
    if (edit_tensors) edit_tensors(tensors);
    io::SafetensorsWriter writer(out / "model.safetensors");
    for (const OwnedTensor& t : tensors) writer.add(t.name, t.dtype, t.shape, t.bytes);
    writer.commit();
    if (edit_config) {
      json config = json::parse(read_text_file(out / "config.json"));
      edit_config(config["quantization_config"]);
      write_text_file_atomic(out / "config.json", config.dump(2));
    }
    return out;
  }

  // The error message of opening a checkpoint, or "" when it opens.
  static std::string open_error(const fs::path& dir) {
    try {
      CompressedTensorsCheckpoint::open(dir);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  }

  static OwnedTensor& find(std::vector<OwnedTensor>& tensors, const std::string& name) {
    for (OwnedTensor& t : tensors) {
      if (t.name == name) return t;
    }
    throw std::runtime_error("test: no tensor " + name);
  }

  static json& group_targeting(json& qc, const std::string& module) {
    for (auto& [key, group] : qc["config_groups"].items()) {
      for (const json& target : group["targets"]) {
        if (target == module) return group;
      }
    }
    throw std::runtime_error("test: no group targets " + module);
  }

  static inline std::unique_ptr<test::TempDir> dir_;
  static inline std::unique_ptr<alloc::AssignmentFile> assignment_;
};

const std::string kQ0 = "model.layers.0.self_attn.q_proj";
const std::string kK0 = "model.layers.0.self_attn.k_proj";
const std::string kV0 = "model.layers.0.self_attn.v_proj";
const std::string kO0 = "model.layers.0.self_attn.o_proj";
const std::string kGate0 = "model.layers.0.mlp.gate_proj";

TEST_F(ExportedCheckpoint, DecodesBitForBitWhatTheFormatsLibraryPredicts) {
  EXPECT_EQ(CompressedTensorsCheckpoint::open(exported()).format(), "mixed-precision");
  // Every scheme of the cycle but BF16 (which is ignored, not a scheme).
  expect_decodes_like_formats_library(exported(), source_dir(), *assignment_, kCycle.size() - 1);
}

TEST(MoeExport, DecodesExpertsWithPerExpertGlobalScales) {
  PQ_REQUIRE_SHARED();
  const fs::path model_dir = test::shared_dir() / "models" / "qwen3-moe-tiny";
  const test::TempDir dir;
  const std::vector<std::string> cycle = {"NVFP4", "NVFP4A16", "MXFP4A16", "INT4_W4A16"};
  const alloc::AssignmentFile assignment =
      export_cycle(model_dir, cycle, dir.path(), dir / "exported");
  const CompressedTensorsCheckpoint ct = CompressedTensorsCheckpoint::open(dir / "exported");
  // Routers stay unquantized (vLLM builds them without a quant_config).
  EXPECT_EQ(ct.scheme_of("model.layers.0.mlp.gate"), nullptr);
  expect_decodes_like_formats_library(dir / "exported", model_dir, assignment, cycle.size());
}

// The exporter never writes weight-only FP8 experts: an assignment that gives them FP8_E4M3A16 is
// refused in one line naming the expert and the target, before the output exists.
TEST(MoeExport, NeverWritesExpertsVllmCannotLoad) {
  PQ_REQUIRE_SHARED();
  const fs::path model_dir = test::shared_dir() / "models" / "qwen3-moe-tiny";
  const test::TempDir dir;
  try {
    export_cycle(model_dir, {"FP8_E4M3A16"}, dir.path(), dir / "exported");
    FAIL() << "FP8_E4M3A16 experts were exported";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("model.layers.0.mlp.experts."), std::string::npos) << message;
    EXPECT_NE(message.find("which vLLM on blackwell does not load for moe_experts layers"),
              std::string::npos)
        << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  }
  EXPECT_FALSE(fs::exists(dir / "exported"));
}

// A hand-made MoE checkpoint whose experts hold FP8 weights with 16-bit activations (an FP8 W8A8
// export with input_activations removed from its config group): vLLM's FusedMoE refuses that
// scheme, so the reader does, naming the expert. The unedited export opens.
TEST(MoeExport, RefusesWeightOnlyFp8Experts) {
  PQ_REQUIRE_SHARED();
  const fs::path model_dir = test::shared_dir() / "models" / "qwen3-moe-tiny";
  const test::TempDir dir;
  export_cycle(model_dir, {"FP8_E4M3"}, dir.path(), dir / "exported");
  EXPECT_NO_THROW(CompressedTensorsCheckpoint::open(dir / "exported"));
  json config = json::parse(read_text_file(dir / "exported" / "config.json"));
  for (auto& [key, group] : config["quantization_config"]["config_groups"].items()) {
    group.erase("input_activations");
  }
  write_text_file_atomic(dir / "exported" / "config.json", config.dump(2));
  try {
    CompressedTensorsCheckpoint::open(dir / "exported");
    FAIL() << "weight-only FP8 experts were accepted";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("MoE expert model.layers.0.mlp.experts."), std::string::npos) << message;
    EXPECT_NE(message.find("FusedMoE does not load"), std::string::npos) << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  }
}

// Qwen3.5-MoE: body experts exported one tensor set per expert, the MTP layer quantized like the
// body, A_log and the gated norm in F32. The reader resolves and decodes every Linear; scoring
// tokenizes held-out text, and the tiny checkpoint has no tokenizer: one line says so.
TEST(Qwen3_5MoeExport, ReadsBackEveryLinearAndNamesTheMissingTokenizer) {
  PQ_REQUIRE_SHARED();
  const fs::path model_dir = test::shared_dir() / "models" / "qwen3_5-moe-tiny-random";
  const test::TempDir dir;
  const std::vector<std::string> cycle = {"NVFP4", "NVFP4A16", "FP8_E4M3", "MXFP4A16", "BF16"};
  const alloc::AssignmentFile assignment =
      export_cycle(model_dir, cycle, dir.path(), dir / "exported");
  const CompressedTensorsCheckpoint ct = CompressedTensorsCheckpoint::open(dir / "exported");
  EXPECT_EQ(ct.scheme_of("model.language_model.layers.0.mlp.gate"), nullptr);
  EXPECT_EQ(ct.scheme_of("model.visual.blocks.0.attn.qkv"), nullptr);
  EXPECT_NE(ct.scheme_of("mtp.fc"), nullptr);
  for (const model::Linear& linear : ct.spec().linears) EXPECT_FALSE(linear.slice) << linear.name;
  expect_decodes_like_formats_library(dir / "exported", model_dir, assignment, cycle.size() - 1);
  ValidateJob job;
  job.checkpoint = dir / "exported";
  job.reference = model_dir;
  job.data = test::shared_dir() / "data" / "wikitext-2-test.txt";
  try {
    run_validate(job);
    ADD_FAILURE() << "scored held-out text without a tokenizer";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("no tokenizer.json"), std::string::npos) << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  }
}

TEST_F(ExportedCheckpoint, QuantizesActivationsOfTheW8A8AndW4A4Schemes) {
  const CompressedTensorsCheckpoint ct = CompressedTensorsCheckpoint::open(exported());
  const CheckpointActivationQuantizer quantizer(ct, formats::ServingTarget::kBlackwell);
  EXPECT_TRUE(quantizer.applies_to(kQ0));     // NVFP4
  EXPECT_FALSE(quantizer.applies_to(kO0));    // NVFP4A16
  EXPECT_TRUE(quantizer.applies_to(kGate0));  // MXFP8
  // NVFP4 with input_global_scale g = 448*6/6 = 448: q/k/v were given amax 4, 5 and 6, and
  // fused siblings share the largest. Per 16 values the scale is E4M3(g * amax / 6) and the step
  // that scale / g.
  const io::Checkpoint& tensors = ct.tensors();
  float global = 0.0f;
  std::memcpy(&global, tensors.view(kQ0 + ".input_global_scale").bytes.data(), 4);
  EXPECT_EQ(global, 448.0f);
  std::vector<float> x(256, 0.0f);
  x[0] = 1.0f;    // group 0: E4M3(448 / 6 = 74.67) = 72 (step 8 in [64, 128)); 1 / (72/448)
                  // = 6.22 -> code 6
  x[17] = -0.3f;  // group 1: E4M3(448 * 0.3 / 6 = 22.4) = 22; -0.3 / (22/448) = -6.11 -> -6
  quantizer.quantize(kQ0, 1, 256, x);
  EXPECT_EQ(x[0], 6.0f * (72.0f / 448.0f));
  EXPECT_EQ(x[1], 0.0f);
  EXPECT_EQ(x[17], -6.0f * (22.0f / 448.0f));
  // Exactly the Linears whose assigned format quantizes activations, per the formats library,
  // and on Blackwell also the weight-only MX ones, which vLLM runs W4A4 / W8A8 there.
  std::size_t w_and_a = 0, mx_weight_only = 0;
  for (const alloc::AssignedLinear& a : assignment_->linears) {
    w_and_a += formats::format_by_name(a.format).quantizes_activations() ? 1 : 0;
    mx_weight_only += a.format == "MXFP4A16" || a.format == "MXFP8A16" ? 1 : 0;
  }
  EXPECT_GT(w_and_a, 0u);
  EXPECT_GT(mx_weight_only, 0u);
  EXPECT_EQ(quantizer.size(), w_and_a + mx_weight_only);
}

TEST_F(ExportedCheckpoint, RunValidateMeasuresTheDecodedModel) {
  const ValidateJob job = validate_exported(8);
  const ValidateReport report = run_validate(job);
  EXPECT_EQ(report.windows, 3);
  EXPECT_EQ(report.predictions, 3 * 63);
  EXPECT_TRUE(std::isfinite(report.mean_kl));
  EXPECT_GT(report.mean_kl, 0.0);
  EXPECT_GT(report.top1_agreement, 0.0);
  EXPECT_LE(report.top1_agreement, 1.0);
  EXPECT_TRUE(std::isfinite(report.perplexity));
  EXPECT_GT(report.reference_perplexity, 1.0);
  EXPECT_FALSE(report.sample.empty());
  EXPECT_FALSE(report.reference_sample.empty());
  EXPECT_GT(report.activation_quantized_linears, 0);
  // Units run q/k/v, o, gate/up, down per layer; NVFP4 and NVFP4A16 fall on units 0, 13, 26 and
  // 1, 14, 27: L0 q/k/v (3), L0 o (1), L3 o (1), L3 gate/up (2), L6 gate/up (2), L6 down (1).
  EXPECT_EQ(report.linears_by_format.at("nvfp4-pack-quantized"), 10);
  // An impossible gate fails with its reason; the measurement stays the same.
  EXPECT_TRUE(gate_failures(report, {.max_kl = 0.0, .min_top1 = 0.0, .max_ppl_ratio = 1e9})
                  .front()
                  .starts_with("mean KL"));
  EXPECT_EQ(report.failures, gate_failures(report, job.gates));
  // The held-out windows are the tail of the token stream, as the pipeline holds them out.
  const auto tokenizer = tokenizer::Tokenizer::load(exported() / "tokenizer.json");
  const auto dataset = data::TokenDataset::from_text_file(data(), tokenizer);
  const auto windows = heldout_windows(dataset, 64, 3);
  ASSERT_EQ(windows.size(), 3u);
  EXPECT_TRUE(std::equal(windows[0].begin(), windows[0].end(), dataset.heldout_tokens().begin()));
}

TEST_F(ExportedCheckpoint, ReproducesThePreExportMeasurementExactly) {
  // The quantize pipeline measures an assignment before export by fake-quantizing the source
  // (exporter::LinearEncoder, the formats library). The checkpoint decoded here, independently,
  // must give the same logits, hence the same KL, perplexity and top-1, bit for bit, on every
  // serving target it was exported for: both sides quantize the activations of exactly the
  // Linears vLLM runs with quantized activations there, and NVFP4 follows Marlin's scale rule
  // where Marlin serves it.
  const model::ModelSpec spec = model::load_model_spec(source_dir());
  const io::Checkpoint source = io::Checkpoint::open(source_dir());
  const exporter::NearestRounding rounding;
  std::map<std::string, std::string> format_of;
  for (const alloc::AssignedLinear& a : assignment_->linears) format_of[a.name] = a.format;
  const runtime::CheckpointWeightSource source_weights(source);
  runtime::Model reference_model(model::ModelConfig::load(source_dir()), source_weights,
                                 {.keep_layers_resident = true});
  const runtime::ReferenceLogits reference(
      reference_model, runtime::ReferenceLogits::Keep::kLogits,
      pipeline::heldout_windows(source_dir(), data(), false, 3, 64), runtime::kEvalWindowsPerPass);
  std::map<formats::ServingTarget, double> kl;
  for (const formats::ServingTarget target : formats::all_serving_targets()) {
    const std::string name(formats::serving_target_name(target));
    const exporter::LinearEncoder encoder(spec, source, rounding, input_amax(spec), target);
    const exporter::MeasuredQuality measured = pipeline::measure_assignment(
        model::ModelConfig::load(source_dir()), source, encoder, format_of, reference);
    const fs::path exported_for = *dir_ / ("exported-" + name);
    export_cycle(source_dir(), kCycle, *dir_ / ("work-" + name), exported_for, target);
    ValidateJob job = validate_exported(1);
    job.checkpoint = exported_for;
    job.serve_on = target;
    const ValidateReport report = run_validate(job);
    EXPECT_EQ(report.serve_on, name);
    EXPECT_EQ(report.predictions, measured.predictions) << name;
    EXPECT_EQ(report.mean_kl, measured.mean_kl) << name;
    EXPECT_EQ(report.perplexity, measured.perplexity) << name;
    EXPECT_EQ(report.reference_perplexity, measured.source_perplexity) << name;
    EXPECT_EQ(report.top1_agreement, measured.top1_agreement) << name;
    // Exactly the Linears whose serving cell quantizes activations.
    std::int64_t quantized = 0;
    for (const alloc::AssignedLinear& a : assignment_->linears) {
      const formats::WeightFormat& format = formats::format_by_name(a.format);
      if (!format.exportable() || a.format == "BF16") continue;
      quantized +=
          formats::serving_behaviour(format, spec.find_linear(a.name)->layer_kind(), target)
                      .activations == formats::ActivationPath::kQuantized
              ? 1
              : 0;
    }
    EXPECT_EQ(report.activation_quantized_linears, quantized) << name;
    kl[target] = report.mean_kl;
  }
  // Ampere runs every scheme of the cycle weight-only (Marlin): its KL is that of the decoded
  // weights with 16-bit activations. Blackwell quantizes the FP4, MX and FP8 activations.
  const CompressedTensorsCheckpoint ct =
      CompressedTensorsCheckpoint::open(*dir_ / "exported-ampere");
  const DecodedCheckpointWeightSource decoded(ct);
  runtime::Model weight_only(ct.config(), decoded, {});
  EXPECT_EQ(runtime::evaluate(weight_only, reference).mean_kl(),
            kl.at(formats::ServingTarget::kAmpere));
  EXPECT_NE(kl.at(formats::ServingTarget::kBlackwell), kl.at(formats::ServingTarget::kAmpere));
  std::printf(
      "held-out KL of the format cycle: blackwell %.6f, hopper %.6f, ada %.6f, ampere "
      "%.6f\n",
      kl.at(formats::ServingTarget::kBlackwell), kl.at(formats::ServingTarget::kHopper),
      kl.at(formats::ServingTarget::kAda), kl.at(formats::ServingTarget::kAmpere));
}

// A model over the resident budget streams its layers and samples teacher-forced: the
// held-out measurement is unchanged, and the sample is the arg-max at each of sample_tokens
// positions after the prompt, for both models.
TEST_F(ExportedCheckpoint, StreamedValidateSamplesTeacherForced) {
  const ValidateReport resident = run_validate(validate_exported(8));
  EXPECT_EQ(resident.sample_mode, "greedy");
  ValidateJob job = validate_exported(8);
  job.resident_f32_bytes = 0;
  const ValidateReport streamed = run_validate(job);
  EXPECT_EQ(streamed.sample_mode, "teacher-forced");
  EXPECT_EQ(streamed.mean_kl, resident.mean_kl);
  EXPECT_EQ(streamed.perplexity, resident.perplexity);
  EXPECT_EQ(streamed.reference_perplexity, resident.reference_perplexity);
  EXPECT_EQ(streamed.top1_agreement, resident.top1_agreement);
  EXPECT_EQ(streamed.prompt, resident.prompt);
  EXPECT_FALSE(streamed.sample.empty());
  EXPECT_FALSE(streamed.reference_sample.empty());
}

// With a work directory, each held-out pass keeps its layer boundaries there while it runs
// (runtime::ForwardCheckpoint, whose resume tests/runtime covers) and the report is the same; a
// foreign pass state found there is ignored, the passes' directories are removed at the end, and
// files of the caller's in the directory are left alone.
TEST_F(ExportedCheckpoint, ValidateWithAWorkDirectoryMeasuresTheSame) {
  const ValidateReport plain = run_validate(validate_exported(8));
  ValidateJob job = validate_exported(8);
  job.work = *dir_ / "validate-work";
  fs::create_directories(job.work / "checkpoint");
  write_text_file_atomic(job.work / "checkpoint" / "state.json",
                         R"({"fingerprint": "another pass", "steps_done": 2})");
  write_text_file_atomic(job.work / "checkpoint" / "x.2.f32", "not a boundary");
  write_text_file_atomic(job.work / "notes.txt", "the caller's");
  const ValidateReport resumable = run_validate(job);
  EXPECT_EQ(resumable.mean_kl, plain.mean_kl);
  EXPECT_EQ(resumable.perplexity, plain.perplexity);
  EXPECT_EQ(resumable.reference_perplexity, plain.reference_perplexity);
  EXPECT_EQ(resumable.top1_agreement, plain.top1_agreement);
  EXPECT_EQ(resumable.sample, plain.sample);
  EXPECT_FALSE(fs::exists(job.work / "reference"));
  EXPECT_FALSE(fs::exists(job.work / "checkpoint"));
  EXPECT_TRUE(fs::exists(job.work / "notes.txt"));
  fs::remove(job.work / "notes.txt");
  run_validate(job);
  EXPECT_FALSE(fs::exists(job.work));
}

TEST_F(ExportedCheckpoint, RegexAndClassTargetsResolveLikeCompressedTensors) {
  // q/k/v by one regex; o_proj of layer 0 additionally under a group targeting "Linear": the
  // exact name is more specific, so it keeps its own group.
  const fs::path dir = variant("regex", nullptr, [](json& qc) {
    json& qkv = group_targeting(qc, kQ0);
    json targets = json::array({"re:model\\.layers\\.0\\.self_attn\\.[qkv]_proj"});
    for (const json& t : qkv["targets"]) {
      if (!t.get<std::string>().starts_with("model.layers.0.self_attn.")) targets.push_back(t);
    }
    qkv["targets"] = targets;
    group_targeting(qc, kGate0)["targets"].push_back("Linear");
  });
  const CompressedTensorsCheckpoint ct = CompressedTensorsCheckpoint::open(dir);
  const CompressedTensorsCheckpoint original = CompressedTensorsCheckpoint::open(exported());
  for (const model::Linear& linear : ct.spec().linears) {
    const Scheme* a = ct.scheme_of(linear.name);
    const Scheme* b = original.scheme_of(linear.name);
    ASSERT_EQ(a == nullptr, b == nullptr) << linear.name;
    if (a != nullptr) {
      EXPECT_EQ(a->group, b->group) << linear.name;
    }
  }
}

TEST_F(ExportedCheckpoint, RefusesAMissingScaleTensor) {
  const fs::path dir = variant("missing", [](std::vector<OwnedTensor>& tensors) {
    std::erase_if(tensors, [](const OwnedTensor& t) { return t.name == kQ0 + ".weight_scale"; });
  });
  EXPECT_NE(open_error(dir).find("missing tensor " + kQ0 + ".weight_scale"), std::string::npos)
      << open_error(dir);
}

TEST_F(ExportedCheckpoint, RefusesAMissingInputGlobalScale) {
  const fs::path dir = variant("missing_input", [](std::vector<OwnedTensor>& tensors) {
    std::erase_if(tensors,
                  [](const OwnedTensor& t) { return t.name == kK0 + ".input_global_scale"; });
  });
  EXPECT_NE(open_error(dir).find("missing tensor " + kK0 + ".input_global_scale"),
            std::string::npos)
      << open_error(dir);
}

TEST_F(ExportedCheckpoint, RefusesAWrongDtype) {
  const fs::path dir = variant("dtype", [](std::vector<OwnedTensor>& tensors) {
    find(tensors, kGate0 + ".weight_scale").dtype = io::DType::I8;  // MXFP8: U8 E8M0
  });
  EXPECT_NE(open_error(dir).find(kGate0 + ".weight_scale has dtype I8, expected U8"),
            std::string::npos)
      << open_error(dir);
}

TEST_F(ExportedCheckpoint, RefusesAWrongShape) {
  const fs::path dir = variant("shape", [](std::vector<OwnedTensor>& tensors) {
    OwnedTensor& scale = find(tensors, kO0 + ".weight_scale");  // NVFP4A16 [256, 16]
    scale.shape = {16, 256};
  });
  EXPECT_NE(open_error(dir).find(kO0 + ".weight_scale has shape [16, 256], expected [256, 16]"),
            std::string::npos)
      << open_error(dir);
}

TEST_F(ExportedCheckpoint, RefusesALeftoverWeightBesideQuantizedTensors) {
  const fs::path dir = variant("leftover", [](std::vector<OwnedTensor>& tensors) {
    tensors.push_back({kO0 + ".weight",
                       io::DType::BF16,
                       {256, 256},
                       std::vector<std::uint8_t>(256 * 256 * 2, 0)});
  });
  EXPECT_NE(open_error(dir).find("unexpected tensor " + kO0 + ".weight"), std::string::npos)
      << open_error(dir);
}

TEST_F(ExportedCheckpoint, RefusesAModuleCoveredTwice) {
  const fs::path dir = variant(
      "twice", nullptr, [](json& qc) { group_targeting(qc, kGate0)["targets"].push_back(kO0); });
  const std::string error = open_error(dir);
  EXPECT_NE(error.find("Linear " + kO0 + " is targeted by config groups"), std::string::npos)
      << error;
}

TEST_F(ExportedCheckpoint, RefusesAnUncoveredModule) {
  const fs::path dir = variant("uncovered", nullptr, [](json& qc) {
    json& group = group_targeting(qc, kO0);
    json targets = json::array();
    for (const json& t : group["targets"]) {
      if (t != kO0) targets.push_back(t);
    }
    group["targets"] = targets;
  });
  EXPECT_NE(open_error(dir).find("Linear " + kO0 +
                                 " is neither targeted by a config group nor "
                                 "ignored"),
            std::string::npos)
      << open_error(dir);
}

TEST_F(ExportedCheckpoint, RefusesSiblingsWithDifferentGlobalScales) {
  const fs::path dir = variant("global", [](std::vector<OwnedTensor>& tensors) {
    OwnedTensor& scale = find(tensors, kV0 + ".weight_global_scale");
    float value = 0.0f;
    std::memcpy(&value, scale.bytes.data(), 4);
    value *= 2.0f;
    std::memcpy(scale.bytes.data(), &value, 4);
  });
  EXPECT_NE(open_error(dir).find(kV0 + ".weight_global_scale"), std::string::npos)
      << open_error(dir);
  EXPECT_NE(open_error(dir).find("vLLM fuses them"), std::string::npos) << open_error(dir);
}

TEST_F(ExportedCheckpoint, RefusesSubnormalNvfp4ScalesWhereMarlinServesThem) {
  // The error of validate on `target`, or "" when the scale check passes.
  const auto marlin_error = [](const fs::path& dir, formats::ServingTarget target) {
    try {
      check_marlin_group_scales(CompressedTensorsCheckpoint::open(dir), target);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  // The Blackwell export has none (the tiny model's groups are all within E4M3's normal range).
  for (const formats::ServingTarget target : formats::all_serving_targets()) {
    EXPECT_EQ(marlin_error(exported(), target), "");
  }
  // q_proj (NVFP4, W4A4) with one subnormal group scale: CUTLASS on Blackwell decodes it,
  // Marlin on Hopper reads it as about zero.
  const auto subnormal = [](const std::string& module) {
    return [module](std::vector<OwnedTensor>& tensors) {
      find(tensors, module + ".weight_scale").bytes[5] = 0x03;
    };
  };
  const fs::path w4a4 = variant("subnormal-w4a4", subnormal(kQ0));
  EXPECT_EQ(marlin_error(w4a4, formats::ServingTarget::kBlackwell), "");
  const std::string hopper = marlin_error(w4a4, formats::ServingTarget::kHopper);
  EXPECT_NE(hopper.find(kQ0 + ": NVFP4 group scale [0, 5] is the E4M3 subnormal 0.005859375"),
            std::string::npos)
      << hopper;
  EXPECT_NE(hopper.find("Marlin kernel on hopper"), std::string::npos) << hopper;
  // o_proj (NVFP4A16) runs through Marlin on every target, Blackwell included.
  const fs::path a16 = variant("subnormal-a16", subnormal(kO0));
  EXPECT_NE(marlin_error(a16, formats::ServingTarget::kBlackwell).find(kO0), std::string::npos);
  // run_validate refuses before it loads a model.
  ValidateJob job = validate_exported(1);
  job.checkpoint = w4a4;
  job.serve_on = formats::ServingTarget::kHopper;
  EXPECT_THROW(run_validate(job), Error);
}

TEST_F(ExportedCheckpoint, RefusesSiblingsWithDifferentSchemes) {
  // v_proj moved to ignore (with a BF16 weight): q/k/v no longer share one scheme.
  const fs::path dir = variant(
      "scheme",
      [](std::vector<OwnedTensor>& tensors) {
        std::erase_if(tensors, [](const OwnedTensor& t) { return t.name.starts_with(kV0 + "."); });
        tensors.push_back({kV0 + ".weight",
                           io::DType::BF16,
                           {128, 256},
                           std::vector<std::uint8_t>(128 * 256 * 2, 0)});
      },
      [](json& qc) { qc["ignore"].push_back(kV0); });
  EXPECT_NE(
      open_error(dir).find("fused siblings " + kQ0 + " and " + kV0 + " have different schemes"),
      std::string::npos)
      << open_error(dir);
}

TEST_F(ExportedCheckpoint, RefusesAnotherQuantMethod) {
  const fs::path dir = variant("method", nullptr, [](json& qc) { qc["quant_method"] = "gptq"; });
  EXPECT_NE(open_error(dir).find("not compressed-tensors"), std::string::npos) << open_error(dir);
}

TEST_F(ExportedCheckpoint, RefusesMalformedConfigsWithOneLine) {
  const std::vector<std::pair<std::function<void(json&)>, std::string>> cases = {
      {[](json& qc) { qc["format"] = 5; }, "quantization_config.format is not a string"},
      {[](json& qc) { group_targeting(qc, kO0)["weights"] = nullptr; }, "no weights quantization"},
      {[](json& qc) { group_targeting(qc, kO0)["weights"]["num_bits"] = "four"; },
       "malformed QuantizationArgs"},
      {[](json& qc) { group_targeting(qc, kO0)["weights"]["strategy"] = "diagonal"; },
       "strategy \"diagonal\""},
      {[](json& qc) { qc["ignore"].push_back("re:(unclosed"); }, "does not compile"},
  };
  for (std::size_t i = 0; i < cases.size(); ++i) {
    const fs::path dir = variant("malformed" + std::to_string(i), nullptr, cases[i].first);
    const std::string error = open_error(dir);
    EXPECT_NE(error.find("config.json"), std::string::npos) << error;
    EXPECT_NE(error.find(cases[i].second), std::string::npos) << error;
    EXPECT_EQ(error.find('\n'), std::string::npos) << error;
  }
}

// `prismaquant validate` as a user runs it; returns the exit status.
int run_cli(const std::string& args, const fs::path& log) {
  const std::string command =
      fmt::format("'{}' validate {} >'{}' 2>&1", PQ_PRISMAQUANT_BIN, args, log.string());
  const int status = std::system(command.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST_F(ExportedCheckpoint, CliFailsAnImpossibleGateAndPassesLenientOnes) {
  const std::string common =
      fmt::format("'{}' --reference '{}' --data '{}' --seqlen 32 --max-seqs 1", exported().string(),
                  source_dir().string(), data().string());
  const fs::path json_path = *dir_ / "report.json";
  EXPECT_EQ(run_cli(common + " --max-kl 0 --json '" + json_path.string() + "'", *dir_ / "a.log"),
            1);
  const std::string failed = read_text_file(*dir_ / "a.log");
  EXPECT_NE(failed.find("prismaquant: error: validation failed: mean KL"), std::string::npos)
      << failed;
  const json report = json::parse(read_text_file(json_path));
  EXPECT_EQ(report.at("passed"), false);
  EXPECT_GT(report.at("mean_kl_nats").get<double>(), 0.0);

  EXPECT_EQ(run_cli(common + " --max-kl 100 --min-top1 0 --max-ppl-ratio 100 --prompt 'The'",
                    *dir_ / "b.log"),
            0)
      << read_text_file(*dir_ / "b.log");
  EXPECT_NE(read_text_file(*dir_ / "b.log").find("validation passed"), std::string::npos);
}

}  // namespace
}  // namespace pq::validate
