#include "cost/kl_fisher.h"

#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <set>

#include "common/error.h"
#include "common/file_util.h"
#include "common/interrupt.h"
#include "common/json_reader.h"
#include "common/pass_state.h"
#include "common/progress.h"
#include "data/splitmix64.h"
#include "data/token_dataset.h"
#include "model/config.h"
#include "probe/fingerprint.h"
#include "probe/input_key.h"
#include "probe/probe_stage.h"
#include "runtime/kernels/gemm.h"
#include "runtime/memory_estimate.h"
#include "runtime/weights.h"

namespace pq::cost {

namespace {

// The probe's Rademacher vector at one prediction depends only on (probe seed, probe, sequence,
// position), so a resumed or differently batched pass draws the same signs.
std::uint64_t sign_seed(std::uint64_t probe_seed, std::size_t probe, std::int64_t sequence,
                        std::int64_t position) {
  data::SplitMix64 mix(probe_seed);
  std::uint64_t seed = mix.next() ^ (static_cast<std::uint64_t>(probe) * 0x9E3779B97F4A7C15ULL);
  seed = data::SplitMix64(seed).next() ^ static_cast<std::uint64_t>(sequence);
  seed = data::SplitMix64(seed).next() ^ static_cast<std::uint64_t>(position);
  return data::SplitMix64(seed).next();
}

// Replaces one sequence's logits [rows, vocab] by probe k's logit gradient: at each prediction
// (every position but the last, as evaluation scores them) L r = sqrt(p) * r - p (sqrt(p) . r)
// with p the softmax of the row; the last position's row is zero.
void probe_logit_gradient(float* logits, std::int64_t rows, std::int64_t vocab,
                          std::uint64_t probe_seed, std::size_t probe, std::int64_t sequence) {
  std::vector<double> p(static_cast<std::size_t>(vocab));
  std::vector<double> signs(static_cast<std::size_t>(vocab));
  for (std::int64_t t = 0; t < rows; ++t) {
    float* row = logits + t * vocab;
    if (t + 1 == rows) {
      std::fill(row, row + vocab, 0.0f);
      continue;
    }
    const float peak = *std::max_element(row, row + vocab);
    double total = 0.0;
    for (std::int64_t v = 0; v < vocab; ++v) {
      p[v] = std::exp(static_cast<double>(row[v]) - peak);
      total += p[v];
    }
    data::SplitMix64 random(sign_seed(probe_seed, probe, sequence, t));
    std::uint64_t bits = 0;
    double projection = 0.0;  // sqrt(p) . r
    for (std::int64_t v = 0; v < vocab; ++v) {
      if (v % 64 == 0) bits = random.next();
      p[v] /= total;
      signs[v] = ((bits >> (v % 64)) & 1u) != 0 ? 1.0 : -1.0;
      projection += std::sqrt(p[v]) * signs[v];
    }
    for (std::int64_t v = 0; v < vocab; ++v) {
      row[v] = static_cast<float>(std::sqrt(p[v]) * signs[v] - p[v] * projection);
    }
  }
}

// G = dY^T X [out, in] over `rows` rows, with the pass's compute type: bf16 inputs with fp32
// accumulation (as the probe's weight gradients), or fp32.
void weight_gradient(runtime::ComputeType compute, std::int64_t rows, std::int64_t out,
                     std::int64_t in, const float* dy, const float* x, float* g) {
  if (compute == runtime::ComputeType::kBF16) {
    std::vector<std::uint16_t> dy16(static_cast<std::size_t>(rows * out));
    std::vector<std::uint16_t> x16(static_cast<std::size_t>(rows * in));
    runtime::convert_f32_to_bf16({dy, dy16.size()}, dy16);
    runtime::convert_f32_to_bf16({x, x16.size()}, x16);
    runtime::gemm_bf16(runtime::Transpose::kYes, runtime::Transpose::kNo, out, in, rows, 1.0f,
                       dy16.data(), out, x16.data(), in, 0.0f, g, in);
    return;
  }
  runtime::gemm_f32(runtime::Transpose::kYes, runtime::Transpose::kNo, out, in, rows, 1.0f, dy, out,
                    x, in, 0.0f, g, in);
}

// sum_i g_i (a_i + b_i), b optional: the Frobenius products the fold reduces to, memory-bound,
// so spread over the threads.
double frobenius(std::span<const float> g, const float* a, const float* b = nullptr) {
  const auto n = static_cast<std::int64_t>(g.size());
  double sum = 0.0;
  if (b == nullptr) {
#pragma omp parallel for reduction(+ : sum) schedule(static)
    for (std::int64_t i = 0; i < n; ++i) sum += static_cast<double>(g[i]) * a[i];
  } else {
#pragma omp parallel for reduction(+ : sum) schedule(static)
    for (std::int64_t i = 0; i < n; ++i) {
      sum += static_cast<double>(g[i]) * (static_cast<double>(a[i]) + b[i]);
    }
  }
  return sum;
}

// Folds one probe's backward pass against the perturbations of the Linears it covers: per
// Linear, slot and calibration sequence s, a = sum_{t in s} dy_t . e_t with e_t the output error,
// and sums[slot] += a^2. For a weight-only format e_t = dW x_t; under an activation quantizer Q,
// e_t = W_q Q(x_t) - W x_t = dW x_t + W_q dx_t with dx_t = Q(x_t) - x_t, formed from the small dx
// so that no difference of large products cancels. Each Linear's sums take the cheaper FoldForm
// for its rows. A Linear's perturbations are made when the backward reports it and dropped when
// the next one is reported, so memory holds one Linear's, not the layer's (a MoE layer's experts
// are 9.7 GB in fp32 at the Qwen3-30B-A3B shape with three formats).
class PerturbationFold final : public runtime::LinearObserver {
 public:
  // `members`: the part's candidate Linears by name, as spec indices for `perturbations`.
  PerturbationFold(const std::map<std::string, std::size_t, std::less<>>& members,
                   const PerturbationsOf& perturbations, runtime::ComputeType compute,
                   FoldForm form)
      : members_(members), perturbations_(perturbations), compute_(compute), form_(form) {}

  void on_linear(const runtime::LinearActivity& activity) override {
    const auto found = members_.find(activity.name);
    if (found == members_.end() || activity.rows == 0) return;
    PQ_CHECK(activity.output_grad != nullptr, "{}: reported without gradients", activity.name);
    // A Linear reported in several calls (lm_head, by blocks of sequences) is made once.
    if (current_ != found->second) load(found->first, found->second);
    const std::vector<std::optional<Perturbation>>& slots = slots_;
    const std::vector<bool>& exact = exact_;
    std::size_t weight_slots = 0;
    std::size_t activation_slots = 0;
    for (std::size_t f = 0; f < slots.size(); ++f) {
      if (!slots[f] || exact[f]) continue;
      ++(slots[f]->activations != nullptr ? activation_slots : weight_slots);
    }
    if (weight_slots + activation_slots == 0) return;
    std::set<std::int64_t> sequences;
    for (const runtime::RowRange& range : activity.sequences) sequences.insert(range.sequence);
    const double rows_per_sequence =
        static_cast<double>(activity.rows) / static_cast<double>(sequences.size());
    const bool by_gradient =
        form_ == FoldForm::kWeightGradient ||
        (form_ == FoldForm::kAuto &&
         fold_by_weight_gradient(rows_per_sequence, weight_slots, activation_slots));
    std::vector<double> sums(slots.size(), 0.0);
    if (by_gradient) {
      fold_weight_gradients(activity, slots, exact, sums);
    } else {
      fold_output_errors(activity, slots, exact, sums);
    }
    std::vector<std::optional<double>>& total = sums_.at(found->first);
    for (std::size_t f = 0; f < sums.size(); ++f) {
      if (total[f]) *total[f] += sums[f];
    }
  }

  // Per Linear the backward reported, per slot its sum, or nullopt where the slot does not apply.
  const std::map<std::string, std::vector<std::optional<double>>>& sums() const { return sums_; }

 private:
  void load(const std::string& name, std::size_t index) {
    slots_.clear();
    std::map<std::size_t, std::vector<std::optional<Perturbation>>> made =
        perturbations_(std::span(&index, 1));
    slots_ = std::move(made[index]);
    current_ = index;
    // A slot that changes nothing (BF16 of a BF16 source) folds to 0 without arithmetic.
    exact_.clear();
    std::vector<std::optional<double>> zeros;
    for (const auto& slot : slots_) {
      exact_.push_back(
          slot && slot->activations == nullptr &&
          std::all_of(slot->delta.begin(), slot->delta.end(), [](float d) { return d == 0.0f; }));
      zeros.push_back(slot ? std::optional<double>(0.0) : std::nullopt);
    }
    sums_.try_emplace(name, std::move(zeros));
  }

  // FoldForm::kWeightGradient: a = <G_s, dW> + <dY_s^T dX_s, W_q>, G_s = dY_s^T X_s.
  void fold_weight_gradients(const runtime::LinearActivity& activity,
                             const std::vector<std::optional<Perturbation>>& slots,
                             const std::vector<bool>& exact, std::vector<double>& sums) const {
    const std::int64_t out = activity.out_features;
    const std::int64_t in = activity.in_features;
    const auto ranges = activity.sequences;
    std::vector<bool> done(ranges.size(), false);
    std::vector<float> gradient(static_cast<std::size_t>(out * in));
    std::vector<float> input_gradient;  // dY_s^T dX_s
    for (std::size_t r = 0; r < ranges.size(); ++r) {
      if (done[r]) continue;
      // One sequence's rows, gathered: a MoE expert sees them in several ranges.
      std::vector<float> dy;
      std::vector<float> x;
      for (std::size_t q = r; q < ranges.size(); ++q) {
        if (done[q] || ranges[q].sequence != ranges[r].sequence) continue;
        done[q] = true;
        dy.insert(dy.end(), activity.output_grad + ranges[q].begin * out,
                  activity.output_grad + ranges[q].end * out);
        x.insert(x.end(), activity.input + ranges[q].begin * in,
                 activity.input + ranges[q].end * in);
      }
      const auto rows = static_cast<std::int64_t>(x.size()) / in;
      if (rows == 0) continue;
      weight_gradient(compute_, rows, out, in, dy.data(), x.data(), gradient.data());
      for (std::size_t f = 0; f < slots.size(); ++f) {
        if (!slots[f] || exact[f]) continue;
        const Perturbation& perturbation = *slots[f];
        double a = frobenius(gradient, perturbation.delta.data());
        if (perturbation.activations != nullptr) {
          std::vector<float> dx(x.size());
          perturbation.activations->fake_quantize(x, in, dx);
          for (std::size_t i = 0; i < dx.size(); ++i) dx[i] -= x[i];
          input_gradient.resize(gradient.size());
          weight_gradient(compute_, rows, out, in, dy.data(), dx.data(), input_gradient.data());
          a += frobenius(input_gradient, perturbation.weight.data(), perturbation.delta.data());
        }
        sums[f] += a * a;
      }
    }
  }

  // FoldForm::kOutputError: E = X dW^T + dX W_q^T over every row, then a_s = sum_{t in s}
  // dy_t . e_t. The activation quantizers are row-wise (one row per token), so quantizing all
  // rows at once is quantizing each sequence's.
  static void fold_output_errors(const runtime::LinearActivity& activity,
                                 const std::vector<std::optional<Perturbation>>& slots,
                                 const std::vector<bool>& exact, std::vector<double>& sums) {
    const std::int64_t rows = activity.rows;
    const std::int64_t out = activity.out_features;
    const std::int64_t in = activity.in_features;
    const std::span<const float> x(activity.input, static_cast<std::size_t>(rows * in));
    std::vector<float> error(static_cast<std::size_t>(rows * out));
    for (std::size_t f = 0; f < slots.size(); ++f) {
      if (!slots[f] || exact[f]) continue;
      const Perturbation& perturbation = *slots[f];
      runtime::gemm_f32(runtime::Transpose::kNo, runtime::Transpose::kYes, rows, out, in, 1.0f,
                        x.data(), in, perturbation.delta.data(), in, 0.0f, error.data(), out);
      if (perturbation.activations != nullptr) {
        std::vector<float> dx(x.size());
        perturbation.activations->fake_quantize(x, in, dx);
        for (std::size_t i = 0; i < dx.size(); ++i) dx[i] -= x[i];
        std::vector<float> quantized(perturbation.weight.size());
        for (std::size_t i = 0; i < quantized.size(); ++i) {
          quantized[i] = perturbation.weight[i] + perturbation.delta[i];
        }
        runtime::gemm_f32(runtime::Transpose::kNo, runtime::Transpose::kYes, rows, out, in, 1.0f,
                          dx.data(), in, quantized.data(), in, 1.0f, error.data(), out);
      }
      std::map<std::int64_t, double> per_sequence;
      for (const runtime::RowRange& range : activity.sequences) {
        const std::size_t begin = static_cast<std::size_t>(range.begin * out);
        const std::size_t count = static_cast<std::size_t>((range.end - range.begin) * out);
        per_sequence[range.sequence] +=
            frobenius({activity.output_grad + begin, count}, error.data() + begin);
      }
      for (const auto& [sequence, a] : per_sequence) sums[f] += a * a;
    }
  }

  const std::map<std::string, std::size_t, std::less<>>& members_;
  const PerturbationsOf& perturbations_;
  runtime::ComputeType compute_;
  FoldForm form_;
  std::optional<std::size_t> current_;  // the Linear whose perturbations are made
  std::vector<std::optional<Perturbation>> slots_;
  std::vector<bool> exact_;
  std::map<std::string, std::vector<std::optional<double>>> sums_;
};

}  // namespace

bool fold_by_weight_gradient(double rows_per_sequence, std::size_t weight_slots,
                             std::size_t activation_slots) {
  // FLOP-equivalents per sequence and [out, in]: a GEMM 2 r, a product written and read back
  // 8 bytes, about 17 FLOPs each.
  constexpr double kProductCost = 8.0 * 17.0;
  const auto weight = static_cast<double>(weight_slots);
  const auto activation = static_cast<double>(activation_slots);
  const double by_gradient = (1.0 + activation) * (2.0 * rows_per_sequence + kProductCost);
  const double by_output = (weight + 2.0 * activation) * 2.0 * rows_per_sequence;
  return by_gradient < by_output;
}

KlFisherJob kl_fisher_job_on(const probe::ProbeJob& probe) {
  KlFisherJob job;
  job.data = probe.data;
  job.token_ids = probe.token_ids;
  job.nsamples = probe.nsamples;
  job.seqlen = probe.seqlen;
  job.seed = probe.seed;
  job.batch_size = probe.batch_size;
  job.compute = probe.compute;
  job.max_memory = probe.max_memory;
  return job;
}

std::string kl_fisher_fingerprint(const KlFisherJob& job) {
  probe::Fingerprint f;
  // 2: each part's PreparePart result is stored with its step.
  f.field("stage", "kl-fisher/2");
  f.checkpoint(job.model);
  f.calibration_data(job.model, job.data, job.token_ids);
  f.field("nsamples", job.nsamples).field("seqlen", job.seqlen).field("seed", job.seed);
  f.field("probes", job.probes).field("probe_seed", job.probe_seed);
  f.field("batch_size", job.batch_size);
  f.field("compute", runtime::compute_type_name(job.compute));
  f.field("quantize_lm_head", job.spec_options.quantize_lm_head ? 1 : 0);
  f.field("perturbations", job.perturbations_tag);
  if (job.hessians) f.field("hessians", 1);
  return f.hex();
}

std::optional<double> KlFisherResult::estimate(const std::string& linear, std::size_t slot) const {
  const auto found = per_probe.find(linear);
  if (found == per_probe.end() || slot >= found->second.size() || found->second[slot].empty()) {
    return std::nullopt;
  }
  const std::vector<double>& values = found->second[slot];
  double sum = 0.0;
  for (const double v : values) sum += v;
  return sum / static_cast<double>(values.size());
}

double KlFisherResult::standard_error(const std::string& linear, std::size_t slot) const {
  const std::optional<double> mean = estimate(linear, slot);
  if (!mean) return 0.0;
  const std::vector<double>& values = per_probe.at(linear)[slot];
  if (values.size() < 2) return 0.0;
  double squares = 0.0;
  for (const double v : values) squares += (v - *mean) * (v - *mean);
  const auto k = static_cast<double>(values.size());
  return std::sqrt(squares / (k - 1.0) / k);
}

KlFisherResult run_kl_fisher(const KlFisherJob& job, const PreparePart& prepare,
                             const PerturbationsOf& perturbations) {
  PQ_CHECK(job.probes > 0 && job.nsamples > 0 && job.seqlen >= 2 && job.batch_size > 0,
           "kl-fisher: --kl-probes, --nsamples and --batch-size must be positive and --seqlen at "
           "least 2");
  const model::ModelConfig config = model::ModelConfig::load(job.model);
  runtime::require_runtime_support(config);
  const io::Checkpoint checkpoint = io::Checkpoint::open(job.model);
  const model::ModelSpec spec = model::build_model_spec(config, checkpoint, job.spec_options);
  const std::int64_t layers = config.num_hidden_layers;
  // Parts by decoder layer; -1: the head (lm_head); `layers`: the MTP head, whose Linears number
  // their layers within it.
  std::map<std::int64_t, std::vector<std::size_t>> layer_linears;
  for (std::size_t i = 0; i < spec.linears.size(); ++i) {
    const model::Linear& linear = spec.linears[i];
    if (!linear.is_candidate || linear.component == model::Component::kVision) continue;
    layer_linears[linear.component == model::Component::kMtp ? layers : linear.layer.value_or(-1)]
        .push_back(i);
  }
  const bool mtp = layer_linears.contains(layers);
  data::require_dataset(job.data, job.token_ids, job.model);
  const data::TokenDataset dataset = data::load_token_dataset(
      job.data, job.token_ids, job.model, static_cast<std::int32_t>(config.vocab_size));
  std::vector<runtime::Sequence> sequences;
  for (auto& tokens : dataset.calibration(job.nsamples, job.seqlen, job.seed)) {
    sequences.push_back({std::move(tokens), {}});
  }

  runtime::RuntimeOptions options;
  options.micro_batch_rows = static_cast<std::int64_t>(job.batch_size * job.seqlen);
  options.max_memory = job.max_memory;
  options.compute = job.compute;
  runtime::PassMemory memory = runtime::estimate_pass_memory(
      config, static_cast<std::int64_t>(job.nsamples * job.seqlen), options.micro_batch_rows,
      options.logits_block_rows, /*boundaries=*/2, options.compute);
  // One Linear's perturbations at a time: its weight error per slot and its source weight, and
  // the fold's two [out, in] products.
  for (const auto& [layer, members] : layer_linears) {
    for (const std::size_t i : members) {
      memory.statistics = std::max(memory.statistics, spec.linears[i].numel() * 4 *
                                                          static_cast<std::int64_t>(job.slots + 3));
    }
  }
  // With the Hessians, one part's (one per distinct input), and GPTQ's factor of the largest
  // in double beside them while the part is rendered: one for a Linear rendered alone, one per
  // thread for a MoE layer's experts, which render in parallel (cost_stage.cpp).
  if (job.hessians) {
    const auto threads = static_cast<std::int64_t>(omp_get_max_threads());
    for (const auto& [layer, members] : layer_linears) {
      std::map<std::string, std::int64_t> inputs;
      std::int64_t widest = 0, widest_expert = 0;
      for (const std::size_t i : members) {
        const std::int64_t in = spec.linears[i].in_features;
        inputs[probe::input_key(spec.linears[i])] = in * in * 4;
        std::int64_t& of_its_kind = spec.linears[i].expert ? widest_expert : widest;
        of_its_kind = std::max(of_its_kind, in);
      }
      std::int64_t bytes =
          std::max(2 * widest * widest * 8, threads * 2 * widest_expert * widest_expert * 8);
      for (const auto& [key, size] : inputs) bytes += size;
      memory.statistics = std::max(memory.statistics, bytes);
    }
  }
  runtime::require_memory("the KL-Fisher pass", memory, runtime::memory_limit(job.max_memory));

  const std::string fingerprint = kl_fisher_fingerprint(job);
  const auto steps_total = static_cast<std::size_t>(2 * layers + 1);
  const std::size_t resumed_from = read_pass_steps_done(job.pass_dir, fingerprint, steps_total);
  std::error_code error;
  if (resumed_from == 0) std::filesystem::remove_all(job.pass_dir, error);
  std::filesystem::create_directories(job.pass_dir, error);
  PQ_CHECK(!error, "{}: cannot create the pass directory: {}", job.pass_dir.string(),
           error.message());

  // Boundaries of every layer, and each probe's input gradients at two boundaries at a time.
  const std::int64_t boundary_bytes =
      static_cast<std::int64_t>(job.nsamples * job.seqlen) * config.hidden_size * 4;
  probe::require_pass_disk(
      job.pass_dir,
      "the KL-Fisher pass (boundary activations of every layer, each "
      "probe's gradients and the renders)",
      boundary_bytes * (layers + 2 * static_cast<std::int64_t>(job.probes)) + job.other_disk);
  const runtime::CheckpointWeightSource weights(checkpoint);
  runtime::Model model(config, weights, options);
  const auto pass = model.begin_pass(sequences);
  const auto values = static_cast<std::size_t>(runtime::Model::rows(*pass) * config.hidden_size);
  const auto x_path = [&](std::int64_t b) { return job.pass_dir / fmt::format("x.{}.f32", b); };
  const auto dx_path = [&](std::size_t k, std::int64_t b) {
    return job.pass_dir / fmt::format("dx.{}.{}.f32", k, b);
  };
  const auto part_path = [&](std::int64_t layer) {
    return job.pass_dir / fmt::format("kl.{}.json", layer);
  };
  const auto prepared_path = [&](std::int64_t layer) {
    return job.pass_dir / fmt::format("prepared.{}.json", layer);
  };
  // The part's statistics, when the pass accumulates them, from `observe` (a forward that reports
  // the part's Linears to the observer it is given), then PreparePart's result, stored.
  const auto prepare_part = [&](std::int64_t layer,
                                const std::function<void(runtime::LinearObserver*)>& observe) {
    const auto found = layer_linears.find(layer);
    if (found == layer_linears.end()) {
      observe(nullptr);
      return;
    }
    const std::vector<std::size_t>& members = found->second;
    std::optional<probe::ProbeAccumulator> sums;
    if (job.hessians) {
      std::set<std::string, std::less<>> names;
      for (const std::size_t i : members) names.insert(spec.linears[i].name);
      sums.emplace(
          spec, [&](const model::Linear& linear) { return names.contains(linear.name); },
          job.compute);
      sums->skip_fisher();
      sums->begin_batch();
    }
    observe(sums ? &*sums : nullptr);
    if (sums) sums->end_batch(static_cast<std::int64_t>(sequences.size()));
    const nlohmann::json done = prepare(layer, members, sums ? &*sums : nullptr);
    write_text_file_atomic(prepared_path(layer), done.dump() + "\n");
  };
  const auto ignore_logits = [](std::int64_t, const float*, std::int64_t) {};
  const auto input_of = [&](std::int64_t b) {
    if (b > 0) return read_f32_file(x_path(b), values);
    std::vector<float> x(values);
    model.embed(*pass, x.data());
    return x;
  };
  // Runs the K probes' backward through one part (a decoder layer, or the head: -1), folding
  // each against the part's perturbations, and writes its sums.
  const auto fold_part =
      [&](std::int64_t layer,
          const std::function<void(std::size_t k, runtime::LinearObserver&)>& backward) {
        std::map<std::string, std::size_t, std::less<>> members;
        if (const auto found = layer_linears.find(layer); found != layer_linears.end()) {
          for (const std::size_t i : found->second) members.emplace(spec.linears[i].name, i);
        }
        // Per Linear the backward reached, per slot the probes' sums (null: the slot does not
        // apply); a Linear no calibration row reached (an expert no token chose) has no entry.
        nlohmann::json part = nlohmann::json::object();
        for (std::size_t k = 0; k < job.probes; ++k) {
          PerturbationFold fold(members, perturbations, job.compute, job.fold);
          backward(k, fold);
          for (const auto& [name, sums] : fold.sums()) {
            nlohmann::json& entry = part[name];
            if (entry.is_null()) {
              for (const auto& sum : sums) {
                entry.push_back(sum ? nlohmann::json::array() : nlohmann::json(nullptr));
              }
            }
            for (std::size_t f = 0; f < sums.size(); ++f) {
              if (sums[f]) entry[f].push_back(*sums[f]);
            }
          }
        }
        write_text_file_atomic(part_path(layer), part.dump() + "\n");
      };

  ProgressBar progress("kl-fisher", steps_total);
  progress.advance(resumed_from);
  for (std::size_t step = resumed_from; step < steps_total; ++step) {
    if (job.stop_after_steps && step - resumed_from >= *job.stop_after_steps) {
      progress.finish(fmt::format("stopped after step {} of {}", step, steps_total));
      return {};
    }
    throw_if_interrupted();
    const auto s = static_cast<std::int64_t>(step);
    if (s < layers) {
      const std::vector<float> x = input_of(s);
      std::vector<float> out(values);
      prepare_part(s, [&](runtime::LinearObserver* observer) {
        model.forward_layer(s, *pass, x.data(), out.data(), observer);
      });
      write_f32_file(x_path(s + 1), out);
    } else if (s == layers) {
      const std::vector<float> x = input_of(layers);
      // The head's and the MTP head's Linears see their inputs in a forward of their own when
      // their Hessians are wanted; without candidates there, or without Hessians, no forward.
      prepare_part(-1, [&](runtime::LinearObserver* observer) {
        if (observer != nullptr) model.head_forward(*pass, x.data(), ignore_logits, observer);
      });
      if (mtp) {
        prepare_part(layers, [&](runtime::LinearObserver* observer) {
          if (observer != nullptr) model.mtp_forward(*pass, x.data(), ignore_logits, observer);
        });
      }
      fold_part(-1, [&](std::size_t k, runtime::LinearObserver& fold) {
        std::vector<float> dx(values);
        model.head_backward_logits(*pass, x.data(), dx.data(), &fold,
                                   [&](std::int64_t sequence, float* logits, std::int64_t rows) {
                                     probe_logit_gradient(logits, rows, config.vocab_size,
                                                          job.probe_seed, k, sequence);
                                     return 0.0;
                                   });
        write_f32_file(dx_path(k, layers), dx);
      });
      if (mtp) {
        fold_part(layers, [&](std::size_t k, runtime::LinearObserver& fold) {
          model.mtp_backward_logits(
              *pass, x.data(), fold, [&](std::int64_t sequence, float* logits, std::int64_t rows) {
                probe_logit_gradient(logits, rows, config.vocab_size, job.probe_seed, k, sequence);
                return 0.0;
              });
        });
      }
      std::filesystem::remove(x_path(layers), error);
    } else {
      const std::int64_t layer = 2 * layers - s;
      const std::vector<float> x = input_of(layer);
      fold_part(layer, [&](std::size_t k, runtime::LinearObserver& fold) {
        std::vector<float> dx = read_f32_file(dx_path(k, layer + 1), values);
        model.backward_layer(layer, *pass, x.data(), dx.data(), fold);
        if (layer > 0) write_f32_file(dx_path(k, layer), dx);
      });
      for (std::size_t k = 0; k < job.probes; ++k) {
        std::filesystem::remove(dx_path(k, layer + 1), error);
      }
      std::filesystem::remove(x_path(layer), error);
    }
    write_pass_steps_done(job.pass_dir, fingerprint, step + 1);
    progress.advance();
  }

  KlFisherResult result;
  result.complete = true;
  result.probes = job.probes;
  for (const runtime::Sequence& sequence : sequences) {
    const auto length = static_cast<std::int64_t>(sequence.tokens.size());
    result.predictions += length - 1;
    if (mtp) result.mtp_predictions += std::max<std::int64_t>(length - 2, 0);
  }
  for (std::int64_t layer = -1; layer <= layers; ++layer) {
    if (layer_linears.find(layer) == layer_linears.end()) continue;
    const std::int64_t predictions = layer == layers ? result.mtp_predictions : result.predictions;
    PQ_CHECK(predictions > 0, "kl-fisher: no prediction to measure (--seqlen {})", job.seqlen);
    const double scale = 0.5 / static_cast<double>(predictions);
    result.prepared[layer] = read_json_file(prepared_path(layer));
    const nlohmann::json part = read_json_file(part_path(layer));
    for (const auto& [name, slots] : part.items()) {
      std::vector<std::vector<double>>& out = result.per_probe[name];
      for (const nlohmann::json& slot : slots) {
        std::vector<double> probe_values;
        if (!slot.is_null()) {
          for (const nlohmann::json& v : slot) probe_values.push_back(scale * v.get<double>());
        }
        out.push_back(std::move(probe_values));
      }
    }
  }
  std::filesystem::remove_all(job.pass_dir, error);
  progress.finish(fmt::format("{} probes over {} sequences x {} tokens", job.probes,
                              sequences.size(), job.seqlen));
  return result;
}

}  // namespace pq::cost
