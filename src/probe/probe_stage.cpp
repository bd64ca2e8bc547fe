#include "probe/probe_stage.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "common/disk_space.h"
#include "common/error.h"
#include "common/file_util.h"
#include "common/json_reader.h"
#include "common/location_lock.h"
#include "common/pass_state.h"
#include "common/progress.h"
#include "data/token_dataset.h"
#include "io/safetensors_writer.h"
#include "model/config.h"
#include "probe/fingerprint.h"
#include "probe/input_key.h"
#include "probe/probe_accumulator.h"
#include "runtime/memory_estimate.h"
#include "runtime/model.h"
#include "runtime/weights.h"

namespace pq::probe {

namespace {

constexpr const char* kPassDir = "pass";
// The losses the head step computed, kept in the pass directory until probe.json records them.
constexpr const char* kLossesJson = "losses.json";

// Importance weights of one sequence's next-token predictions (method-facts.md §2):
// w_t = clamp(CE_t / mean CE, 0.25, 4), with the mean over this sequence's predictions, so a
// weight does not depend on which other sequences share its batch (upstream's legacy probe ran
// one sequence per batch, where both means agree).
std::vector<float> importance_weights(std::span<const std::int32_t> tokens, const float* logits,
                                      std::int64_t vocab) {
  const std::size_t predictions = tokens.size() - 1;
  std::vector<double> ce(predictions);
  double mean = 0.0;
  for (std::size_t t = 0; t < predictions; ++t) {
    const float* row = logits + static_cast<std::int64_t>(t) * vocab;
    const float peak = *std::max_element(row, row + vocab);
    double sum = 0.0;
    for (std::int64_t v = 0; v < vocab; ++v) sum += std::exp(static_cast<double>(row[v]) - peak);
    ce[t] = std::log(sum) + peak - row[tokens[t + 1]];
    mean += ce[t];
  }
  mean /= static_cast<double>(predictions);
  std::vector<float> weights(predictions, 1.0f);
  if (!(mean > 0.0)) return weights;
  for (std::size_t t = 0; t < predictions; ++t) {
    weights[t] = static_cast<float>(std::clamp(ce[t] / mean, 0.25, 4.0));
  }
  return weights;
}

// The MTP head's importance weights: its row t predicts token t + 2, so they are the next-token
// weights of the sequence without its first token.
std::vector<float> mtp_importance_weights(std::span<const std::int32_t> tokens, const float* logits,
                                          std::int64_t vocab) {
  return importance_weights(tokens.subspan(1), logits, vocab);
}

struct Summary {
  double mean = 0.0;
  double min = 0.0;
  double max = 0.0;
};

Summary summarize(std::span<const float> values) {
  Summary s{0.0, values.empty() ? 0.0 : values[0], values.empty() ? 0.0 : values[0]};
  for (const float v : values) {
    s.mean += v;
    s.min = std::min<double>(s.min, v);
    s.max = std::max<double>(s.max, v);
  }
  if (!values.empty()) s.mean /= static_cast<double>(values.size());
  return s;
}

std::vector<float> second_moment(const InputSums& input) {
  std::vector<float> moment(static_cast<std::size_t>(input.in_features), 0.0f);
  if (input.tokens == 0) return moment;
  for (std::int64_t j = 0; j < input.in_features; ++j) {
    moment[j] = input.hessian.empty()
                    ? static_cast<float>(input.square_sums[j] / static_cast<double>(input.tokens))
                    : input.hessian[j * input.in_features + j] / static_cast<float>(input.tokens);
  }
  return moment;
}

std::optional<std::string> stored_fingerprint(const std::filesystem::path& json_path) {
  if (!std::filesystem::exists(json_path)) return std::nullopt;
  try {
    const auto j = read_json_file(json_path);
    return j.at("fingerprint").get<std::string>();
  } catch (const std::exception&) {
    return std::nullopt;  // unreadable or foreign: recompute and overwrite
  }
}

// The parts of a probe: one per decoder layer holding candidates, then "mtp" for the
// multi-token-prediction head's Linears (their spec layer counts within the MTP stack, so they
// never join a body layer's part), then "head" for the text Linears outside the decoder layers
// (lm_head when it is a candidate). Each part's sums are final once its step has run, and are
// written to its own file.
struct Part {
  std::string name;                   // file stem: layer-0007, mtp, head
  std::optional<std::int64_t> layer;  // body decoder layer; absent for mtp and head
  bool mtp = false;
  bool holds(const model::Linear& linear) const {
    return (linear.component == model::Component::kMtp) == mtp && (mtp || linear.layer == layer);
  }
};

std::vector<Part> probe_parts(const model::ModelSpec& spec) {
  std::vector<Part> parts;
  bool head = false;
  bool mtp = false;
  std::set<std::int64_t> layers;
  for (const model::Linear& linear : spec.linears) {
    if (!linear.is_candidate) continue;
    if (linear.component == model::Component::kMtp) {
      mtp = true;
    } else if (linear.layer) {
      layers.insert(*linear.layer);
    } else {
      head = true;
    }
  }
  for (const std::int64_t l : layers) parts.push_back({fmt::format("layer-{:04d}", l), l});
  if (mtp) parts.push_back({"mtp", std::nullopt, true});
  if (head) parts.push_back({"head", std::nullopt});
  return parts;
}

std::filesystem::path part_file(const std::filesystem::path& dir, const Part& part) {
  return dir / fmt::format("probe.{}.safetensors", part.name);
}

// The accumulator of a part for `job`: it records what the job asks for besides the sums every
// probe has (the KV cache, the held-out Hessians), so write_part and write_summary see them.
ProbeAccumulator part_accumulator(const model::ModelSpec& spec, const Part& part,
                                  const ProbeJob& job) {
  ProbeAccumulator sums(
      spec, [&](const model::Linear& linear) { return part.holds(linear); }, job.compute);
  if (job.kv_cache) sums.record_kv_cache();
  if (!job.fisher) sums.skip_fisher();
  if (!job.hessians) sums.skip_hessians();
  if (job.holdout_hessian) {
    sums.record_holdout(static_cast<std::int64_t>(job.nsamples) - holdout_sequences(job.nsamples));
  }
  return sums;
}

// A part's file: the accumulator's sums (ProbeAccumulator::save) and each input's second moments.
void write_part(const std::filesystem::path& path, const ProbeAccumulator& sums) {
  io::SafetensorsWriter tensors(path);
  sums.save(tensors);
  for (const InputSums& input : sums.inputs()) {
    const std::vector<float> moment = second_moment(input);
    tensors.add(
        "act_second_moment." + input.key, io::DType::F32,
        std::vector<std::int64_t>{input.in_features},
        {reinterpret_cast<const std::uint8_t*>(moment.data()), moment.size() * sizeof(float)});
  }
  tensors.commit();
}

// What one distinct input's statistics take: its Hessian (twice with the held-out one,
// ProbeJob::holdout_hessian), or its square sums without Hessians.
std::int64_t input_statistics_bytes(const model::Linear& linear, const ProbeJob& job) {
  if (!job.hessians) return linear.in_features * 8;
  return linear.in_features * linear.in_features * (job.holdout_hessian ? 8 : 4);
}

// What the probe's observer holds at once: the largest layer's input statistics (one per
// distinct input) and the per-sequence gradient scratch of its largest Linear.
std::int64_t layer_statistics_bytes(const model::ModelSpec& spec, const ProbeJob& job) {
  std::map<std::pair<model::Component, std::optional<std::int64_t>>,
           std::map<std::string, std::int64_t>>
      inputs;
  std::int64_t largest = 0;
  for (const model::Linear& linear : spec.linears) {
    if (!linear.is_candidate) continue;
    inputs[{linear.component, linear.layer}][input_key(linear)] =
        input_statistics_bytes(linear, job);
    largest = std::max(largest, linear.numel() * 4);
  }
  std::int64_t peak = 0;
  for (const auto& [layer, keys] : inputs) {
    std::int64_t bytes = 0;
    for (const auto& [key, size] : keys) bytes += size;
    peak = std::max(peak, bytes);
  }
  return peak + largest;
}

// The part files of the whole model: every distinct input's statistics.
std::int64_t all_statistics_bytes(const model::ModelSpec& spec, const ProbeJob& job) {
  std::map<std::string, std::int64_t> inputs;
  for (const model::Linear& linear : spec.linears) {
    if (linear.is_candidate) inputs[input_key(linear)] = input_statistics_bytes(linear, job);
  }
  std::int64_t bytes = 0;
  for (const auto& [key, size] : inputs) bytes += size;
  return bytes;
}

// A layer's input for one step: mapped from its file (page cache, which the kernel can drop, not
// anonymous memory) or, for layer 0, the embedding computed in memory.
struct Boundary {
  MappedFile file;
  std::vector<float> computed;
  const float* data() const {
    return computed.empty() ? reinterpret_cast<const float*>(file.data()) : computed.data();
  }
};

// probe.json from the finished parts, read back one at a time, in the spec's order.
void write_summary(const ProbeJob& job, const std::string& fingerprint,
                   const model::ModelSpec& spec, const std::vector<Part>& parts,
                   std::int64_t sequences, const nlohmann::json& losses) {
  std::map<std::string, nlohmann::json> linear_json;
  std::map<std::string, nlohmann::json> input_json;
  nlohmann::json moe = nlohmann::json::array();
  nlohmann::json kv_cache = nlohmann::json::array();
  nlohmann::json files = nlohmann::json::array();
  for (const Part& part : parts) {
    const std::filesystem::path path = part_file(job.out, part);
    files.push_back(path.filename().string());
    ProbeAccumulator sums = part_accumulator(spec, part, job);
    const io::SafetensorsFile file(path);
    sums.load(file);
    std::map<std::string, Summary> moments;
    for (const InputSums& input : sums.inputs()) {
      moments.emplace(input.key, summarize(second_moment(input)));
      nlohmann::json entry = {{"key", input.key},
                              {"in_features", input.in_features},
                              {"tokens", input.tokens},
                              {"amax", input.amax}};
      if (sums.records_holdout()) entry["holdout_tokens"] = input.holdout_tokens;
      input_json.emplace(input.key, std::move(entry));
    }
    for (const LinearSums& linear : sums.linears()) {
      const Summary& act = moments.at(linear.input_key);
      nlohmann::json entry = {
          {"name", linear.name},
          {"shape", {linear.out_features, linear.in_features}},
          {"input_key", linear.input_key},
          {"tokens", linear.tokens},
          {"act_second_moment", {{"mean", act.mean}, {"min", act.min}, {"max", act.max}}}};
      if (job.fisher) {
        entry["fisher_trace"] =
            sequences == 0 ? 0.0 : linear.fisher_sum / static_cast<double>(sequences);
      }
      linear_json.emplace(linear.name, std::move(entry));
    }
    for (const auto& [layer, routing] : sums.routing()) {
      std::vector<double> mean_probability;
      for (const double p : routing.probability_sums) {
        mean_probability.push_back(routing.tokens == 0 ? 0.0
                                                       : p / static_cast<double>(routing.tokens));
      }
      moe.push_back({{"layer", layer},
                     {"top_k", routing.top_k},
                     {"tokens", routing.tokens},
                     {"route_counts", routing.route_counts},
                     {"mean_probability", mean_probability}});
    }
    for (const auto& [layer, kv] : sums.kv_cache()) {
      kv_cache.push_back({{"layer", layer},
                          {"tokens", kv.tokens},
                          {"key_amax", kv.key_amax},
                          {"value_amax", kv.value_amax}});
    }
  }
  nlohmann::json linears = nlohmann::json::array();
  nlohmann::json inputs = nlohmann::json::array();
  std::set<std::string> listed_inputs;
  for (const model::Linear& linear : spec.linears) {
    const auto found = linear_json.find(linear.name);
    if (found == linear_json.end()) continue;
    const std::string key = found->second.at("input_key").get<std::string>();
    if (listed_inputs.insert(key).second) inputs.push_back(input_json.at(key));
    linears.push_back(found->second);
  }
  nlohmann::json doc = {{"schema", kProbeSchema},
                        {"model", model_label(job.model)},
                        {"fingerprint", fingerprint},
                        {"calibration",
                         {{"data", job.data.string()},
                          {"token_ids", job.token_ids},
                          {"sequences", sequences},
                          {"seqlen", job.seqlen},
                          {"seed", job.seed},
                          {"importance_weighting", job.importance_weighting},
                          {"batch_size", job.batch_size},
                          {"compute", runtime::compute_type_name(job.compute)}}},
                        {"losses", losses},
                        {"files", std::move(files)},
                        {"linears", std::move(linears)},
                        {"inputs", std::move(inputs)},
                        {"moe", std::move(moe)}};
  // Only a probe asked for it (--kv-cache) records the KV cache; the others' probe.json is as it
  // was before the key existed.
  if (job.kv_cache) doc["kv_cache"] = std::move(kv_cache);
  if (job.holdout_hessian) {
    doc["calibration"]["holdout_sequences"] = holdout_sequences(job.nsamples);
  }
  // A probe without Fisher traces or Hessians says so; the others' probe.json is as it was
  // before the keys.
  if (!job.fisher) doc["calibration"]["fisher"] = false;
  if (!job.hessians) doc["calibration"]["hessians"] = false;
  // probe.json last: its presence (with this fingerprint) marks the probe as complete.
  write_text_file_atomic(job.out / kProbeJsonFile, doc.dump(1) + "\n");
}

}  // namespace

// Where a pass stands: every step before steps_done is finished and its files are written. A
// state whose count is not a step count of this pass (forged or damaged: 100 of 17, -1) is
// discarded with a warning, never trusted.
void require_pass_disk(const std::filesystem::path& pass_dir, std::string_view what,
                       std::int64_t needed) {
  std::error_code error;
  std::int64_t written = 0;
  for (const auto& entry : std::filesystem::directory_iterator(pass_dir, error)) {
    if (entry.is_regular_file()) written += static_cast<std::int64_t>(entry.file_size());
  }
  require_disk_space(pass_dir,
                     static_cast<std::uint64_t>(std::max<std::int64_t>(0, needed - written)), what);
}

std::string model_label(const std::filesystem::path& model_dir) {
  std::filesystem::path normal = model_dir.lexically_normal();
  if (normal.filename().empty()) normal = normal.parent_path();
  return normal.filename().string();
}

std::int64_t holdout_sequences(std::size_t nsamples) {
  if (nsamples < 2) return 0;
  return std::max<std::int64_t>(1, static_cast<std::int64_t>(nsamples / 8));
}

std::string probe_fingerprint(const ProbeJob& job) {
  Fingerprint f;
  f.field("stage", "probe/3");
  f.checkpoint(job.model);
  f.calibration_data(job.model, job.data, job.token_ids);
  f.field("nsamples", job.nsamples).field("seqlen", job.seqlen).field("seed", job.seed);
  f.field("importance_weighting", job.importance_weighting ? 1 : 0);
  f.field("batch_size", job.batch_size);
  f.field("compute", runtime::compute_type_name(job.compute));
  f.field("quantize_lm_head", job.spec_options.quantize_lm_head ? 1 : 0);
  if (job.quantized) f.field("quantized", job.quantized->tag);
  if (job.kv_cache) f.field("kv_cache", "fp8");
  if (job.holdout_hessian) f.field("holdout_hessian", holdout_sequences(job.nsamples));
  if (!job.fisher) f.field("fisher", 0);
  if (!job.hessians) f.field("hessians", 0);
  return f.hex();
}

ProbeOutcome run_probe(const ProbeJob& job) {
  PQ_CHECK(job.nsamples > 0 && job.seqlen >= 2 && job.batch_size > 0,
           "probe: --nsamples and --batch-size must be positive and --seqlen at least 2");
  PQ_CHECK(!job.holdout_hessian || job.nsamples >= 2,
           "probe: --holdout-hessian holds out calibration sequences and needs at least 2 "
           "(--nsamples {})",
           job.nsamples);
  PQ_CHECK(!job.holdout_hessian || job.hessians,
           "probe: --holdout-hessian sums a Hessian of the held-out rows, and --no-hessians "
           "stores none");
  const model::ModelConfig config = model::ModelConfig::load(job.model);
  runtime::require_runtime_support(config);
  // vLLM caches MLA's compressed latent and shared rope key (deepseek_v3-architecture-facts.md
  // §3), not per-head keys and values, so there is no k_scale / v_scale pair to calibrate.
  PQ_CHECK(!job.kv_cache || !config.mla,
           "probe: --kv-cache fp8 calibrates per-head keys and values; {} uses multi-head latent "
           "attention, whose cached latent is not supported",
           job.model.string());
  data::require_dataset(job.data, job.token_ids, job.model);
  const LocationLock lock(job.out);
  ProbeOutcome outcome;
  outcome.fingerprint = probe_fingerprint(job);
  const std::int64_t layers = config.num_hidden_layers;
  // Steps: the forward of every layer, the head, the backward of every layer; without the Fisher
  // traces the forward and the head's inputs only.
  outcome.steps_total = static_cast<std::size_t>(job.fisher ? 2 * layers + 1 : layers + 1);
  if (stored_fingerprint(job.out / kProbeJsonFile) == outcome.fingerprint) {
    outcome.complete = outcome.reused = true;
    outcome.steps_done = outcome.steps_total;
    return outcome;
  }
  const std::filesystem::path pass_dir = job.out / kPassDir;
  std::error_code error;
  std::filesystem::create_directories(job.out, error);
  PQ_CHECK(!error, "{}: cannot create the output directory: {}", job.out.string(), error.message());
  outcome.resumed_from = read_pass_steps_done(pass_dir, outcome.fingerprint, outcome.steps_total);
  if (outcome.resumed_from == 0) std::filesystem::remove_all(pass_dir, error);
  std::filesystem::create_directories(pass_dir, error);
  PQ_CHECK(!error, "{}: cannot create the pass directory: {}", pass_dir.string(), error.message());

  const io::Checkpoint checkpoint = io::Checkpoint::open(job.model);
  const model::ModelSpec spec = model::build_model_spec(config, checkpoint, job.spec_options);
  const data::TokenDataset dataset = data::load_token_dataset(
      job.data, job.token_ids, job.model, static_cast<std::int32_t>(config.vocab_size));
  std::vector<runtime::Sequence> sequences;
  for (auto& tokens : dataset.calibration(job.nsamples, job.seqlen, job.seed)) {
    sequences.push_back({std::move(tokens), {}});
  }
  const std::vector<Part> parts = probe_parts(spec);
  runtime::RuntimeOptions runtime_options;
  runtime_options.micro_batch_rows = static_cast<std::int64_t>(job.batch_size * job.seqlen);
  runtime_options.max_memory = job.max_memory;
  runtime_options.compute = job.compute;
  runtime::PassMemory memory = runtime::estimate_pass_memory(
      config, static_cast<std::int64_t>(job.nsamples * job.seqlen),
      runtime_options.micro_batch_rows, runtime_options.logits_block_rows, /*boundaries=*/2,
      runtime_options.compute);
  memory.statistics = layer_statistics_bytes(spec, job);
  runtime::require_memory("the probe", memory, runtime::memory_limit(job.max_memory));
  // The backward needs every layer's input boundary; the forward alone keeps two at a time.
  const std::int64_t boundaries = job.fisher ? config.num_hidden_layers : 2;
  require_pass_disk(
      pass_dir, "the probe's pass (boundary activations and the statistics)",
      static_cast<std::int64_t>(boundaries * job.nsamples * job.seqlen * config.hidden_size) * 4 +
          all_statistics_bytes(spec, job));

  const runtime::CheckpointWeightSource weights(checkpoint);
  if (job.quantized) {
    runtime_options.weight_transform = job.quantized->weights;
    runtime_options.activation_quantizer = job.quantized->activations;
  }
  runtime::Model model(config, weights, runtime_options);
  const auto pass = model.begin_pass(sequences);
  const std::size_t values =
      static_cast<std::size_t>(runtime::Model::rows(*pass) * config.hidden_size);
  // Boundary b is the input of layer b (b = layers: the last layer's output); x.b and dx.b live
  // in the pass directory until the backward no longer needs them. Layer 0's input is the
  // embedding, cheaper to recompute than to store.
  const auto x_path = [&](std::int64_t b) { return pass_dir / fmt::format("x.{}.f32", b); };
  const auto dx_path = [&](std::int64_t b) { return pass_dir / fmt::format("dx.{}.f32", b); };
  const auto boundary = [&](std::int64_t b) {
    Boundary x;
    if (b > 0) {
      x.file = map_f32_file(x_path(b), values);
    } else {
      x.computed.resize(values);
      model.embed(*pass, x.computed.data());
    }
    return x;
  };
  const auto finish_step = [&](std::size_t step) {
    write_pass_steps_done(pass_dir, outcome.fingerprint, step + 1);
  };
  const auto seq_count = static_cast<std::int64_t>(sequences.size());
  // Runs one backward pass under the accumulator of a part (a body layer's, the MTP head's, or
  // the head's: `where`) and writes the part's file; a layer without candidates has no part and
  // writes none.
  const auto observe_part = [&](const Part& where,
                                const std::function<void(ProbeAccumulator&)>& run) {
    const auto part = std::find_if(parts.begin(), parts.end(), [&](const Part& p) {
      return p.layer == where.layer && p.mtp == where.mtp;
    });
    ProbeAccumulator sums = part_accumulator(spec, where, job);
    sums.begin_batch();
    run(sums);
    sums.end_batch(seq_count);
    if (part != parts.end()) write_part(part_file(pass_dir, *part), sums);
  };

  ProgressBar progress("probe", outcome.steps_total);
  progress.advance(outcome.resumed_from);
  std::size_t step = outcome.resumed_from;
  for (; step < outcome.steps_total; ++step) {
    if (job.stop_after_steps && step - outcome.resumed_from >= *job.stop_after_steps) break;
    const auto s = static_cast<std::int64_t>(step);
    if (s < layers) {
      const Boundary x = boundary(s);
      std::vector<float> out(values);
      if (job.fisher) {
        model.forward_layer(s, *pass, x.data(), out.data(), nullptr);
      } else {
        // Without a backward pass the forward sees every input the layer's statistics need.
        observe_part(Part{{}, s}, [&](ProbeAccumulator& sums) {
          model.forward_layer(s, *pass, x.data(), out.data(), &sums);
        });
      }
      write_f32_file(x_path(s + 1), out);
      finish_step(step);
      if (!job.fisher) std::filesystem::remove(x_path(s), error);
    } else if (s == layers && !job.fisher) {
      // The head's and the MTP head's Linears see their inputs; no loss is taken.
      const Boundary x = boundary(layers);
      const auto ignore_logits = [](std::int64_t, const float*, std::int64_t) {};
      if (std::any_of(parts.begin(), parts.end(), [](const Part& p) { return p.name == "head"; })) {
        observe_part(Part{}, [&](ProbeAccumulator& sums) {
          model.head_forward(*pass, x.data(), ignore_logits, &sums);
        });
      }
      if (model.has_mtp()) {
        observe_part(Part{"mtp", std::nullopt, true}, [&](ProbeAccumulator& sums) {
          model.mtp_forward(*pass, x.data(), ignore_logits, &sums);
        });
      }
      write_text_file_atomic(pass_dir / kLossesJson, "{}\n");
      finish_step(step);
      std::filesystem::remove(x_path(layers), error);
    } else if (s == layers) {
      const Boundary x = boundary(layers);
      std::vector<float> dx(values);
      runtime::LossWeighting weighting;
      runtime::LossWeighting mtp_weighting;
      if (job.importance_weighting) {
        weighting = [&](std::int64_t sequence, const float* logits, std::int64_t) {
          return importance_weights(sequences[sequence].tokens, logits, config.vocab_size);
        };
        mtp_weighting = [&](std::int64_t sequence, const float* logits, std::int64_t) {
          return mtp_importance_weights(sequences[sequence].tokens, logits, config.vocab_size);
        };
      }
      nlohmann::json losses;
      observe_part(Part{}, [&](ProbeAccumulator& sums) {
        losses["next_token"] = model.head_backward(*pass, x.data(), dx.data(), &sums, weighting);
      });
      // The MTP head learns from its own loss on the body's last-layer output (facts §7); its
      // gradient stops at its inputs, so the body's Fisher stays the next-token loss's.
      if (model.has_mtp()) {
        observe_part(Part{"mtp", std::nullopt, true}, [&](ProbeAccumulator& sums) {
          losses["mtp"] = model.mtp_backward(*pass, x.data(), sums, mtp_weighting);
        });
      }
      write_text_file_atomic(pass_dir / kLossesJson, losses.dump() + "\n");
      write_f32_file(dx_path(layers), dx);
      finish_step(step);
      std::filesystem::remove(x_path(layers), error);
    } else {
      const std::int64_t layer = 2 * layers - s;
      const Boundary x = boundary(layer);
      std::vector<float> dx = read_f32_file(dx_path(layer + 1), values);
      observe_part(Part{{}, layer}, [&](ProbeAccumulator& sums) {
        model.backward_layer(layer, *pass, x.data(), dx.data(), sums);
      });
      if (layer > 0) write_f32_file(dx_path(layer), dx);
      finish_step(step);
      std::filesystem::remove(dx_path(layer + 1), error);
      std::filesystem::remove(x_path(layer), error);
    }
    progress.advance();
  }
  outcome.steps_done = step;
  if (step < outcome.steps_total) {
    progress.finish(
        fmt::format("stopped after step {} of {}; rerun to resume", step, outcome.steps_total));
    return outcome;
  }
  for (const Part& part : parts) {
    std::filesystem::rename(part_file(pass_dir, part), part_file(job.out, part));
  }
  write_summary(job, outcome.fingerprint, spec, parts, seq_count,
                read_json_file(pass_dir / kLossesJson));
  std::filesystem::remove_all(pass_dir, error);
  progress.finish(fmt::format(
      "{} sequences x {} tokens, {} parts, layer-major{}", seq_count, job.seqlen, parts.size(),
      outcome.resumed_from > 0 ? fmt::format(", resumed after step {}", outcome.resumed_from)
                               : ""));
  outcome.complete = true;
  return outcome;
}

}  // namespace pq::probe
