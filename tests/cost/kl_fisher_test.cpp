#include "cost/kl_fisher.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <random>

#include "common/error.h"
#include "data/token_dataset.h"
#include "export/linear_encoder.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "model/model_spec.h"
#include "runtime/evaluate.h"
#include "runtime/model.h"
#include "runtime/weights.h"
#include "support/test_support.h"

namespace pq::cost {
namespace {

// The passes below fold perturbations they make themselves: nothing to render first.
const PreparePart kNothingToPrepare = [](std::int64_t, std::span<const std::size_t>,
                                         const probe::ProbeAccumulator*) {
  return nlohmann::json::object();
};

constexpr const char* kPerturbed = "model.layers.1.mlp.down_proj";

// The calibration sample of a KL-Fisher job on qwen3-dense-tiny, in fp32.
KlFisherJob tiny_job(const test::TempDir& tmp, std::size_t probes) {
  KlFisherJob job;
  job.model = test::shared_dir() / "models/qwen3-dense-tiny";
  job.data = test::shared_dir() / "data/wikitext-2-test.txt";
  job.nsamples = 4;
  job.seqlen = 64;
  job.probes = probes;
  job.compute = runtime::ComputeType::kF32;
  job.pass_dir = tmp / "kl-pass";
  job.perturbations_tag = "test";
  job.slots = 1;
  return job;
}

struct PerturbedLinear {
  std::size_t index = 0;
  std::vector<float> weight;  // source
  std::vector<float> delta;
};

// A Gaussian perturbation of kPerturbed, 0.2x the weight's rms per entry.
PerturbedLinear random_perturbation(const model::ModelSpec& spec,
                                    const io::Checkpoint& checkpoint) {
  PerturbedLinear p;
  while (spec.linears[p.index].name != kPerturbed) ++p.index;
  p.weight = model::read_source_weight(checkpoint, spec.linears[p.index]);
  double squares = 0.0;
  for (const float w : p.weight) squares += static_cast<double>(w) * w;
  const double rms = std::sqrt(squares / static_cast<double>(p.weight.size()));
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, static_cast<float>(0.2 * rms));
  p.delta.resize(p.weight.size());
  for (float& d : p.delta) d = normal(rng);
  return p;
}

// The source model and the model with `linear`'s weight W + scale * delta, and the job's
// calibration windows (positions restart at 0, as in the pass).
class PerturbedModels {
  // Declared first: the models read them until they are destroyed.
  io::Checkpoint checkpoint_;
  runtime::CheckpointWeightSource weights_;
  exporter::QuantizedLinears transform_;

 public:
  PerturbedModels(const KlFisherJob& job, const std::string& linear, const PerturbedLinear& p,
                  double scale)
      : checkpoint_(io::Checkpoint::open(job.model)),
        weights_(checkpoint_),
        config(model::ModelConfig::load(job.model)) {
    const data::TokenDataset dataset = data::load_token_dataset(
        job.data, job.token_ids, job.model, static_cast<std::int32_t>(config.vocab_size));
    windows = dataset.calibration(job.nsamples, job.seqlen, job.seed);
    std::vector<float> perturbed(p.weight);
    for (std::size_t i = 0; i < perturbed.size(); ++i) {
      perturbed[i] += static_cast<float>(scale) * p.delta[i];
    }
    transform_.set(linear, std::move(perturbed), nullptr);
    runtime::RuntimeOptions options;
    reference = std::make_unique<runtime::Model>(config, weights_, options);
    options.weight_transform = &transform_;
    model = std::make_unique<runtime::Model>(config, weights_, options);
  }

  const model::ModelConfig config;
  std::vector<std::vector<std::int32_t>> windows;
  std::unique_ptr<runtime::Model> reference, model;
};

// The mean KL per prediction of the model with kPerturbed's weight W + scale * delta against the
// source, on the job's calibration sequences.
double measured_kl(const KlFisherJob& job, const PerturbedLinear& p, double scale) {
  PerturbedModels models(job, kPerturbed, p, scale);
  return runtime::evaluate(*models.model, models.windows, models.reference.get()).mean_kl();
}

// Scales its input by 1 + c: an activation "quantizer" whose output error is linear in x, so a
// Linear under it with weight error dW acts as one with weight (1 + c)(W + dW) and none.
class ScaledActivations final : public formats::ActivationQuantizer {
 public:
  explicit ScaledActivations(float c) : c_(c) {}
  void fake_quantize(std::span<const float> x, std::int64_t, std::span<float> out) const override {
    for (std::size_t i = 0; i < x.size(); ++i) out[i] = x[i] + c_ * x[i];
  }

 private:
  float c_;
};

// The probes' estimate of 1/2 dW^T F dW against the second-order KL change measured by finite
// differences (Richardson: c = 2 KL(e/2) / (e/2)^2 - KL(e) / e^2 cancels the cubic term), for a
// random perturbation of one Linear; and the variance of a K-probe mean shrinking as 1/K.
TEST(KlFisher, EstimatesTheSecondOrderKlChangeWithVarianceShrinkingAsOneOverK) {
  if (!test::have_shared()) GTEST_SKIP() << "../shared is not available";
  const test::TempDir tmp;
  const std::size_t probes = 64;
  const KlFisherJob job = tiny_job(tmp, probes);
  const model::ModelSpec spec = model::load_model_spec(job.model);
  const io::Checkpoint checkpoint = io::Checkpoint::open(job.model);
  const PerturbedLinear p = random_perturbation(spec, checkpoint);
  const KlFisherResult result =
      run_kl_fisher(job, kNothingToPrepare, [&](std::span<const std::size_t> linears) {
        std::map<std::size_t, std::vector<std::optional<Perturbation>>> out;
        for (const std::size_t i : linears) {
          out[i].resize(1);
          if (i == p.index) out[i][0] = Perturbation{p.delta, nullptr, {}};
        }
        return out;
      });
  EXPECT_EQ(result.predictions, 4 * 63);
  EXPECT_FALSE(std::filesystem::exists(job.pass_dir));
  const double estimate = result.estimate(kPerturbed, 0).value();
  const double se = result.standard_error(kPerturbed, 0);

  const double e = 1.0;
  const double kl_full = measured_kl(job, p, e);
  const double kl_half = measured_kl(job, p, e / 2);
  const double second_order = 2.0 * kl_half / (e * e / 4) - kl_full / (e * e);
  std::printf(
      "KL-Fisher estimate %.6g (se %.3g, %zu probes), finite differences %.6g "
      "(KL(e) %.6g, KL(e/2) %.6g)\n",
      estimate, se, probes, second_order, kl_full, kl_half);
  // Stated tolerance: three standard errors of the 64-probe mean, which is itself within 15% of
  // the estimate (4 x 63 predictions x 64 probes).
  EXPECT_LT(se, 0.15 * estimate);
  EXPECT_NEAR(estimate, second_order, 3.0 * se)
      << "KL(e) " << kl_full << ", KL(e/2) " << kl_half << ", se " << se;
  // Another Linear's Fisher does not see this perturbation: its slot is not offered.
  EXPECT_FALSE(result.estimate("model.layers.0.mlp.down_proj", 0).has_value());

  // Each probe's value is an independent draw, so a mean of K of them is the K-probe estimate:
  // its variance across disjoint groups of K shrinks as 1/K.
  const std::vector<double>& values = result.per_probe.at(kPerturbed)[0];
  const auto variance_of_means = [&](std::size_t k) {
    std::vector<double> means;
    for (std::size_t g = 0; g + k <= values.size(); g += k) {
      double sum = 0.0;
      for (std::size_t i = g; i < g + k; ++i) sum += values[i];
      means.push_back(sum / static_cast<double>(k));
    }
    double mean = 0.0;
    for (const double m : means) mean += m;
    mean /= static_cast<double>(means.size());
    double squares = 0.0;
    for (const double m : means) squares += (m - mean) * (m - mean);
    return squares / static_cast<double>(means.size() - 1);
  };
  const double v1 = variance_of_means(1);
  for (const std::size_t k : {4u, 8u}) {
    const double ratio = v1 / variance_of_means(k);
    std::printf("variance of one probe / of a %zu-probe mean: %.3g\n", k, ratio);
    EXPECT_GT(ratio, k / 3.0) << "K = " << k;
    EXPECT_LT(ratio, k * 3.0) << "K = " << k;
  }
}

// The mean KL per MTP prediction (row t of a sequence against token t + 2; its last row predicts
// nothing) of the MTP head with `linear`'s weight W + scale * delta against the source's, on the
// job's calibration sequences. The body is unperturbed, so both heads read the same hidden states.
double measured_mtp_kl(const KlFisherJob& job, const std::string& linear, const PerturbedLinear& p,
                       double scale) {
  PerturbedModels models(job, linear, p, scale);
  const model::ModelConfig& config = models.config;
  runtime::Model& reference = *models.reference;
  runtime::Model& model = *models.model;
  std::vector<runtime::Sequence> sequences;
  for (auto& tokens : models.windows) sequences.push_back({std::move(tokens), {}});
  const auto pass = reference.begin_pass(sequences);
  const auto values = static_cast<std::size_t>(runtime::Model::rows(*pass) * config.hidden_size);
  std::vector<float> x(values), next(values);
  reference.embed(*pass, x.data());
  for (std::int64_t l = 0; l < config.num_hidden_layers; ++l) {
    reference.forward_layer(l, *pass, x.data(), next.data(), nullptr);
    x.swap(next);
  }
  const std::int64_t vocab = config.vocab_size;
  std::map<std::int64_t, std::vector<float>> source_logits;
  reference.mtp_forward(*pass, x.data(), [&](std::int64_t s, const float* logits, std::int64_t n) {
    source_logits[s].assign(logits, logits + n * vocab);
  });
  double kl = 0.0;
  std::int64_t predictions = 0;
  const auto log_softmax = [&](const float* z) {
    std::vector<double> out(z, z + vocab);
    const double peak = *std::max_element(out.begin(), out.end());
    double total = 0.0;
    for (const double v : out) total += std::exp(v - peak);
    for (double& v : out) v -= peak + std::log(total);
    return out;
  };
  model.mtp_forward(*pass, x.data(), [&](std::int64_t s, const float* logits, std::int64_t n) {
    for (std::int64_t t = 0; t + 1 < n; ++t) {
      const std::vector<double> teacher = log_softmax(source_logits.at(s).data() + t * vocab);
      const std::vector<double> student = log_softmax(logits + t * vocab);
      for (std::int64_t v = 0; v < vocab; ++v) {
        kl += std::exp(teacher[v]) * (teacher[v] - student[v]);
      }
      ++predictions;
    }
  });
  return kl / static_cast<double>(predictions);
}

// A multi-token-prediction head's Linear takes the Fisher of the MTP head's own KL: on
// qwen3_5-tiny-random (a Qwen3.5 layout with an MTP head), the probes' estimate for a random
// perturbation of mtp.layers.0.mlp.down_proj against the finite-difference second-order change
// of the measured MTP KL, within three standard errors; the body's Linears are estimated in the
// same pass, over next-token predictions.
TEST(KlFisher, MtpHeadLinearsTakeTheFisherOfTheMtpHeadsKl) {
  if (!test::have_shared()) GTEST_SKIP() << "../shared is not available";
  const test::TempDir tmp;
  const std::size_t probes = 48;
  KlFisherJob job = tiny_job(tmp, probes);
  job.model = test::shared_dir() / "models/qwen3_5-tiny-random";
  const model::ModelConfig config = model::ModelConfig::load(job.model);
  job.data = test::write_token_ids(tmp / "ids.txt", config.vocab_size, 4000, 5);
  job.token_ids = true;
  const std::string mtp_linear = "mtp.layers.0.mlp.down_proj";
  const std::string body_linear = "model.language_model.layers.3.mlp.down_proj";
  const model::ModelSpec spec = model::load_model_spec(job.model);
  const io::Checkpoint checkpoint = io::Checkpoint::open(job.model);
  std::map<std::string, PerturbedLinear> perturbed;
  for (const std::string& name : {mtp_linear, body_linear}) {
    PerturbedLinear& p = perturbed[name];
    const model::Linear* linear = spec.find_linear(name);
    ASSERT_NE(linear, nullptr) << name;
    p.index = static_cast<std::size_t>(linear - spec.linears.data());
    p.weight = model::read_source_weight(checkpoint, spec.linears[p.index]);
    double squares = 0.0;
    for (const float w : p.weight) squares += static_cast<double>(w) * w;
    std::mt19937 rng(7);
    std::normal_distribution<float> normal(
        0.0f, static_cast<float>(0.5 * std::sqrt(squares / static_cast<double>(p.weight.size()))));
    for (std::size_t i = 0; i < p.weight.size(); ++i) p.delta.push_back(normal(rng));
  }
  const KlFisherResult result =
      run_kl_fisher(job, kNothingToPrepare, [&](std::span<const std::size_t> linears) {
        std::map<std::size_t, std::vector<std::optional<Perturbation>>> out;
        for (const std::size_t i : linears) {
          out[i].resize(1);
          for (const auto& [name, p] : perturbed) {
            if (i == p.index) out[i][0] = Perturbation{p.delta, nullptr, {}};
          }
        }
        return out;
      });
  EXPECT_EQ(result.predictions, 4 * 63);
  EXPECT_EQ(result.mtp_predictions, 4 * 62);
  EXPECT_GT(result.estimate(body_linear, 0).value(), 0.0);
  const double estimate = result.estimate(mtp_linear, 0).value();
  const double se = result.standard_error(mtp_linear, 0);
  const PerturbedLinear& p = perturbed.at(mtp_linear);
  const double e = 1.0;
  const double kl_full = measured_mtp_kl(job, mtp_linear, p, e);
  const double kl_half = measured_mtp_kl(job, mtp_linear, p, e / 2);
  const double second_order = 2.0 * kl_half / (e * e / 4) - kl_full / (e * e);
  std::printf("MTP KL-Fisher estimate %.6g (se %.3g, %zu probes), finite differences %.6g\n",
              estimate, se, probes, second_order);
  EXPECT_LT(se, 0.2 * estimate);
  EXPECT_NEAR(estimate, second_order, 3.0 * se)
      << "KL(e) " << kl_full << ", KL(e/2) " << kl_half << ", se " << se;
}

// The activation path (output error Q(X) W_q^T - X W^T, folded as G_s . dW + dY_s^T dX_s . W_q)
// gives what the weight-only path (G_s . dW') gives for the weight error it amounts to: with
// Q(x) = (1 + c) x, dW' = (1 + c)(W + dW) - W; c = 0 is an activation quantizer that changes
// nothing.
TEST(KlFisher, ActivationPathEqualsTheWeightPathItAmountsTo) {
  if (!test::have_shared()) GTEST_SKIP() << "../shared is not available";
  const test::TempDir tmp;
  KlFisherJob job = tiny_job(tmp, 2);
  job.nsamples = 2;
  job.seqlen = 32;
  job.slots = 2;
  const model::ModelSpec spec = model::load_model_spec(job.model);
  const io::Checkpoint checkpoint = io::Checkpoint::open(job.model);
  const PerturbedLinear p = random_perturbation(spec, checkpoint);
  for (const float c : {0.0f, 0.02f}) {
    std::vector<float> equivalent(p.delta.size());
    for (std::size_t i = 0; i < equivalent.size(); ++i) {
      equivalent[i] = (1.0f + c) * (p.weight[i] + p.delta[i]) - p.weight[i];
    }
    const auto scaled = std::make_shared<ScaledActivations>(c);
    const KlFisherResult result =
        run_kl_fisher(job, kNothingToPrepare, [&](std::span<const std::size_t> linears) {
          std::map<std::size_t, std::vector<std::optional<Perturbation>>> out;
          for (const std::size_t i : linears) {
            if (i != p.index) continue;
            out[i].resize(2);
            out[i][0] = Perturbation{equivalent, nullptr, {}};
            out[i][1] = Perturbation{p.delta, scaled, p.weight};
          }
          return out;
        });
    const double weight_path = result.estimate(kPerturbed, 0).value();
    EXPECT_GT(weight_path, 0.0);
    EXPECT_NEAR(result.estimate(kPerturbed, 1).value(), weight_path, 2e-3 * weight_path)
        << "c = " << c;
  }
}

// Both forms of the fold (per-sequence weight gradients, or output errors over all rows) give
// the same sums for every Linear, a weight-only and an activation-quantized slot, on a dense and
// a MoE model (whose experts see a few rows of each sequence), in fp32 to float rounding; in
// bf16 (where only the weight-gradient form rounds its GEMM inputs) to 10% for a Linear (an
// expert's sum over a few rows rounded to bf16 cancels) and 1% over all; kAuto takes the output
// errors for these 64-token sequences and the weight gradients for long ones.
TEST(KlFisher, FoldFormsGiveTheSameSums) {
  if (!test::have_shared()) GTEST_SKIP() << "../shared is not available";
  EXPECT_FALSE(fold_by_weight_gradient(64, 0, 2));
  EXPECT_TRUE(fold_by_weight_gradient(1024, 0, 2));
  EXPECT_TRUE(fold_by_weight_gradient(1024, 3, 0));
  // One weight-only format: both forms make one GEMM, and the output errors no [out, in] product.
  EXPECT_FALSE(fold_by_weight_gradient(1024, 1, 0));
  EXPECT_FALSE(fold_by_weight_gradient(8, 1, 0));
  const test::TempDir tmp;
  const auto scaled = std::make_shared<ScaledActivations>(0.02f);
  for (const std::string model : {"qwen3-dense-tiny", "qwen3-moe-tiny"}) {
    for (const runtime::ComputeType compute :
         {runtime::ComputeType::kF32, runtime::ComputeType::kBF16}) {
      KlFisherJob job = tiny_job(tmp, 1);
      job.model = test::shared_dir() / "models" / model;
      job.nsamples = 2;
      job.compute = compute;
      job.slots = 2;
      const model::ModelSpec spec = model::load_model_spec(job.model);
      const io::Checkpoint checkpoint = io::Checkpoint::open(job.model);
      const PerturbationsOf perturbations = [&](std::span<const std::size_t> linears) {
        // The pass asks for one Linear's perturbations at a time, as the backward reaches it.
        EXPECT_EQ(linears.size(), 1u);
        std::map<std::size_t, std::vector<std::optional<Perturbation>>> out;
        for (const std::size_t i : linears) {
          const std::vector<float> weight = model::read_source_weight(checkpoint, spec.linears[i]);
          std::mt19937 rng(static_cast<std::uint32_t>(i));
          std::normal_distribution<float> normal(0.0f, 0.01f);
          std::vector<float> delta(weight.size());
          for (float& d : delta) d = normal(rng);
          out[i].resize(2);
          out[i][0] = Perturbation{delta, nullptr, {}};
          out[i][1] = Perturbation{delta, scaled, weight};
        }
        return out;
      };
      job.fold = FoldForm::kWeightGradient;
      const KlFisherResult by_gradient = run_kl_fisher(job, kNothingToPrepare, perturbations);
      job.fold = FoldForm::kOutputError;
      const KlFisherResult by_output = run_kl_fisher(job, kNothingToPrepare, perturbations);
      const bool f32 = compute == runtime::ComputeType::kF32;
      const double tolerance = f32 ? 1e-4 : 1e-1;
      double total_gradient = 0.0, total_output = 0.0;
      // Experts that no calibration token reached fold to 0 either way.
      std::size_t positive = 0;
      for (const auto& [name, slots] : by_output.per_probe) {
        for (std::size_t f = 0; f < 2; ++f) {
          const double expected = by_output.estimate(name, f).value();
          EXPECT_NEAR(by_gradient.estimate(name, f).value(), expected, tolerance * expected)
              << model << " " << name << " slot " << f;
          positive += expected > 0.0 ? 1 : 0;
          total_gradient += by_gradient.estimate(name, f).value();
          total_output += expected;
        }
      }
      EXPECT_NEAR(total_gradient, total_output, (f32 ? 1e-5 : 1e-2) * total_output) << model;
      EXPECT_GE(positive, 2 * 56u) << model;
      EXPECT_GE(positive, 2 * by_output.per_probe.size() * 9 / 10) << model;
    }
  }
}

// A pass stopped between steps resumes from its last finished step, and ends with exactly the
// values of an uninterrupted pass (the probes' signs depend only on the seed, probe, sequence and
// position).
TEST(KlFisher, ResumesToTheValuesOfAnUninterruptedPass) {
  if (!test::have_shared()) GTEST_SKIP() << "../shared is not available";
  const test::TempDir tmp;
  KlFisherJob job = tiny_job(tmp, 2);
  job.nsamples = 2;
  job.seqlen = 32;
  const model::ModelSpec spec = model::load_model_spec(job.model);
  const io::Checkpoint checkpoint = io::Checkpoint::open(job.model);
  const PerturbedLinear p = random_perturbation(spec, checkpoint);
  std::size_t rendered = 0;
  const PerturbationsOf perturbations = [&](std::span<const std::size_t> linears) {
    std::map<std::size_t, std::vector<std::optional<Perturbation>>> out;
    for (const std::size_t i : linears) {
      ++rendered;
      out[i].resize(1);
      // Every Linear of the same shape as kPerturbed takes its perturbation.
      if (spec.linears[i].numel() == spec.linears[p.index].numel()) {
        out[i][0] = Perturbation{p.delta, nullptr, {}};
      }
    }
    return out;
  };
  // Each part is prepared once, after its forward, and what it returned comes back.
  std::size_t prepared = 0;
  const PreparePart prepare = [&](std::int64_t part, std::span<const std::size_t> linears,
                                  const probe::ProbeAccumulator* statistics) {
    ++prepared;
    EXPECT_EQ(statistics, nullptr);
    return nlohmann::json{{"part", part}, {"linears", linears.size()}};
  };
  const KlFisherResult whole = run_kl_fisher(job, prepare, perturbations);
  ASSERT_TRUE(whole.complete);
  const std::size_t rendered_whole = rendered;
  EXPECT_EQ(prepared, 8u);  // the 8 layers (lm_head is no candidate)
  ASSERT_EQ(whole.prepared.size(), 8u);
  for (const auto& [part, returned] : whole.prepared) EXPECT_EQ(returned.at("part"), part);

  job.stop_after_steps = 12;  // the forward of 8 layers, the head and 3 backward layers
  rendered = 0;
  prepared = 0;
  EXPECT_FALSE(run_kl_fisher(job, prepare, perturbations).complete);
  EXPECT_TRUE(std::filesystem::exists(job.pass_dir / "state.json"));
  job.stop_after_steps.reset();
  const KlFisherResult resumed = run_kl_fisher(job, prepare, perturbations);
  ASSERT_TRUE(resumed.complete);
  // Each part is rendered once in all: the resumed run starts after the finished steps.
  EXPECT_EQ(rendered, rendered_whole);
  EXPECT_EQ(prepared, 8u);
  EXPECT_EQ(resumed.prepared, whole.prepared);
  EXPECT_EQ(resumed.per_probe, whole.per_probe);
  EXPECT_EQ(whole.per_probe.count(kPerturbed), 1u);
}

// The pass refuses to start, in one line, when its disk cannot hold its boundaries and what the
// caller adds beside them (the cost's renders).
TEST(KlFisher, DiskCheckCountsWhatTheCallerAdds) {
  if (!test::have_shared()) GTEST_SKIP() << "../shared is not available";
  const test::TempDir tmp;
  KlFisherJob job = tiny_job(tmp, 1);
  job.other_disk = std::int64_t{1} << 62;
  EXPECT_THAT([&] { run_kl_fisher(job, kNothingToPrepare, {}); },
              testing::ThrowsMessage<Error>(testing::HasSubstr("and the renders")));
}

}  // namespace
}  // namespace pq::cost
