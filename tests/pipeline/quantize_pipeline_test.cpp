#include "pipeline/quantize_pipeline.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/file_util.h"
#include "export/gptq.h"
#include "export/linear_encoder.h"
#include "pipeline/uniform_baseline.h"
#include "probe/wikitext_excerpt.h"
#include "support/test_support.h"
#include "validate/ct_checkpoint.h"
#include "validate/ct_decode.h"

namespace pq::pipeline {
namespace {

class QuantizePipeline : public ::testing::TestWithParam<std::string> {};

// quantize of a shared model into dir/out on a small calibration (4 x 128 tokens of the WikiText
// excerpt) and held-out set (2 x 128), at the default 4.75 bits.
QuantizeJob small_job(const test::TempDir& dir, const std::string& model) {
  QuantizeJob job;
  job.model = test::shared_dir() / "models" / model;
  job.data = test::wikitext_excerpt(dir);
  job.out = dir / "out";
  job.nsamples = 4;
  job.seqlen = 128;
  job.eval_windows = 2;
  job.eval_seqlen = 128;
  return job;
}

// probe -> cost -> allocate on a real checkpoint with a small calibration (4 x 128 tokens of
// wikitext): the assignment reaches 4.75 bits per quantizable parameter within 0.05 by exact
// bytes, every sibling group has one format, pareto.svg names every target, and a second run
// reuses the probe and cost artifacts.
TEST_P(QuantizePipeline, EndToEndAtFourPointSevenFiveBits) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  QuantizeJob job = small_job(dir, GetParam());
  const QuantizeOutcome outcome = run_quantize(job);
  ASSERT_EQ(outcome.stages.size(),
            7u);  // probe, cost, allocate, measure, uniform, export, validate
  EXPECT_FALSE(outcome.stages[0].reused);
  EXPECT_FALSE(outcome.stages[1].reused);

  const std::string assignment_text = read_text_file(dir / "out.work/alloc/assignment.json");
  const auto assignment = nlohmann::json::parse(assignment_text);
  const double bits = assignment.at("totals").at("bits_per_quantizable_param").get<double>();
  EXPECT_GE(bits, 4.70);
  EXPECT_LE(bits, 4.75);
  std::uint64_t bytes = 0, params = 0;
  std::map<std::string, std::string> group_format;
  for (const auto& linear : assignment.at("linears")) {
    bytes += linear.at("bytes").get<std::uint64_t>();
    params += linear.at("params").get<std::uint64_t>();
    const std::string group = linear.at("group").get<std::string>();
    if (group.empty()) continue;
    const std::string format = linear.at("format").get<std::string>();
    const auto [it, inserted] = group_format.emplace(group, format);
    EXPECT_EQ(it->second, format) << group;
  }
  EXPECT_FALSE(group_format.empty());
  EXPECT_LE(8.0 * static_cast<double>(bytes), 4.75 * static_cast<double>(params));
  EXPECT_GE(8.0 * static_cast<double>(bytes), 4.70 * static_cast<double>(params));

  // The SVG's table has one row per target, headed by the target (and the knee's mark).
  const std::string svg = read_text_file(dir / "out.work/alloc/pareto.svg");
  const std::size_t table = svg.find("target bits");
  ASSERT_NE(table, std::string::npos);
  for (const std::string target : {"4", "4.25", "4.5", "4.75", "5", "5.5", "6", "7", "8"}) {
    const bool plain = svg.find(">" + target + "</text>", table) != std::string::npos;
    const bool knee = svg.find(">" + target + " (knee)</text>", table) != std::string::npos;
    EXPECT_TRUE(plain || knee) << target;
  }
  EXPECT_TRUE(std::filesystem::exists(dir / "out.work/probe/probe.json"));
  EXPECT_TRUE(std::filesystem::exists(dir / "out.work/cost/cost.json"));
  // The held-out passes' layer boundaries are gone once validate is done.
  EXPECT_FALSE(std::filesystem::exists(dir / "out.work/measure"));
  EXPECT_FALSE(std::filesystem::exists(dir / "out.work/validate"));

  // The measured held-out quality of the exported weights is in the model card.
  const exporter::MeasuredQuality& measured = outcome.measured;
  EXPECT_EQ(measured.windows, 2);
  EXPECT_EQ(measured.predictions, 2 * 127);
  EXPECT_GT(measured.mean_kl, 0.0);
  EXPECT_LT(measured.mean_kl, 1.0);
  EXPECT_GT(measured.top1_agreement, 0.5);
  EXPECT_TRUE(std::filesystem::exists(dir / "out/config.json"));
  const std::string card = read_text_file(dir / "out/README.md");
  EXPECT_NE(card.find(fmt::format("{:.6f}", measured.mean_kl)), std::string::npos) << card;
  EXPECT_NE(card.find("Pareto"), std::string::npos);
  // Measured against uniform NVFP4 at no more bytes, which it does not lose to; the card shows
  // both.
  ASSERT_TRUE(outcome.uniform.has_value());
  EXPECT_EQ(outcome.uniform->format, "NVFP4");
  EXPECT_LE(outcome.uniform->bytes, outcome.uniform->shipped_bytes);
  EXPECT_EQ(outcome.uniform->shipped_bytes, assignment.at("totals").at("quantizable_bytes"));
  ASSERT_TRUE(outcome.uniform->quality.has_value());
  EXPECT_LE(measured.mean_kl, outcome.uniform->quality->mean_kl);
  EXPECT_LE(perplexity_z_score(measured, *outcome.uniform->quality), kPerplexityZLimit);
  std::printf("%s: KL %.6f (uniform %.6f), perplexity %.4f (uniform %.4f, source %.4f)\n",
              GetParam().c_str(), measured.mean_kl, outcome.uniform->quality->mean_kl,
              measured.perplexity, outcome.uniform->quality->perplexity,
              measured.source_perplexity);
  EXPECT_NE(card.find("Against uniform NVFP4"), std::string::npos) << card;
  EXPECT_NE(card.find(fmt::format("{:.6f}", outcome.uniform->quality->mean_kl)), std::string::npos)
      << card;
  // validate reloads the written checkpoint with its own decoder and measures the same figures
  // as the pre-export measurement, bit for bit.
  const validate::ValidateReport& validated = outcome.validated;
  EXPECT_TRUE(validated.passed());
  EXPECT_EQ(validated.predictions, measured.predictions);
  EXPECT_EQ(validated.mean_kl, measured.mean_kl);
  EXPECT_EQ(validated.perplexity, measured.perplexity);
  EXPECT_EQ(validated.top1_agreement, measured.top1_agreement);
  // The weights decoded from the files (validate's decoder, independent of the exporter) are
  // bit for bit the weights the pipeline evaluated: the GPTQ encodings the cost rendered into
  // WORK/render from the Hessians of its own pass (the probe stored none), decoded in memory.
  {
    const model::ModelSpec spec = model::load_model_spec(job.model);
    const io::Checkpoint source = io::Checkpoint::open(job.model);
    const probe::ProbeResult probe = probe::ProbeResult::read(dir / "out.work/probe");
    EXPECT_FALSE(probe.has_hessians());
    const auto rounding = exporter::make_rounding("gptq", &probe);
    const exporter::LinearEncoder encoder(
        spec, source, *rounding, exporter::input_amax_from_probe(spec, probe),
        formats::ServingTarget::kBlackwell, dir / "out.work/render");
    std::map<std::string, std::string> format_of;
    for (const auto& linear : assignment.at("linears")) {
      format_of[linear.at("name").get<std::string>()] = linear.at("format").get<std::string>();
    }
    const exporter::QuantizedLinears evaluated = exporter::quantize_linears(encoder, format_of);
    const auto written = validate::CompressedTensorsCheckpoint::open(dir / "out");
    for (const auto& [name, format] : format_of) {
      if (format == "BF16") continue;
      const std::vector<float> decoded = validate::decode_module(written, name);
      const std::span<const float> expected = evaluated.weight(name);
      ASSERT_EQ(decoded.size(), expected.size()) << name;
      EXPECT_EQ(0, std::memcmp(decoded.data(), expected.data(), decoded.size() * sizeof(float)))
          << name << " (" << format << ")";
    }
  }
  // Bits charged == bytes on disk: the allocator's whole-checkpoint charge is the tensor data
  // written.
  EXPECT_EQ(outcome.exported.tensor_bytes,
            assignment.at("totals").at("checkpoint_bytes").get<std::uint64_t>());

  const std::string rounding_json = read_text_file(dir / "out.work/rounding.json");
  EXPECT_EQ(nlohmann::json::parse(rounding_json).at("linears").size(),
            assignment.at("linears").size());

  EXPECT_THROW(run_quantize(job), Error);  // out exists
  job.force = true;
  const QuantizeOutcome again = run_quantize(job);
  EXPECT_TRUE(again.stages[0].reused);
  EXPECT_TRUE(again.stages[1].reused);
  EXPECT_EQ(read_text_file(dir / "out.work/alloc/assignment.json"), assignment_text);
  // The second run reads every render back from WORK/render (one fingerprint directory): the same
  // measurement and the same rounding report, restored from the cache.
  EXPECT_EQ(again.measured.mean_kl, measured.mean_kl);
  EXPECT_EQ(again.validated.mean_kl, measured.mean_kl);
  EXPECT_EQ(read_text_file(dir / "out.work/rounding.json"), rounding_json);
  std::size_t fingerprints = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir / "out.work/render")) {
    ++fingerprints;
    EXPECT_FALSE(std::filesystem::is_empty(entry.path()));
  }
  EXPECT_EQ(fingerprints, 1u);
}

// --select scout: the shipped assignment is scout's choice, and the KL scout measured for it is
// the KL measured before export and again by validate from the files, bit for bit.
TEST(QuantizePipelineScout, ShipsTheScoutChoiceWithTheKlScoutMeasured) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  QuantizeJob job = small_job(dir, "qwen3-dense-tiny");
  job.select = "scout";
  job.scout_budgets = {"4.75", "5.5"};
  const QuantizeOutcome outcome = run_quantize(job);
  ASSERT_TRUE(outcome.scout.has_value());
  const scout::Candidate& chosen = outcome.scout->candidates[outcome.scout->chosen];
  EXPECT_LE(chosen.bits, 4.75);
  EXPECT_EQ(chosen.measured.kl, outcome.measured.mean_kl);
  EXPECT_EQ(chosen.measured.kl, outcome.validated.mean_kl);
  EXPECT_EQ(chosen.measured.top1_agreement, outcome.validated.top1_agreement);
  const auto shipped =
      nlohmann::json::parse(read_text_file(dir / "out.work/scout/assignment.json"));
  EXPECT_EQ(outcome.exported.tensor_bytes,
            shipped.at("totals").at("checkpoint_bytes").get<std::uint64_t>());
}

// --objective kl-fisher end to end: every offered quantized (Linear, format) is one entry of
// WORK/render (the cost stage renders them all; measure, the uniform baseline and export find
// theirs there); validate reproduces the measurement; bits charged == bytes on disk.
TEST(QuantizePipelineKlFisher, RendersEveryOfferedFormatOnceAndShipsWhatItMeasured) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  QuantizeJob job = small_job(dir, "qwen3-moe-tiny");
  job.objective = cost::Objective::kKlFisher;
  job.kl_probes = 2;
  const QuantizeOutcome outcome = run_quantize(job);
  const auto cost = nlohmann::json::parse(read_text_file(dir / "out.work/cost/cost.json"));
  EXPECT_EQ(cost.at("meta").at("objective"), "kl-fisher");
  // Every offered quantized (Linear, format) of the cost table is one render on disk.
  std::size_t offered = 0;
  for (const auto& linear : cost.at("linears")) {
    for (const auto& [format, entry] : linear.at("costs").items()) offered += format != "BF16";
  }
  // Their tensors are the bytes the disk check counts for them (cost::render_bytes).
  std::size_t renders = 0;
  std::uint64_t render_tensor_bytes = 0;
  for (const auto& entry : std::filesystem::recursive_directory_iterator(dir / "out.work/render")) {
    if (!entry.is_regular_file()) continue;
    ++renders;
    const io::SafetensorsFile render(entry.path());
    for (const io::TensorInfo& info : render.tensors()) render_tensor_bytes += info.nbytes();
  }
  EXPECT_EQ(renders, offered);
  EXPECT_EQ(render_tensor_bytes,
            cost::render_bytes(model::load_model_spec(job.model), job.formats, job.serve_on));
  EXPECT_TRUE(outcome.validated.passed());
  EXPECT_EQ(outcome.validated.mean_kl, outcome.measured.mean_kl);
  const auto assignment =
      nlohmann::json::parse(read_text_file(dir / "out.work/alloc/assignment.json"));
  EXPECT_EQ(outcome.exported.tensor_bytes,
            assignment.at("totals").at("checkpoint_bytes").get<std::uint64_t>());
}

// --rounding gptq+local-hessian probes with held-out Hessians (the last of the 4 sequences) and
// chooses every rendered Linear's method on them: rounding.json shows each Linear's held-out rows
// and the held-out error of every render, the stored method is their minimum, and the shipped
// checkpoint validates as measured.
TEST(QuantizePipelineLocalHessian, ChoosesTheRenderOnTheProbesHeldOutRows) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  QuantizeJob job = small_job(dir, "qwen3-dense-tiny");
  job.objective = cost::Objective::kFisher;
  job.rounding = "gptq+local-hessian";
  const QuantizeOutcome outcome = run_quantize(job);
  const auto probe = nlohmann::json::parse(read_text_file(dir / "out.work/probe/probe.json"));
  EXPECT_EQ(probe.at("calibration").at("holdout_sequences"), 1);
  const auto rounding = nlohmann::json::parse(read_text_file(dir / "out.work/rounding.json"));
  std::size_t chosen = 0;
  for (const auto& linear : rounding.at("linears")) {
    if (!linear.contains("holdout_candidates")) {
      // FP8_E4M3 per channel and BF16 have no groups to render.
      EXPECT_EQ(linear.value("fallback", ""), "the format has no group layout") << linear;
      continue;
    }
    ++chosen;
    EXPECT_EQ(linear.at("holdout_tokens"), 128) << linear.at("linear");
    const auto& candidates = linear.at("holdout_candidates");
    EXPECT_TRUE(candidates.contains("nearest"));
    EXPECT_TRUE(candidates.contains("gptq+sweep"));
    std::string best = "nearest";
    for (const auto& [method, mse] : candidates.items()) {
      if (mse.get<double>() < candidates.at(best).get<double>()) best = method;
    }
    EXPECT_EQ(linear.at("method"), best) << linear.at("linear");
  }
  EXPECT_GT(chosen, rounding.at("linears").size() / 2);
  EXPECT_NE(outcome.rounding.find("held-out calibration rows"), std::string::npos)
      << outcome.rounding;
  EXPECT_TRUE(outcome.validated.passed());
  EXPECT_EQ(outcome.validated.mean_kl, outcome.measured.mean_kl);
}

INSTANTIATE_TEST_SUITE_P(SharedModels, QuantizePipeline,
                         ::testing::Values("qwen3-dense-tiny", "qwen3-moe-tiny"));

// Errors that can be known before the probe are reported before it: nothing is probed and no
// work directory is created (issue 13 found them after minutes of probing).
TEST(QuantizePipeline, RefusesWhatItCannotFinishBeforeProbing) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  const std::filesystem::path model = test::shared_dir() / "models" / "qwen3-dense-tiny";
  const auto error_of = [&](QuantizeJob job, const std::filesystem::path& source = {}) {
    job.model = source.empty() ? model : source;
    job.data = dir / "never-read.txt";
    try {
      run_quantize(job);
    } catch (const Error& error) {
      return std::string(error.what());
    }
    return std::string();
  };
  QuantizeJob research;
  research.out = dir / "out";
  research.formats = {"NVFP4", "MXFP6_E3M2", "BF16"};
  EXPECT_EQ(error_of(research),
            "quantize: format MXFP6_E3M2 has no compressed-tensors format (research only), so it "
            "cannot be exported; use it with the cost stage alone");
  QuantizeJob unknown;
  unknown.out = dir / "out";
  unknown.formats = {"NVFP5"};
  EXPECT_NE(error_of(unknown).find("NVFP5"), std::string::npos);
  QuantizeJob into_source;
  into_source.out = model / "quantized";
  EXPECT_NE(error_of(into_source).find("overlap; the source is never written to"),
            std::string::npos);
  QuantizeJob work_in_source;
  work_in_source.out = dir / "out";
  work_in_source.work = model;
  EXPECT_NE(error_of(work_in_source).find("work directory"), std::string::npos);
  EXPECT_FALSE(std::filesystem::exists(dir / "out.work"));
  EXPECT_FALSE(std::filesystem::exists(model / "probe"));
  EXPECT_FALSE(std::filesystem::exists(model / "quantized"));
}

TEST(QuantizePipeline, DefaultParetoTargetsIncludeTheTarget) {
  EXPECT_EQ(default_pareto_targets("4.75"), "4,4.25,4.5,4.75,5,5.5,6,7,8");
  EXPECT_EQ(default_pareto_targets("4.6"), "4,4.25,4.5,4.75,5,5.5,6,7,8,4.6");
}

}  // namespace
}  // namespace pq::pipeline
