#include "cost/cost_stage.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>

#include "common/error.h"
#include "common/file_util.h"
#include "common/interrupt.h"
#include "common/json_reader.h"
#include "common/location_lock.h"
#include "common/progress.h"
#include "io/dtype.h"
#include "io/fp8_block.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "probe/fingerprint.h"
#include "probe/input_key.h"
#include "probe/probe_stage.h"
#include "runtime/kernels/gemm.h"
#include "runtime/model.h"

namespace pq::cost {

namespace {

// The source bytes FP8_SOURCE keeps, viewed in the mapped checkpoint.
formats::Fp8SourceWeight fp8_source_weight(const io::Checkpoint& checkpoint,
                                           const model::Linear& linear) {
  const io::TensorView scale = checkpoint.view(*linear.scale_tensor);
  return {checkpoint.view(linear.weight_tensor).bytes, scale.info->dtype, scale.bytes};
}

// Whether the format stores the tensor `suffix` (NVFP4: weight_global_scale, which fused
// siblings must share; W4A4: input_global_scale, from calibration).
bool stores(const formats::WeightFormat& format, formats::Shape2D shape, std::string_view suffix) {
  const auto tensors = format.tensors(shape);
  return std::any_of(tensors.begin(), tensors.end(),
                     [&](const formats::TensorSpec& t) { return t.suffix == suffix; });
}

float amax(std::span<const float> values) {
  float m = 0.0f;
  for (const float v : values) m = std::max(m, std::abs(v));
  return m;
}

std::optional<std::string> stored_fingerprint(const std::filesystem::path& path) {
  if (!std::filesystem::exists(path)) return std::nullopt;
  try {
    return read_json_file(path).at("meta").at("fingerprint").get<std::string>();
  } catch (const std::exception&) {
    return std::nullopt;  // unreadable or written without meta: recompute
  }
}

// Whether the cost table offers `format` to the Linear: its shape and role admit it and, for an
// exportable format, vLLM serves it for the Linear's layer kind on the target.
bool offered(const formats::WeightFormat& format, const model::Linear& linear,
             formats::ServingTarget serve_on) {
  const formats::Shape2D shape{linear.out_features, linear.in_features};
  if (!format.accepts(shape) || !linear.allows(format.name())) return false;
  return !format.exportable() || formats::serves(format, linear.layer_kind(), serve_on);
}

// `weight` of the Linear rounded to nearest in `format` with the exporter's options: the NVFP4
// global scale of `group_amax` (format-facts.md A.3 (2): vLLM serves fused NVFP4 shards with the
// max of their global scales) under the scale rule of the kernel that serves it on the target,
// W4A4's input scale from the calibration amax, FP8_SOURCE's own source bytes.
void fake_quantize_nearest(const formats::WeightFormat& format, const model::Linear& linear,
                           const io::Checkpoint& checkpoint, std::span<const float> weight,
                           float group_amax, float input_amax, formats::ServingTarget serve_on,
                           std::vector<float>& quantized) {
  const formats::Shape2D shape{linear.out_features, linear.in_features};
  formats::QuantizeOptions options;
  if (stores(format, shape, "weight_global_scale")) {
    options.nvfp4_scales = formats::nvfp4_scales(format, linear.layer_kind(), serve_on);
    options.weight_global_scale =
        formats::nvfp4_weight_global_scale(group_amax, options.nvfp4_scales);
  }
  // Weight errors do not depend on it, but the codec takes the exporter's full options.
  if (stores(format, shape, "input_global_scale")) {
    options.input_global_scale = formats::nvfp4_global_scale(input_amax);
  }
  // FP8_SOURCE's weights are the source's own bytes: its codec reads them, not `weight` (their
  // dequantization, which it reproduces exactly).
  std::optional<formats::Fp8SourceWeight> fp8_source;
  if (format.name() == "FP8_SOURCE") {
    fp8_source = fp8_source_weight(checkpoint, linear);
    options.fp8_source = &*fp8_source;
  }
  quantized.resize(weight.size());
  format.fake_quantize(weight, shape, quantized, options);
}

// The KL-Fisher pass of a cost job: its calibration and probes, with the job's model, spec
// options, format slots and renders, accumulating the Hessians where the probe stored none.
KlFisherJob kl_fisher_job(const CostJob& job, bool hessians) {
  KlFisherJob pass = *job.kl_fisher;
  pass.hessians = hessians;
  pass.model = job.model;
  pass.spec_options = job.spec_options;
  pass.slots = job.formats.size();
  pass.pass_dir = job.out / "kl-pass";
  pass.perturbations_tag = job.renders != nullptr ? job.renders->fingerprint() : "";
  for (const std::string& format : job.formats) pass.perturbations_tag += "," + format;
  pass.perturbations_tag += fmt::format(",{}", formats::serving_target_name(job.serve_on));
  return pass;
}

nlohmann::json errors_to_json(const QuantizationErrors& e) {
  return {{"weight_mse", e.weight_mse},
          {"act_weighted_mse", e.act_weighted_mse},
          {"output_mse", e.output_mse},
          {"dloss_fisher", e.dloss_fisher},
          {"dloss_activation", e.dloss_activation}};
}

QuantizationErrors errors_from_json(const nlohmann::json& j) {
  const auto number = [&](const char* key) {
    PQ_CHECK(j.is_object() && j.contains(key) && j[key].is_number(),
             "the KL-Fisher pass's error columns lack {}", key);
    return j[key].get<double>();
  };
  return {number("weight_mse"), number("act_weighted_mse"), number("output_mse"),
          number("dloss_fisher"), number("dloss_activation")};
}

}  // namespace

Objective objective_by_name(std::string_view name) {
  if (name == "fisher") return Objective::kFisher;
  if (name == "activation-fisher") return Objective::kActivationFisher;
  if (name == "kl-fisher") return Objective::kKlFisher;
  fail("unknown cost objective \"{}\" (known: fisher, activation-fisher, kl-fisher)", name);
}

std::string_view objective_name(Objective objective) {
  switch (objective) {
    case Objective::kFisher:
      return "fisher";
    case Objective::kActivationFisher:
      return "activation-fisher";
    case Objective::kKlFisher:
      return "kl-fisher";
  }
  return "fisher";
}

std::uint64_t render_bytes(const model::ModelSpec& spec, const std::vector<std::string>& formats,
                           formats::ServingTarget serve_on) {
  std::uint64_t bytes = 0;
  for (const std::string& name : formats) {
    const formats::WeightFormat& format = formats::format_by_name(name);
    for (const model::Linear& linear : spec.linears) {
      const formats::Shape2D shape{linear.out_features, linear.in_features};
      if (linear.is_candidate && offered(format, linear, serve_on) && format.group_layout(shape)) {
        bytes += format.bytes(shape);
      }
    }
  }
  return bytes;
}

QuantizationErrors measure_errors(std::span<const float> w, std::span<const float> quantized,
                                  formats::Shape2D shape, const LinearStatistics& stats) {
  const std::int64_t out = shape.out;
  const std::int64_t in = shape.in;
  std::vector<float> delta(static_cast<std::size_t>(shape.numel()));
  double squares = 0.0;
  double weighted = 0.0;
  for (std::int64_t i = 0; i < out; ++i) {
    for (std::int64_t j = 0; j < in; ++j) {
      const float d = quantized[i * in + j] - w[i * in + j];
      delta[i * in + j] = d;
      const double d2 = static_cast<double>(d) * d;
      squares += d2;
      weighted += d2 * stats.act_second_moment[j];
    }
  }
  double energy = 0.0;
  for (const float m : stats.act_second_moment) energy += m;

  QuantizationErrors e;
  e.weight_mse = squares / static_cast<double>(shape.numel());
  e.act_weighted_mse = weighted / static_cast<double>(out);
  e.dloss_fisher = 0.5 * stats.fisher_trace * e.weight_mse;
  // With no activation energy (an expert no token reached) the spread is uniform.
  e.dloss_activation =
      energy > 0.0 ? 0.5 * stats.fisher_trace * weighted / (static_cast<double>(out) * energy)
                   : e.dloss_fisher;
  // A format that keeps the source (BF16 of a BF16 checkpoint) changes nothing: no GEMM.
  if (stats.tokens > 0 && squares > 0.0) {
    // tr(dW H dW^T) = sum_i dW_i . (H dW_i), with (dW H) as one GEMM.
    std::vector<float> product(delta.size());
    runtime::gemm_f32(runtime::Transpose::kNo, runtime::Transpose::kNo, out, in, in, 1.0f,
                      delta.data(), in, stats.hessian.data(), in, 0.0f, product.data(), in);
    double trace = 0.0;
    for (std::size_t k = 0; k < delta.size(); ++k) {
      trace += static_cast<double>(delta[k]) * product[k];
    }
    e.output_mse = std::max(0.0, trace) / (static_cast<double>(stats.tokens) * out);
  }
  return e;
}

std::string cost_fingerprint(const CostJob& job, const std::string& probe_fingerprint) {
  probe::Fingerprint f;
  f.field("stage", "cost/1");
  f.checkpoint(job.model);
  f.field("probe", probe_fingerprint);
  for (const std::string& format : job.formats) f.field("format", format);
  f.field("objective", objective_name(job.objective));
  f.field("serve_on", formats::serving_target_name(job.serve_on));
  f.field("quantize_lm_head", job.spec_options.quantize_lm_head ? 1 : 0);
  if (job.renders != nullptr) f.field("renders", job.renders->fingerprint());
  // Whether the pass accumulates Hessians follows from the probe, whose fingerprint is above.
  if (job.objective == Objective::kKlFisher && job.kl_fisher) {
    f.field("kl_fisher", kl_fisher_fingerprint(kl_fisher_job(job, false)));
  }
  return f.hex();
}

CostOutcome run_cost(const CostJob& job) {
  PQ_CHECK(!job.formats.empty(), "cost: --formats lists no format");
  std::vector<const formats::WeightFormat*> menu;
  for (const std::string& name : job.formats) menu.push_back(&formats::format_by_name(name));

  // The statistics each error is weighed by come from a probe, which runs the model.
  const model::ModelConfig config = model::ModelConfig::load(job.model);
  runtime::require_runtime_support(config);
  const LocationLock lock(job.out);
  const probe::ProbeResult probed = probe::ProbeResult::read(job.probe);
  PQ_CHECK(probed.has_fisher() || job.objective == Objective::kKlFisher,
           "cost: --objective {} weighs errors by the Fisher traces, which the probe in {} did not "
           "record (it ran with --no-fisher); rerun the probe without it, or use --objective "
           "kl-fisher",
           objective_name(job.objective), job.probe.string());
  PQ_CHECK(probed.has_hessians() || job.objective == Objective::kKlFisher,
           "cost: --objective {} measures output errors with the Hessians, which the probe in {} "
           "did not store (it ran with --no-hessians); rerun the probe without it, or use "
           "--objective kl-fisher",
           objective_name(job.objective), job.probe.string());
  // Without the probe's Hessians the KL-Fisher pass accumulates its own, which stand for the
  // probe's in the renders' fingerprint: they must be over the probe's calibration sample.
  if (!probed.has_hessians() && job.kl_fisher) {
    const KlFisherJob& kl = *job.kl_fisher;
    PQ_CHECK(
        probed.sequences() == static_cast<std::int64_t>(kl.nsamples) &&
            probed.seqlen() == static_cast<std::int64_t>(kl.seqlen) && probed.seed() == kl.seed &&
            probed.compute() == std::string(runtime::compute_type_name(kl.compute)),
        "cost: the probe in {} stored no Hessians, so the KL-Fisher pass measures them on "
        "the probe's calibration sample, but it was asked for {} x {} tokens (seed {}, {}) "
        "where the probe took {} x {} (seed {}, {})",
        job.probe.string(), kl.nsamples, kl.seqlen, kl.seed, runtime::compute_type_name(kl.compute),
        probed.sequences(), probed.seqlen().value_or(0), probed.seed().value_or(0),
        probed.compute().value_or("?"));
  }
  CostOutcome outcome;
  outcome.fingerprint = cost_fingerprint(job, probed.fingerprint());
  const std::filesystem::path cost_path = job.out / "cost.json";
  if (stored_fingerprint(cost_path) == outcome.fingerprint) {
    outcome.table = alloc::read_cost_table(cost_path);
    outcome.reused = true;
    return outcome;
  }

  const io::Checkpoint checkpoint = io::Checkpoint::open(job.model);
  const model::ModelSpec spec = model::build_model_spec(config, checkpoint, job.spec_options);

  alloc::CostTable& table = outcome.table;
  table.model = probe::model_label(job.model);
  for (const auto* format : menu) table.formats.emplace_back(format->name());

  // Linears grouped by the input they read: members share a Hessian and an NVFP4 global scale.
  std::vector<std::size_t> candidates;
  std::map<std::string, std::vector<std::size_t>> by_input;
  std::vector<std::string> input_order;
  for (std::size_t i = 0; i < spec.linears.size(); ++i) {
    const model::Linear& linear = spec.linears[i];
    if (!linear.is_candidate) continue;
    const std::string key = probe::input_key(linear);
    if (by_input.find(key) == by_input.end()) input_order.push_back(key);
    by_input[key].push_back(i);
    candidates.push_back(i);
  }
  std::map<std::size_t, std::size_t> row_of;  // spec index -> table row
  for (const std::size_t i : candidates) {
    const model::Linear& linear = spec.linears[i];
    alloc::LinearCost row;
    row.name = linear.name;
    row.shape = {linear.out_features, linear.in_features};
    row.group = linear.group.value_or("");
    row.params = static_cast<std::uint64_t>(linear.numel());
    row.costs.resize(menu.size());
    row_of[i] = table.linears.size();
    table.linears.push_back(std::move(row));
  }

  // The KL-Fisher pass: every offered (Linear, format)'s exported weights, folded a layer at a
  // time against the probes' backward passes.
  std::optional<KlFisherResult> kl;
  // The statistics the error columns of candidate `i` are measured with.
  const auto statistics_of = [&](std::size_t i) {
    const model::Linear& linear = spec.linears[i];
    const std::string key = probe::input_key(linear);
    LinearStatistics stats;
    stats.fisher_trace = probed.linear(linear.name).fisher_trace;
    stats.act_second_moment = probed.act_second_moment(key);
    stats.hessian = probed.hessian(key);
    stats.tokens = probed.input_tokens(key);
    // A probe of another checkpoint can name the same Linears with other widths; its statistics
    // would be read past their end.
    const auto in = static_cast<std::size_t>(linear.in_features);
    PQ_CHECK(stats.act_second_moment.size() == in &&
                 (stats.hessian.size() == in * in || !probed.has_hessians()),
             "{}: the probe measured input {} with {} features, but {} takes {} (a probe of "
             "another model?)",
             job.probe.string(), key, stats.act_second_moment.size(), job.model.string(), in);
    return stats;
  };
  // The error columns of the renders the KL-Fisher pass made, by (candidate, format slot), so the
  // table below does not decode them again.
  std::map<std::pair<std::size_t, std::size_t>, QuantizationErrors> measured;
  if (job.objective == Objective::kKlFisher) {
    PQ_CHECK(job.kl_fisher && job.renders != nullptr,
             "cost: --objective kl-fisher needs calibration data (--data) and the exporter's "
             "renders");
    // Each part's Linears are rendered in every offered format after its forward, fitted to the
    // Hessians the pass accumulated there when the probe stored none, and measured with them;
    // the backward's perturbations then read those renders back.
    const auto prepare = [&](std::int64_t, std::span<const std::size_t> linears,
                             const probe::ProbeAccumulator* sums) {
      // Every offered format of Linear i, rendered and measured: its slots of error columns.
      const auto prepare_linear = [&](std::size_t i) {
        const model::Linear& linear = spec.linears[i];
        const std::vector<float> weight = model::read_source_weight(checkpoint, linear);
        LinearStatistics stats = statistics_of(i);
        std::vector<float> moment;
        if (sums != nullptr) {
          const probe::InputSums& input = sums->input(probe::input_key(linear));
          stats.hessian = input.hessian;
          stats.tokens = input.tokens;
          moment.assign(static_cast<std::size_t>(input.in_features), 0.0f);
          for (std::int64_t j = 0; j < input.in_features && input.tokens > 0; ++j) {
            moment[j] = input.hessian[j * input.in_features + j] / static_cast<float>(input.tokens);
          }
          stats.act_second_moment = moment;
        }
        nlohmann::json slots = nlohmann::json::array();
        for (std::size_t f = 0; f < menu.size(); ++f) {
          if (!offered(*menu[f], linear, job.serve_on)) {
            slots.push_back(nullptr);
            continue;
          }
          const RenderedLinear rendered =
              job.renders->render(i, *menu[f], sums != nullptr ? &stats : nullptr);
          slots.push_back(errors_to_json(measure_errors(
              weight, rendered.weight, {linear.out_features, linear.in_features}, stats)));
        }
        return slots;
      };
      // A MoE layer's routed experts are many small Linears, each expert's reading an input of
      // its own: experts render in parallel, an expert's Linears one after another on one thread
      // (they share its Hessian factor) with GPTQ's row blocks serial inside. An expert's weight
      // has too few row blocks (6 for a 768-row one) to keep many cores busy alone. Every other
      // Linear renders alone, its row blocks on every thread.
      nlohmann::json columns = nlohmann::json::object();
      std::vector<std::string> expert_keys;
      std::map<std::string, std::vector<std::size_t>> experts;
      for (const std::size_t i : linears) {
        const model::Linear& linear = spec.linears[i];
        if (!linear.expert) {
          columns[linear.name] = prepare_linear(i);
          continue;
        }
        const std::string key = probe::input_key(linear);
        if (!experts.contains(key)) expert_keys.push_back(key);
        experts[key].push_back(i);
      }
      std::vector<nlohmann::json> expert_columns(expert_keys.size());
      std::exception_ptr failure;
#pragma omp parallel for schedule(dynamic, 1)
      for (std::size_t e = 0; e < expert_keys.size(); ++e) {
        try {
          for (const std::size_t i : experts.at(expert_keys[e])) {
            expert_columns[e][spec.linears[i].name] = prepare_linear(i);
          }
        } catch (...) {
#pragma omp critical(pq_cost_prepare_failure)
          if (!failure) failure = std::current_exception();
        }
      }
      if (failure) std::rethrow_exception(failure);
      for (nlohmann::json& expert : expert_columns) columns.update(expert);
      return columns;
    };
    KlFisherJob pass = kl_fisher_job(job, !probed.has_hessians());
    // The renders go to the work directory beside the pass: the pass's disk check counts those
    // still to make.
    if (const std::optional<std::uint64_t> stored = job.renders->stored_bytes()) {
      const std::uint64_t all = render_bytes(spec, job.formats, job.serve_on);
      pass.other_disk = static_cast<std::int64_t>(all - std::min(all, *stored));
    }
    kl = run_kl_fisher(pass, prepare, [&](std::span<const std::size_t> linears) {
      std::map<std::size_t, std::vector<std::optional<Perturbation>>> perturbations;
      for (const std::size_t i : linears) {
        const model::Linear& linear = spec.linears[i];
        const std::vector<float> weight = model::read_source_weight(checkpoint, linear);
        std::vector<std::optional<Perturbation>>& slots = perturbations[i];
        slots.resize(menu.size());
        for (std::size_t f = 0; f < menu.size(); ++f) {
          if (!offered(*menu[f], linear, job.serve_on)) continue;
          RenderedLinear rendered = job.renders->render(i, *menu[f], nullptr);
          Perturbation p;
          p.delta = std::move(rendered.weight);
          for (std::size_t e = 0; e < weight.size(); ++e) p.delta[e] -= weight[e];
          if (rendered.activations != nullptr) {
            p.activations = std::move(rendered.activations);
            p.weight = weight;
          }
          slots[f] = std::move(p);
        }
      }
      return perturbations;
    });
    PQ_CHECK(kl->complete, "cost: the KL-Fisher pass stopped before its end");
    std::map<std::string, std::size_t, std::less<>> index_of;
    for (const std::size_t i : candidates) index_of.emplace(spec.linears[i].name, i);
    for (const auto& [part, columns] : kl->prepared) {
      for (const auto& [name, slots] : columns.items()) {
        const auto found = index_of.find(name);
        PQ_CHECK(found != index_of.end() && slots.is_array() && slots.size() == menu.size(),
                 "cost: the KL-Fisher pass measured {}, which is not a candidate of {} formats",
                 name, menu.size());
        for (std::size_t f = 0; f < menu.size(); ++f) {
          if (!slots[f].is_null()) measured[{found->second, f}] = errors_from_json(slots[f]);
        }
      }
    }
  }

  ProgressBar progress("cost", input_order.size());
  std::exception_ptr failure;
  // Renders go through the exporter's encoder and its render cache, one at a time.
#pragma omp parallel for schedule(dynamic, 1) if (job.renders == nullptr)
  for (std::size_t g = 0; g < input_order.size(); ++g) {
    try {
      throw_if_interrupted();
      const std::string& key = input_order[g];
      const std::vector<std::size_t>& members = by_input.at(key);
      // Source weights are read only where a column is still to measure; round to nearest needs
      // the whole group's amax (fused siblings share NVFP4's global scale).
      std::vector<std::vector<float>> weights(members.size());
      const auto weight_of = [&](std::size_t m) -> const std::vector<float>& {
        if (weights[m].empty()) {
          weights[m] = model::read_source_weight(checkpoint, spec.linears[members[m]]);
        }
        return weights[m];
      };
      float group_amax = 0.0f;
      if (job.renders == nullptr) {
        for (std::size_t m = 0; m < members.size(); ++m) {
          group_amax = std::max(group_amax, amax(weight_of(m)));
        }
      }
      for (std::size_t m = 0; m < members.size(); ++m) {
        const model::Linear& linear = spec.linears[members[m]];
        const formats::Shape2D shape{linear.out_features, linear.in_features};
        const LinearStatistics stats = statistics_of(members[m]);
        alloc::LinearCost& row = table.linears[row_of.at(members[m])];
        std::vector<float> quantized;
        for (std::size_t f = 0; f < menu.size(); ++f) {
          const formats::WeightFormat& format = *menu[f];
          if (!offered(format, linear, job.serve_on)) continue;
          QuantizationErrors e;
          if (const auto found = measured.find({members[m], f}); found != measured.end()) {
            e = found->second;
          } else {
            if (job.renders != nullptr) {
              quantized = job.renders->render(members[m], format, nullptr).weight;
            } else {
              quantized.resize(weight_of(m).size());
              fake_quantize_nearest(format, linear, checkpoint, weight_of(m), group_amax,
                                    probed.input_amax(key), job.serve_on, quantized);
            }
            e = measure_errors(weight_of(m), quantized, shape, stats);
          }
          alloc::FormatCost cost;
          cost.bytes = format.bytes(shape);
          switch (job.objective) {
            case Objective::kFisher:
              cost.predicted_dloss = e.dloss_fisher;
              break;
            case Objective::kActivationFisher:
              cost.predicted_dloss = e.dloss_activation;
              break;
            case Objective::kKlFisher:
              cost.predicted_dloss = kl->estimate(linear.name, f).value_or(0.0);
              break;
          }
          cost.weight_mse = e.weight_mse;
          cost.act_weighted_mse = e.act_weighted_mse;
          cost.output_mse = e.output_mse;
          row.costs[f] = cost;
        }
        PQ_CHECK(std::any_of(row.costs.begin(), row.costs.end(),
                             [](const auto& c) { return c.has_value(); }),
                 "{} [{}, {}]: no format of --formats can hold it that vLLM serves on {}",
                 linear.name, linear.out_features, linear.in_features,
                 formats::serving_target_name(job.serve_on));
      }
#pragma omp critical(pq_cost_progress)
      progress.advance();
    } catch (...) {
#pragma omp critical(pq_cost_failure)
      if (!failure) failure = std::current_exception();
    }
  }
  if (failure) std::rethrow_exception(failure);

  // Passthrough: every stored tensor no candidate Linear takes its weight from, as stored.
  std::map<std::string, bool, std::less<>> quantized_tensors;
  for (const std::size_t i : candidates) {
    quantized_tensors[spec.linears[i].weight_tensor] = true;
    if (spec.linears[i].scale_tensor) quantized_tensors[*spec.linears[i].scale_tensor] = true;
  }
  for (const std::string& name : checkpoint.tensor_names()) {
    if (quantized_tensors.count(name) != 0) continue;
    const io::TensorInfo& info = checkpoint.info(name);
    table.passthrough_params += static_cast<std::uint64_t>(info.numel());
    table.passthrough_bytes += info.nbytes();
  }

  std::error_code error;
  std::filesystem::create_directories(job.out, error);
  PQ_CHECK(!error, "{}: cannot create the output directory: {}", job.out.string(), error.message());
  nlohmann::json doc = alloc::cost_table_to_json(table);
  doc["meta"] = {{"fingerprint", outcome.fingerprint},
                 {"probe_fingerprint", probed.fingerprint()},
                 {"objective", objective_name(job.objective)},
                 {"serve_on", formats::serving_target_name(job.serve_on)}};
  write_text_file_atomic(cost_path, doc.dump(1) + "\n");
  progress.finish(fmt::format("{} Linears x {} formats", table.linears.size(), menu.size()));
  return outcome;
}

}  // namespace pq::cost
