#include "probe/probe_stage.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/file_util.h"
#include "common/progress.h"
#include "data/token_dataset.h"
#include "io/safetensors_writer.h"
#include "model/config.h"
#include "probe/fingerprint.h"
#include "probe/probe_accumulator.h"
#include "runtime/model.h"
#include "runtime/weights.h"
#include "tokenizer/tokenizer.h"

namespace pq::probe {

namespace {

constexpr std::string_view kProbeSchema = "prismaquant.probe/1";
constexpr const char* kStateFile = "probe.state.safetensors";
constexpr const char* kTensorsFile = "probe.safetensors";
constexpr const char* kJsonFile = "probe.json";

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
    moment[j] = input.hessian[j * input.in_features + j] / static_cast<float>(input.tokens);
  }
  return moment;
}

std::optional<std::string> stored_fingerprint(const std::filesystem::path& json_path) {
  if (!std::filesystem::exists(json_path)) return std::nullopt;
  try {
    const auto j = nlohmann::json::parse(read_text_file(json_path));
    return j.at("fingerprint").get<std::string>();
  } catch (const std::exception&) {
    return std::nullopt;  // unreadable or foreign: recompute and overwrite
  }
}

void write_artifacts(const ProbeJob& job, const std::string& fingerprint,
                     const ProbeAccumulator& sums, std::size_t batches) {
  io::SafetensorsWriter tensors(job.out / kTensorsFile);
  nlohmann::json linears = nlohmann::json::array();
  nlohmann::json inputs = nlohmann::json::array();
  std::map<std::string, std::vector<float>> moments;
  for (const InputSums& input : sums.inputs()) {
    std::vector<float> moment = second_moment(input);
    tensors.add("hessian." + input.key, io::DType::F32,
                std::vector<std::int64_t>{input.in_features, input.in_features},
                {reinterpret_cast<const std::uint8_t*>(input.hessian.data()),
                 input.hessian.size() * sizeof(float)});
    tensors.add(
        "act_second_moment." + input.key, io::DType::F32,
        std::vector<std::int64_t>{input.in_features},
        {reinterpret_cast<const std::uint8_t*>(moment.data()), moment.size() * sizeof(float)});
    inputs.push_back({{"key", input.key},
                      {"in_features", input.in_features},
                      {"tokens", input.tokens},
                      {"amax", input.amax}});
    moments.emplace(input.key, std::move(moment));
  }
  tensors.commit();
  for (const LinearSums& linear : sums.linears()) {
    const Summary act = summarize(moments.at(linear.input_key));
    linears.push_back(
        {{"name", linear.name},
         {"shape", {linear.out_features, linear.in_features}},
         {"input_key", linear.input_key},
         {"fisher_trace",
          sums.sequences() == 0 ? 0.0 : linear.fisher_sum / static_cast<double>(sums.sequences())},
         {"tokens", linear.tokens},
         {"act_second_moment", {{"mean", act.mean}, {"min", act.min}, {"max", act.max}}}});
  }
  nlohmann::json moe = nlohmann::json::array();
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
  const nlohmann::json doc = {{"schema", kProbeSchema},
                              {"model", model_label(job.model)},
                              {"fingerprint", fingerprint},
                              {"calibration",
                               {{"data", job.data.string()},
                                {"sequences", sums.sequences()},
                                {"seqlen", job.seqlen},
                                {"seed", job.seed},
                                {"importance_weighting", job.importance_weighting},
                                {"batch_size", job.batch_size},
                                {"batches", batches}}},
                              {"linears", std::move(linears)},
                              {"inputs", std::move(inputs)},
                              {"moe", std::move(moe)}};
  // probe.json last: its presence (with this fingerprint) marks the probe as complete.
  write_text_file_atomic(job.out / kJsonFile, doc.dump(1) + "\n");
}

}  // namespace

std::string model_label(const std::filesystem::path& model_dir) {
  std::filesystem::path normal = model_dir.lexically_normal();
  if (normal.filename().empty()) normal = normal.parent_path();
  return normal.filename().string();
}

std::string probe_fingerprint(const ProbeJob& job) {
  Fingerprint f;
  f.field("stage", "probe/1");
  f.checkpoint(job.model);
  f.file_content(job.model / "tokenizer.json");
  f.file_content(job.data);
  f.field("nsamples", job.nsamples).field("seqlen", job.seqlen).field("seed", job.seed);
  f.field("importance_weighting", job.importance_weighting ? 1 : 0);
  f.field("batch_size", job.batch_size);
  f.field("quantize_lm_head", job.spec_options.quantize_lm_head ? 1 : 0);
  if (job.quantized) f.field("quantized", job.quantized->tag);
  return f.hex();
}

ProbeOutcome run_probe(const ProbeJob& job) {
  PQ_CHECK(job.nsamples > 0 && job.seqlen >= 2 && job.batch_size > 0,
           "probe: --nsamples and --batch-size must be positive and --seqlen at least 2");
  PQ_CHECK(std::filesystem::is_regular_file(job.model / "tokenizer.json"),
           "{}: no tokenizer.json (the probe tokenizes the calibration data with it)",
           job.model.string());
  PQ_CHECK(std::filesystem::is_regular_file(job.data), "{}: calibration data file not found",
           job.data.string());
  ProbeOutcome outcome;
  outcome.fingerprint = probe_fingerprint(job);
  outcome.batches_total = (job.nsamples + job.batch_size - 1) / job.batch_size;
  if (stored_fingerprint(job.out / kJsonFile) == outcome.fingerprint &&
      std::filesystem::exists(job.out / kTensorsFile)) {
    outcome.complete = outcome.reused = true;
    outcome.batches_done = outcome.batches_total;
    return outcome;
  }
  std::error_code error;
  std::filesystem::create_directories(job.out, error);
  PQ_CHECK(!error, "{}: cannot create the output directory: {}", job.out.string(), error.message());

  const model::ModelConfig config = model::ModelConfig::load(job.model);
  const io::Checkpoint checkpoint = io::Checkpoint::open(job.model);
  const model::ModelSpec spec = model::build_model_spec(config, checkpoint, job.spec_options);
  const tokenizer::Tokenizer tokenizer = tokenizer::Tokenizer::load(job.model / "tokenizer.json");
  const data::TokenDataset dataset = data::TokenDataset::from_text_file(job.data, tokenizer);
  const std::vector<std::vector<std::int32_t>> samples =
      dataset.calibration(job.nsamples, job.seqlen, job.seed);

  ProbeAccumulator sums(spec);
  const std::filesystem::path state_path = job.out / kStateFile;
  if (std::filesystem::exists(state_path)) {
    try {
      const io::SafetensorsFile state(state_path);
      const auto& meta = state.metadata();
      const auto fingerprint = meta.find("fingerprint");
      const auto batches = meta.find("batches_done");
      if (fingerprint != meta.end() && fingerprint->second == outcome.fingerprint &&
          batches != meta.end()) {
        sums.load(state);
        outcome.resumed_from = std::stoull(batches->second);
      }
    } catch (const Error&) {
      // An unreadable checkpoint (not ours, or damaged outside our atomic writes) is no reason to
      // stop: start over, and the next batch overwrites it.
      sums = ProbeAccumulator(spec);
      outcome.resumed_from = 0;
    }
  }

  const runtime::CheckpointWeightSource weights(checkpoint);
  runtime::RuntimeOptions runtime_options;
  if (job.quantized) {
    runtime_options.weight_transform = job.quantized->weights;
    runtime_options.activation_quantizer = job.quantized->activations;
  }
  runtime::Model model(config, weights, runtime_options);
  ProgressBar progress("probe", outcome.batches_total);
  progress.advance(outcome.resumed_from);
  std::size_t batch_index = outcome.resumed_from;
  for (; batch_index < outcome.batches_total; ++batch_index) {
    if (job.stop_after_batches && batch_index - outcome.resumed_from >= *job.stop_after_batches) {
      break;
    }
    const std::size_t first = batch_index * job.batch_size;
    const std::size_t last = std::min(samples.size(), first + job.batch_size);
    std::vector<runtime::Sequence> batch;
    for (std::size_t s = first; s < last; ++s) batch.push_back({samples[s], {}});
    if (job.importance_weighting) {
      model.forward(batch, [&](std::int64_t sequence, const float* logits, std::int64_t) {
        batch[sequence].loss_weights =
            importance_weights(batch[sequence].tokens, logits, config.vocab_size);
      });
    }
    sums.begin_batch();
    model.backward(batch, sums);
    sums.end_batch(static_cast<std::int64_t>(batch.size()));

    io::SafetensorsMetadata meta = {{"fingerprint", outcome.fingerprint},
                                    {"batches_done", std::to_string(batch_index + 1)}};
    io::SafetensorsWriter state(state_path, std::move(meta));
    sums.save(state);
    state.commit();
    progress.advance();
  }
  outcome.batches_done = batch_index;
  if (batch_index < outcome.batches_total) {
    progress.finish(fmt::format("stopped after batch {} of {}; rerun to resume", batch_index,
                                outcome.batches_total));
    return outcome;
  }
  write_artifacts(job, outcome.fingerprint, sums, outcome.batches_total);
  std::filesystem::remove(state_path, error);
  progress.finish(fmt::format("{} sequences x {} tokens, {} Linears, {} inputs", sums.sequences(),
                              job.seqlen, sums.linears().size(), sums.inputs().size()));
  outcome.complete = true;
  return outcome;
}

ProbeResult ProbeResult::read(const std::filesystem::path& probe_dir) {
  const std::filesystem::path json_path = probe_dir / kJsonFile;
  PQ_CHECK(std::filesystem::exists(json_path), "{}: no probe.json (run `prismaquant probe`)",
           probe_dir.string());
  ProbeResult result;
  result.dir_ = probe_dir;
  try {
    const auto j = nlohmann::json::parse(read_text_file(json_path));
    PQ_CHECK(j.at("schema").get<std::string>() == kProbeSchema, "schema is not {}", kProbeSchema);
    result.model_ = j.at("model").get<std::string>();
    result.fingerprint_ = j.at("fingerprint").get<std::string>();
    result.sequences_ = j.at("calibration").at("sequences").get<std::int64_t>();
    for (const auto& l : j.at("linears")) {
      ProbedLinear linear;
      linear.name = l.at("name").get<std::string>();
      linear.input_key = l.at("input_key").get<std::string>();
      linear.out_features = l.at("shape").at(0).get<std::int64_t>();
      linear.in_features = l.at("shape").at(1).get<std::int64_t>();
      linear.fisher_trace = l.at("fisher_trace").get<double>();
      linear.tokens = l.at("tokens").get<std::int64_t>();
      result.linear_index_.emplace(linear.name, result.linears_.size());
      result.linears_.push_back(std::move(linear));
    }
    for (const auto& i : j.at("inputs")) {
      const std::string key = i.at("key").get<std::string>();
      result.input_tokens_.emplace(key, i.at("tokens").get<std::int64_t>());
      result.input_amax_.emplace(key, i.at("amax").get<float>());
    }
    for (const auto& m : j.at("moe")) {
      ProbedRouting routing;
      routing.layer = m.at("layer").get<std::int64_t>();
      routing.top_k = m.at("top_k").get<std::int64_t>();
      routing.tokens = m.at("tokens").get<std::int64_t>();
      routing.route_counts = m.at("route_counts").get<std::vector<std::int64_t>>();
      routing.mean_probability = m.at("mean_probability").get<std::vector<double>>();
      result.routing_.push_back(std::move(routing));
    }
  } catch (const nlohmann::json::exception& e) {
    fail("{}: malformed probe.json: {}", json_path.string(), e.what());
  } catch (const Error& e) {
    fail("{}: {}", json_path.string(), e.what());
  }
  result.tensors_ = std::make_unique<io::SafetensorsFile>(probe_dir / kTensorsFile);
  for (const ProbedLinear& linear : result.linears_) {
    PQ_CHECK(result.hessian(linear.input_key).size() ==
                 static_cast<std::size_t>(linear.in_features * linear.in_features),
             "{}: the Hessian of {} does not match {}'s input width {}",
             (probe_dir / kTensorsFile).string(), linear.input_key, linear.name,
             linear.in_features);
  }
  return result;
}

const ProbedLinear& ProbeResult::linear(std::string_view name) const {
  const auto it = linear_index_.find(name);
  PQ_CHECK(it != linear_index_.end(), "{}: the probe did not measure Linear {}",
           (dir_ / kJsonFile).string(), name);
  return linears_[it->second];
}

std::span<const float> ProbeResult::f32_tensor(const std::string& name) const {
  const io::TensorInfo* info = tensors_->find(name);
  PQ_CHECK(info != nullptr && info->dtype == io::DType::F32, "{}: no F32 tensor {}",
           tensors_->path().string(), name);
  const io::TensorView view = tensors_->view(name);
  return {reinterpret_cast<const float*>(view.bytes.data()), view.bytes.size() / sizeof(float)};
}

std::span<const float> ProbeResult::hessian(std::string_view input_key) const {
  return f32_tensor("hessian." + std::string(input_key));
}

std::span<const float> ProbeResult::act_second_moment(std::string_view input_key) const {
  return f32_tensor("act_second_moment." + std::string(input_key));
}

float ProbeResult::input_amax(std::string_view input_key) const {
  const auto it = input_amax_.find(input_key);
  PQ_CHECK(it != input_amax_.end(), "{}: no probed input {}", (dir_ / kJsonFile).string(),
           input_key);
  return it->second;
}

std::int64_t ProbeResult::input_tokens(std::string_view input_key) const {
  const auto it = input_tokens_.find(input_key);
  PQ_CHECK(it != input_tokens_.end(), "{}: no probed input {}", (dir_ / kJsonFile).string(),
           input_key);
  return it->second;
}

}  // namespace pq::probe
