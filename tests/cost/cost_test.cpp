#include <fmt/format.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <nlohmann/json.hpp>
#include <random>

#include "alloc/cost_table.h"
#include "common/error.h"
#include "common/file_util.h"
#include "cost/cost_stage.h"
#include "export/gptq.h"
#include "export/linear_encoder.h"
#include "formats/serving.h"
#include "formats/weight_format.h"
#include "io/safetensors.h"
#include "io/safetensors_writer.h"
#include "model/model_spec.h"
#include "probe/probe_stage.h"
#include "probe/wikitext_excerpt.h"
#include "support/test_support.h"

namespace pq::cost {
namespace {

// Probes model_dir into dir/probe on nsamples x seqlen tokens of the WikiText excerpt, two
// sequences per micro-batch; without the Fisher traces unless `fisher`.
probe::ProbeJob probe_excerpt(const test::TempDir& dir, const std::filesystem::path& model_dir,
                              std::size_t nsamples, std::size_t seqlen, bool fisher = true,
                              bool hessians = true, const std::string& out = "probe") {
  probe::ProbeJob job;
  job.model = model_dir;
  job.data = test::wikitext_excerpt(dir);
  job.out = dir / out;
  job.nsamples = nsamples;
  job.seqlen = seqlen;
  job.batch_size = 2;
  job.fisher = fisher;
  job.hessians = hessians;
  EXPECT_TRUE(probe::run_probe(job).complete);
  return job;
}

// The render caches below `a` and `b`, one fingerprint directory each, hold the same files with
// the same tensors byte for byte (their metadata aside); returns how many render files.
std::size_t expect_same_rendered_tensors(const std::filesystem::path& a,
                                         const std::filesystem::path& b) {
  const auto only_directory = [](const std::filesystem::path& root) {
    return std::filesystem::directory_iterator(root)->path();
  };
  const std::filesystem::path mine_dir = only_directory(a);
  const std::filesystem::path theirs_dir = only_directory(b);
  std::size_t files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(mine_dir)) {
    if (entry.path().extension() != ".safetensors") continue;
    ++files;
    const io::SafetensorsFile mine(entry.path());
    const io::SafetensorsFile theirs(theirs_dir / entry.path().filename());
    EXPECT_EQ(mine.tensors().size(), theirs.tensors().size()) << entry.path().filename();
    for (const io::TensorInfo& info : mine.tensors()) {
      const auto x = mine.view(info.name).bytes;
      const auto y = theirs.view(info.name).bytes;
      EXPECT_TRUE(std::equal(x.begin(), x.end(), y.begin(), y.end()))
          << entry.path().filename() << " " << info.name;
    }
  }
  return files;
}

// A kl-fisher cost job of model_dir over `probe_job`'s probe and calibration sample, writing
// to `out`, measuring `renders`.
CostJob kl_fisher_cost_job(const probe::ProbeJob& probe_job, const std::filesystem::path& out,
                           std::vector<std::string> formats, const RenderSource& renders) {
  CostJob job;
  job.model = probe_job.model;
  job.probe = probe_job.out;
  job.out = out;
  job.formats = std::move(formats);
  job.objective = Objective::kKlFisher;
  job.renders = &renders;
  job.spec_options = probe_job.spec_options;
  job.kl_fisher = kl_fisher_job_on(probe_job);
  return job;
}

// Every column against a direct computation from the activations themselves: the output error
// as the mean of (X dW^T)^2 over tokens and output channels, which the stage gets from the
// Hessian alone.
TEST(MeasureErrors, MatchesDirectComputation) {
  const formats::Shape2D shape{24, 48};
  const std::int64_t tokens = 70;
  std::mt19937 rng(17);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> w(shape.numel()), x(tokens * shape.in);
  for (float& v : w) v = 0.05f * normal(rng);
  // Channels of different scales, so the activation weighting matters.
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t j = 0; j < shape.in; ++j) x[t * shape.in + j] = normal(rng) * (1 + j % 5);
  }
  std::vector<float> hessian(shape.in * shape.in, 0.0f), moment(shape.in, 0.0f);
  for (std::int64_t a = 0; a < shape.in; ++a) {
    for (std::int64_t b = 0; b < shape.in; ++b) {
      double sum = 0.0;
      for (std::int64_t t = 0; t < tokens; ++t) {
        sum += static_cast<double>(x[t * shape.in + a]) * x[t * shape.in + b];
      }
      hessian[a * shape.in + b] = static_cast<float>(sum);
    }
    moment[a] = hessian[a * shape.in + a] / tokens;
  }
  const auto& format = formats::format_by_name("NVFP4A16");
  std::vector<float> q(w.size());
  format.fake_quantize(w, shape, q);

  const LinearStatistics stats{2.5, moment, hessian, tokens};
  const QuantizationErrors e = measure_errors(w, q, shape, stats);

  double squares = 0.0, weighted = 0.0, energy = 0.0, output = 0.0;
  for (const float m : moment) energy += m;
  for (std::int64_t i = 0; i < shape.out; ++i) {
    for (std::int64_t j = 0; j < shape.in; ++j) {
      const double d = static_cast<double>(q[i * shape.in + j]) - w[i * shape.in + j];
      squares += d * d;
      weighted += d * d * moment[j];
    }
  }
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t i = 0; i < shape.out; ++i) {
      double y = 0.0;
      for (std::int64_t j = 0; j < shape.in; ++j) {
        y += (static_cast<double>(q[i * shape.in + j]) - w[i * shape.in + j]) * x[t * shape.in + j];
      }
      output += y * y;
    }
  }
  const double mse = squares / static_cast<double>(shape.numel());
  ASSERT_GT(mse, 0.0);
  EXPECT_NEAR(e.weight_mse, mse, 1e-9 * mse);
  EXPECT_NEAR(e.act_weighted_mse, weighted / shape.out, 1e-6 * weighted / shape.out);
  const double output_mse = output / static_cast<double>(tokens * shape.out);
  EXPECT_NEAR(e.output_mse, output_mse, 1e-4 * output_mse);
  EXPECT_NEAR(e.dloss_fisher, 0.5 * 2.5 * mse, 1e-9 * mse);
  const double activation = 0.5 * 2.5 * weighted / (shape.out * energy);
  EXPECT_NEAR(e.dloss_activation, activation, 1e-6 * activation);
  // Large-scale channels weigh more: the activation-aware column differs from the uniform one.
  EXPECT_GT(std::abs(e.dloss_activation - e.dloss_fisher), 1e-3 * e.dloss_fisher);
}

// The cost stage on a real checkpoint: every column equals what the formats library's
// fake_quantize gives (NVFP4 q/k/v quantized against their shared max-amax global scale), bytes
// equal WeightFormat::bytes, BF16 of a BF16 checkpoint costs nothing, and the passthrough covers
// every other tensor. A second run reuses cost.json.
TEST(CostStage, ColumnsComeFromTheRealCodec) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  const auto model_dir = test::shared_dir() / "models/qwen3-dense-tiny";
  probe_excerpt(dir, model_dir, 2, 64);

  CostJob job;
  job.model = model_dir;
  job.probe = dir / "probe";
  job.out = dir / "cost";
  job.formats = {"NVFP4", "MXFP8_E4M3", "BF16"};
  const CostOutcome outcome = run_cost(job);
  EXPECT_FALSE(outcome.reused);
  const alloc::CostTable table = alloc::read_cost_table(dir / "cost");
  ASSERT_EQ(table.linears.size(), 56u);
  EXPECT_EQ(table.model, "qwen3-dense-tiny");

  const probe::ProbeResult probed = probe::ProbeResult::read(dir / "probe");
  const io::Checkpoint checkpoint = io::Checkpoint::open(model_dir);
  std::uint64_t linear_params = 0;
  for (const auto& l : table.linears) linear_params += l.params;
  std::uint64_t all_params = 0;
  for (const auto& name : checkpoint.tensor_names()) all_params += checkpoint.info(name).numel();
  EXPECT_EQ(table.passthrough_params + linear_params, all_params);

  // A q/k/v member whose own amax is below the group's.
  std::map<std::string, float> amax;
  float group_amax = 0.0f;
  for (const char* proj : {"q_proj", "k_proj", "v_proj"}) {
    const std::string member = fmt::format("model.layers.2.self_attn.{}", proj);
    for (const float v : checkpoint.to_f32(member + ".weight")) {
      amax[member] = std::max(amax[member], std::abs(v));
    }
    group_amax = std::max(group_amax, amax[member]);
  }
  std::string name;
  for (const auto& [member, value] : amax) {
    if (value < group_amax) name = member;
  }
  ASSERT_FALSE(name.empty());
  const auto row = std::find_if(table.linears.begin(), table.linears.end(),
                                [&](const alloc::LinearCost& l) { return l.name == name; });
  ASSERT_NE(row, table.linears.end());
  EXPECT_EQ(row->group, "model.layers.2.self_attn.qkv_proj");
  const std::vector<float> w = checkpoint.to_f32(name + ".weight");
  const formats::Shape2D shape{row->shape[0], row->shape[1]};
  const probe::ProbedLinear& stats = probed.linear(name);
  const LinearStatistics linear_stats{stats.fisher_trace, probed.act_second_moment(stats.input_key),
                                      probed.hessian(stats.input_key),
                                      probed.input_tokens(stats.input_key)};
  for (std::size_t f = 0; f < table.formats.size(); ++f) {
    const auto& format = formats::format_by_name(table.formats[f]);
    formats::QuantizeOptions options;
    if (table.formats[f] == "NVFP4") {
      options.weight_global_scale = formats::nvfp4_global_scale(group_amax);
      options.input_global_scale = formats::nvfp4_global_scale(probed.input_amax(stats.input_key));
    }
    std::vector<float> q(w.size());
    format.fake_quantize(w, shape, q, options);
    const QuantizationErrors e = measure_errors(w, q, shape, linear_stats);
    ASSERT_TRUE(row->costs[f].has_value()) << table.formats[f];
    const alloc::FormatCost& cost = *row->costs[f];
    EXPECT_EQ(cost.bytes, format.bytes(shape));
    EXPECT_DOUBLE_EQ(cost.predicted_dloss, e.dloss_fisher) << table.formats[f];
    EXPECT_DOUBLE_EQ(*cost.weight_mse, e.weight_mse) << table.formats[f];
    EXPECT_DOUBLE_EQ(*cost.act_weighted_mse, e.act_weighted_mse) << table.formats[f];
    // tr(dW H dW^T) is a GEMM: inside the stage's parallel loop it runs on one thread, here on
    // all, and OpenBLAS (the GEMM on CPUs without AVX-512) splits the sums differently by thread
    // count, so the two agree to float32 GEMM rounding (about 1e-8 relative seen) rather than to
    // the last bit.
    EXPECT_NEAR(*cost.output_mse, e.output_mse, 1e-6 * e.output_mse) << table.formats[f];
    if (table.formats[f] == "BF16") {
      EXPECT_EQ(e.weight_mse, 0.0);
    }
    if (table.formats[f] == "NVFP4") {
      // Its own amax is below the group's: its own global scale gives another error.
      std::vector<float> own(w.size());
      formats::QuantizeOptions own_scale;
      own_scale.input_global_scale = options.input_global_scale;
      format.fake_quantize(w, shape, own, own_scale);
      EXPECT_NE(measure_errors(w, own, shape, linear_stats).weight_mse, e.weight_mse);
    }
  }
  EXPECT_TRUE(run_cost(job).reused);
  job.formats = {"NVFP4", "BF16"};
  EXPECT_FALSE(run_cost(job).reused);
}

// --objective kl-fisher: predicted_dloss is the KL-Fisher estimate of the exporter's renders, and
// the other columns measure those renders too (GPTQ here, not round to nearest); nothing costs
// for BF16, every quantized format costs something, and the renders are stored for export. The
// probe ran without the Fisher traces, as quantize runs it before this cost; the Fisher
// objectives refuse such a probe.
TEST(CostStage, KlFisherObjectiveMeasuresTheExportersRenders) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  const auto model_dir = test::shared_dir() / "models/qwen3-dense-tiny";
  const probe::ProbeJob probe_job = probe_excerpt(dir, model_dir, 2, 64, /*fisher=*/false);
  const probe::ProbeResult probed = probe::ProbeResult::read(dir / "probe");
  const model::ModelSpec spec = model::load_model_spec(model_dir);
  const io::Checkpoint checkpoint = io::Checkpoint::open(model_dir);
  const auto rounding = exporter::make_rounding("gptq", &probed);
  const exporter::LinearEncoder encoder(spec, checkpoint, *rounding,
                                        exporter::input_amax_from_probe(spec, probed),
                                        formats::ServingTarget::kBlackwell, dir / "render");
  const exporter::EncoderRenders renders(encoder);

  CostJob job = kl_fisher_cost_job(probe_job, dir / "cost", {"NVFP4", "MXFP8", "BF16"}, renders);
  job.kl_fisher->probes = 2;
  run_cost(job);
  const alloc::CostTable table = alloc::read_cost_table(dir / "cost");
  ASSERT_EQ(table.linears.size(), 56u);
  EXPECT_FALSE(std::filesystem::exists(dir / "cost" / "kl-pass"));
  EXPECT_GT(encoder.render_cache()->stores(), 0);
  std::size_t mxfp8_below_nvfp4 = 0;
  for (const alloc::LinearCost& row : table.linears) {
    EXPECT_EQ(row.costs[2]->predicted_dloss, 0.0) << row.name;
    EXPECT_GT(row.costs[0]->predicted_dloss, 0.0) << row.name;
    EXPECT_GT(row.costs[1]->predicted_dloss, 0.0) << row.name;
    if (row.costs[1]->predicted_dloss < row.costs[0]->predicted_dloss) ++mxfp8_below_nvfp4;
  }
  // 8-bit weights and activations change the output less than 4-bit ones nearly everywhere.
  EXPECT_GE(mxfp8_below_nvfp4, 50u);
  // The weight error column is the GPTQ render's, not round to nearest's.
  const auto row = std::find_if(table.linears.begin(), table.linears.end(), [](const auto& l) {
    return l.name == "model.layers.3.mlp.up_proj";
  });
  ASSERT_NE(row, table.linears.end());
  const auto index = static_cast<std::size_t>(
      std::find_if(spec.linears.begin(), spec.linears.end(),
                   [](const auto& l) { return l.name == "model.layers.3.mlp.up_proj"; }) -
      spec.linears.begin());
  const std::vector<float> w = model::read_source_weight(checkpoint, spec.linears[index]);
  const std::vector<float> gptq =
      renders.render(index, formats::format_by_name("NVFP4"), nullptr).weight;
  double squares = 0.0;
  for (std::size_t i = 0; i < w.size(); ++i) {
    const float d = gptq[i] - w[i];  // as measure_errors forms it
    squares += static_cast<double>(d) * d;
  }
  EXPECT_DOUBLE_EQ(*row->costs[0]->weight_mse, squares / static_cast<double>(w.size()));
  // The objective and the renders are part of the fingerprint.
  EXPECT_TRUE(run_cost(job).reused);
  job.kl_fisher->probes = 3;
  EXPECT_FALSE(run_cost(job).reused);
  for (const Objective objective : {Objective::kFisher, Objective::kActivationFisher}) {
    job.objective = objective;
    EXPECT_THAT([&] { run_cost(job); },
                testing::ThrowsMessage<Error>(testing::HasSubstr("ran with --no-fisher")));
  }
}

// The kl-fisher cost of a probe that stored no Hessians (probe --no-hessians, as quantize runs
// it) accumulates each layer's Hessians in its own forward over the probe's calibration sample
// and renders from them: the same renders, byte for byte, and the same cost table as from the
// probe's Hessians, on a dense model and on a MoE. Without the Hessians and without a render,
// GPTQ says what to run; the Hessian objectives and another calibration sample are refused.
TEST(CostStage, KlFisherRendersFromItsOwnHessiansWhereTheProbeStoredNone) {
  PQ_REQUIRE_SHARED();
  // The hybrid MoE with its MTP head and lm_head as candidates: their Linears are rendered from
  // a forward of the head at the head step.
  for (const char* model : {"qwen3-dense-tiny", "qwen3-moe-tiny", "qwen3_5-moe-tiny-random"}) {
    test::TempDir dir;
    const auto model_dir = test::shared_dir() / "models" / model;
    const bool hybrid = std::string(model) == "qwen3_5-moe-tiny-random";
    model::SpecOptions options;
    options.quantize_lm_head = hybrid;
    const model::ModelSpec spec = model::load_model_spec(model_dir, options);
    const io::Checkpoint checkpoint = io::Checkpoint::open(model_dir);
    std::map<bool, alloc::CostTable> tables;
    for (const bool hessians : {true, false}) {
      const std::string name = hessians ? "with" : "without";
      probe::ProbeJob probe_job;
      if (hybrid) {
        // No tokenizer: token ids.
        std::string ids;
        for (int i = 0; i < 512; ++i) ids += std::to_string((i * 37 + 11) % 256) + ' ';
        write_text_file_atomic(dir / "ids.txt", ids);
        probe_job.model = model_dir;
        probe_job.data = dir / "ids.txt";
        probe_job.token_ids = true;
        probe_job.out = dir / name / "probe";
        probe_job.nsamples = 2;
        probe_job.seqlen = 32;
        probe_job.fisher = false;
        probe_job.hessians = hessians;
        probe_job.spec_options = options;
        ASSERT_TRUE(probe::run_probe(probe_job).complete);
      } else {
        probe_job =
            probe_excerpt(dir, model_dir, 2, 64, /*fisher=*/false, hessians, name + "/probe");
      }
      const probe::ProbeResult probed = probe::ProbeResult::read(probe_job.out);
      const auto rounding = exporter::make_rounding("gptq", &probed);
      const exporter::LinearEncoder encoder(
          spec, checkpoint, *rounding, exporter::input_amax_from_probe(spec, probed),
          formats::ServingTarget::kBlackwell, dir / name / "render");
      const exporter::EncoderRenders renders(encoder);
      if (!hessians) {
        EXPECT_THAT([&] { encoder.encode(0, formats::format_by_name("NVFP4")); },
                    testing::ThrowsMessage<Error>(testing::HasSubstr("did not store")));
      }
      CostJob job = kl_fisher_cost_job(probe_job, dir / name / "cost",
                                       {"NVFP4", "FP8_E4M3", "BF16"}, renders);
      tables[hessians] = run_cost(job).table;
      if (!hessians) {
        job.kl_fisher->nsamples = 3;
        EXPECT_THAT([&] { run_cost(job); },
                    testing::ThrowsMessage<Error>(
                        testing::HasSubstr("measures them on the probe's calibration sample")));
      }
    }
    ASSERT_EQ(tables[true].linears.size(), tables[false].linears.size());
    for (std::size_t r = 0; r < tables[true].linears.size(); ++r) {
      const alloc::LinearCost& a = tables[true].linears[r];
      const alloc::LinearCost& b = tables[false].linears[r];
      ASSERT_EQ(a.name, b.name);
      for (std::size_t f = 0; f < a.costs.size(); ++f) {
        ASSERT_EQ(a.costs[f].has_value(), b.costs[f].has_value()) << a.name;
        if (!a.costs[f]) continue;
        EXPECT_EQ(a.costs[f]->predicted_dloss, b.costs[f]->predicted_dloss) << a.name << " " << f;
        EXPECT_EQ(a.costs[f]->weight_mse, b.costs[f]->weight_mse) << a.name << " " << f;
        EXPECT_EQ(a.costs[f]->act_weighted_mse, b.costs[f]->act_weighted_mse) << a.name;
        EXPECT_EQ(a.costs[f]->output_mse, b.costs[f]->output_mse) << a.name << " " << f;
      }
    }
    // One fingerprint directory each (the probes' fingerprints differ), the same tensors in it.
    const std::size_t renders =
        expect_same_rendered_tensors(dir / "with/render", dir / "without/render");
    EXPECT_GT(renders, 0u) << model;
  }
  test::TempDir dir;
  const auto model_dir = test::shared_dir() / "models/qwen3-dense-tiny";
  probe_excerpt(dir, model_dir, 1, 16, /*fisher=*/true, /*hessians=*/false);
  CostJob job;
  job.model = model_dir;
  job.probe = dir / "probe";
  job.out = dir / "cost";
  job.formats = {"NVFP4", "BF16"};
  EXPECT_THAT([&] { run_cost(job); },
              testing::ThrowsMessage<Error>(testing::HasSubstr("ran with --no-hessians")));
}

// A MoE layer's experts render in parallel in the KL-Fisher pass: with one thread and with four,
// the same rendered tensors byte for byte and a rounding report for every render. (The GEMMs of
// the pass and of the output errors split their sums by thread count, so the cost table and the
// errors recorded with each render may differ in their last bits: those are not compared.)
TEST(CostStage, KlFisherRendersExpertsInParallelAsOneThreadWould) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  const auto model_dir = test::shared_dir() / "models/qwen3-moe-tiny";
  const model::ModelSpec spec = model::load_model_spec(model_dir);
  const io::Checkpoint checkpoint = io::Checkpoint::open(model_dir);
  const probe::ProbeJob probe_job =
      probe_excerpt(dir, model_dir, 2, 64, /*fisher=*/false, /*hessians=*/false);
  const probe::ProbeResult probed = probe::ProbeResult::read(probe_job.out);
  const int saved = omp_get_max_threads();
  std::map<int, std::size_t> reports;
  for (const int threads : {1, 4}) {
    omp_set_num_threads(threads);
    const std::string name = fmt::format("threads-{}", threads);
    const auto rounding = exporter::make_rounding("gptq", &probed);
    const exporter::LinearEncoder encoder(
        spec, checkpoint, *rounding, exporter::input_amax_from_probe(spec, probed),
        formats::ServingTarget::kBlackwell, dir / name / "render");
    const exporter::EncoderRenders renders(encoder);
    run_cost(
        kl_fisher_cost_job(probe_job, dir / name / "cost", {"NVFP4", "FP8_E4M3", "BF16"}, renders));
    reports[threads] = dynamic_cast<const exporter::GptqRounding&>(*rounding).reports().size();
  }
  omp_set_num_threads(saved);
  std::size_t experts = 0;
  for (const model::Linear& linear : spec.linears) experts += linear.expert ? 1 : 0;
  EXPECT_GT(reports[1], experts);
  EXPECT_EQ(reports[4], reports[1]);
  const std::size_t files =
      expect_same_rendered_tensors(dir / "threads-1/render", dir / "threads-4/render");
  EXPECT_GT(files, experts);
}

// Without calibration data or renders the objective is refused in one line.
TEST(CostStage, KlFisherObjectiveNeedsDataAndRenders) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  const auto model_dir = test::shared_dir() / "models/qwen3-dense-tiny";
  probe_excerpt(dir, model_dir, 1, 16);
  CostJob job;
  job.model = model_dir;
  job.probe = dir / "probe";
  job.out = dir / "cost";
  job.formats = {"NVFP4", "BF16"};
  job.objective = Objective::kKlFisher;
  EXPECT_THAT([&] { run_cost(job); },
              testing::ThrowsMessage<Error>(testing::HasSubstr("kl-fisher needs calibration")));
}

// A probe of another checkpoint can name the same Linears with other widths (here layer 0's
// q/k/v input cut to 128 of its 256 features, probe.json agreeing, so the probe itself is
// consistent): the stage once read the Hessian [128, 128] as [256, 256], past its end.
// With every exportable format on the menu, each Linear of the MoE model is offered exactly the
// formats its shape admits that vLLM loads for its layer kind on the target: routed experts never
// FP8_E4M3A16 (FusedMoE refuses weight-only FP8), dense Linears still do; the target is recorded.
TEST(CostStage, OffersOnlyWhatVllmLoadsOnTheTarget) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  const auto model_dir = test::shared_dir() / "models/qwen3-moe-tiny";
  probe_excerpt(dir, model_dir, 2, 32);
  std::vector<std::string> menu;
  for (const formats::WeightFormat* format : formats::all_formats()) {
    if (format->exportable()) menu.emplace_back(format->name());
  }
  const model::ModelSpec spec = model::load_model_spec(model_dir);
  for (const formats::ServingTarget target : formats::all_serving_targets()) {
    const std::string name(formats::serving_target_name(target));
    CostJob job;
    job.model = model_dir;
    job.probe = dir / "probe";
    job.out = dir / ("cost-" + name);
    job.formats = menu;
    job.serve_on = target;
    const alloc::CostTable table = run_cost(job).table;
    EXPECT_EQ(nlohmann::json::parse(read_text_file(job.out / "cost.json"))["meta"]["serve_on"],
              name);
    std::size_t experts = 0;
    for (const alloc::LinearCost& row : table.linears) {
      const model::Linear& linear = *spec.find_linear(row.name);
      experts += linear.expert ? 1 : 0;
      for (std::size_t f = 0; f < menu.size(); ++f) {
        const formats::WeightFormat& format = formats::format_by_name(menu[f]);
        // FP8_SOURCE only where the source stores FP8 (this checkpoint is BF16: nowhere).
        const bool offered = format.accepts({linear.out_features, linear.in_features}) &&
                             linear.allows(menu[f]) &&
                             formats::serves(format, linear.layer_kind(), target);
        EXPECT_EQ(row.costs[f].has_value(), offered) << name << " " << row.name << " " << menu[f];
        if (menu[f] == "FP8_E4M3A16") {
          EXPECT_EQ(offered, !linear.expert) << row.name;
        }
        if (menu[f] == "FP8_SOURCE") {
          EXPECT_FALSE(offered) << row.name;
        }
      }
    }
    EXPECT_GT(experts, 0u);
  }
}

TEST(CostStage, RefusesAProbeMeasuredAtOtherWidths) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  const auto model_dir = test::shared_dir() / "models/qwen3-dense-tiny";
  probe_excerpt(dir, model_dir, 2, 64);

  const std::string key = "model.layers.0.self_attn.qkv_proj";
  const std::int64_t width = 128;
  const auto part = dir / "probe" / "probe.layer-0000.safetensors";
  {
    const io::SafetensorsFile file(part);
    io::SafetensorsWriter writer(part);
    for (const io::TensorInfo& info : file.tensors()) {
      const auto bytes = file.view(info.name).bytes;
      if (info.name == "hessian." + key) {
        writer.add(info.name, info.dtype, std::vector<std::int64_t>{width, width},
                   bytes.first(width * width * sizeof(float)));
      } else if (info.name == "act_second_moment." + key) {
        writer.add(info.name, info.dtype, std::vector<std::int64_t>{width},
                   bytes.first(width * sizeof(float)));
      } else {
        writer.add(info.name, info.dtype, info.shape, bytes);
      }
    }
    writer.commit();
  }
  const auto probe_json = dir / "probe" / "probe.json";
  nlohmann::json doc = nlohmann::json::parse(read_text_file(probe_json));
  for (auto& linear : doc["linears"]) {
    if (linear["input_key"] == key) linear["shape"][1] = width;
  }
  write_text_file_atomic(probe_json, doc.dump());
  ASSERT_EQ(probe::ProbeResult::read(dir / "probe").hessian(key).size(), 128u * 128u);

  CostJob job;
  job.model = model_dir;
  job.probe = dir / "probe";
  job.out = dir / "cost";
  job.formats = {"NVFP4"};
  EXPECT_THAT([&] { run_cost(job); },
              ::testing::ThrowsMessage<Error>(::testing::HasSubstr(
                  "the probe measured input model.layers.0.self_attn.qkv_proj with 128 features, "
                  "but " +
                  model_dir.string() + " takes 256 (a probe of another model?)")));
}

}  // namespace
}  // namespace pq::cost
