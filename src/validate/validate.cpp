// The validate stage: the exported checkpoint read back as a consumer would, run, and compared
// with its source on held-out text.
#include "validate/validate.h"

#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <span>

#include "common/disk_space.h"
#include "common/error.h"
#include "common/file_util.h"
#include "common/location_lock.h"
#include "probe/fingerprint.h"
#include "runtime/checkpoint_model.h"
#include "runtime/evaluate.h"
#include "runtime/model.h"
#include "tokenizer/tokenizer.h"
#include "validate/ct_checkpoint.h"
#include "validate/ct_decode.h"

namespace pq::validate {
namespace {

namespace fs = std::filesystem;

// Tokens of the held-out split used as the default sampling prompt.
constexpr std::int64_t kDefaultPromptTokens = 16;

runtime::RuntimeOptions options_for(std::int64_t params, std::int64_t resident_f32_bytes) {
  runtime::RuntimeOptions options;
  options.keep_layers_resident = params * 4 <= resident_f32_bytes;
  return options;
}

// The text of a sample. Ids past the tokenizer's vocabulary (padding rows of an embedding larger
// than the tokenizer, e.g. Qwen3's 151936 rows for 151669 tokens) are shown as <id N> rather than
// refused: a broken checkpoint may well predict them, and the sample is there to show it. Without
// a tokenizer (data given as token ids) every id is shown so.
std::string sample_text(const tokenizer::Tokenizer* tokenizer, std::span<const std::int32_t> ids) {
  if (tokenizer == nullptr) return fmt::format("<id {}>", fmt::join(ids, "> <id "));
  std::string text;
  std::vector<std::int32_t> known;
  for (const std::int32_t id : ids) {
    if (id >= 0 && id < tokenizer->vocab_size()) {
      known.push_back(id);
      continue;
    }
    text += tokenizer->decode(known, /*skip_special_tokens=*/true) + fmt::format("<id {}>", id);
    known.clear();
  }
  return text + tokenizer->decode(known, /*skip_special_tokens=*/true);
}

// The arg-max next token at each position of `text` from `first` on, given the true text before
// it: one forward pass. Greedy decoding of a streamed model would instead read every layer again
// for each new token (a whole-model read per token).
std::vector<std::int32_t> teacher_forced_predictions(runtime::Model& model,
                                                     std::span<const std::int32_t> text,
                                                     std::size_t first) {
  const std::int64_t vocab = model.config().vocab_size;
  const std::vector<float> logits = model.logits(text);
  std::vector<std::int32_t> predicted;
  for (std::size_t t = first; t < text.size(); ++t) {
    const float* row = logits.data() + static_cast<std::int64_t>(t) * vocab;
    predicted.push_back(static_cast<std::int32_t>(std::max_element(row, row + vocab) - row));
  }
  return predicted;
}

// The held-out passes that keep their boundaries under ValidateJob::work, one directory each.
constexpr const char* kPassRoles[] = {"reference", "checkpoint", "fp8-kv-cache"};

// The resumable held-out pass `role` of the model in `model_dir` over `windows`
// (ValidateJob::work), or nullopt without a work directory. Its fingerprint holds the checkpoint's
// identity and its weight files' write times (an export over the same directory with the same
// layout changes only the values), the serving target and every window's tokens.
std::optional<runtime::ForwardCheckpoint> resumable_pass(
    const ValidateJob& job, std::string_view role, const fs::path& model_dir,
    std::span<const std::vector<std::int32_t>> windows) {
  if (job.work.empty()) return std::nullopt;
  probe::Fingerprint f;
  f.field("pass", fmt::format("validate-{}/1", role));
  f.checkpoint(model_dir);
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(model_dir)) {
    if (entry.path().extension() == ".safetensors") files.push_back(entry.path());
  }
  std::sort(files.begin(), files.end());
  for (const fs::path& file : files) {
    f.field(file.filename().string(),
            static_cast<std::uint64_t>(fs::last_write_time(file).time_since_epoch().count()));
  }
  f.field("serve_on", formats::serving_target_name(job.serve_on));
  f.field("windows_per_pass", static_cast<std::uint64_t>(runtime::kEvalWindowsPerPass));
  f.token_windows(windows);
  return runtime::ForwardCheckpoint(job.work / std::string(role), f.hex());
}

const runtime::ForwardCheckpoint* pointer(const std::optional<runtime::ForwardCheckpoint>& pass) {
  return pass ? &*pass : nullptr;
}

}  // namespace

nlohmann::json ValidateReport::to_json() const {
  nlohmann::json j = {{"checkpoint", checkpoint},
                      {"reference", reference},
                      {"format", format},
                      {"linears_by_format", linears_by_format},
                      {"serve_on", serve_on},
                      {"activation_quantized_linears", activation_quantized_linears},
                      {"seqlen", seqlen},
                      {"windows", windows},
                      {"predictions", predictions},
                      {"mean_kl_nats", mean_kl},
                      {"top1_agreement", top1_agreement},
                      {"perplexity", perplexity},
                      {"reference_perplexity", reference_perplexity},
                      {"perplexity_ratio", perplexity / reference_perplexity},
                      {"prompt", prompt},
                      {"sample_mode", sample_mode},
                      {"sample", sample},
                      {"reference_sample", reference_sample},
                      {"gates",
                       {{"max_kl", gates.max_kl},
                        {"min_top1", gates.min_top1},
                        {"max_ppl_ratio", gates.max_ppl_ratio}}},
                      {"passed", passed()},
                      {"failures", failures}};
  // Only a checkpoint with an FP8 KV cache has the key: the others' report is as before.
  if (fp8_kv_cache) {
    const KvCacheFigures& kv = *fp8_kv_cache;
    j["fp8_kv_cache"] = {{"layers", kv.layers},
                         {"min_scale", kv.min_scale},
                         {"max_scale", kv.max_scale},
                         {"mean_kl_nats", kv.mean_kl},
                         {"top1_agreement", kv.top1_agreement},
                         {"perplexity", kv.perplexity},
                         {"perplexity_ratio", kv.perplexity / reference_perplexity}};
  }
  return j;
}

std::vector<std::vector<std::int32_t>> heldout_windows(const data::TokenDataset& dataset,
                                                       std::int64_t seqlen, std::int64_t max_seqs) {
  PQ_CHECK(seqlen >= 2, "window length {} is too short: need at least 2 tokens", seqlen);
  const auto length = static_cast<std::size_t>(seqlen);
  std::size_t count = dataset.heldout_tokens().size() / length;
  if (max_seqs > 0) count = std::min(count, static_cast<std::size_t>(max_seqs));
  PQ_CHECK(count > 0, "the held-out split has {} tokens, not one window of {}",
           dataset.heldout_tokens().size(), seqlen);
  return dataset.heldout(count, length);
}

std::vector<std::string> gate_failures(const ValidateReport& r, const Gates& gates) {
  std::vector<std::string> failures;
  // Written so that a NaN measurement fails every gate it feeds.
  if (!(r.mean_kl <= gates.max_kl)) {
    failures.push_back(
        fmt::format("mean KL {:.6g} nats exceeds --max-kl {:.6g}", r.mean_kl, gates.max_kl));
  }
  if (!(r.top1_agreement >= gates.min_top1)) {
    failures.push_back(fmt::format("top-1 agreement {:.4f} is below --min-top1 {:.4f}",
                                   r.top1_agreement, gates.min_top1));
  }
  const double ratio = r.perplexity / r.reference_perplexity;
  if (!(ratio <= gates.max_ppl_ratio)) {
    failures.push_back(fmt::format(
        "perplexity {:.4f} is {:.4f}x the reference's {:.4f}, above --max-ppl-ratio {:.4f}",
        r.perplexity, ratio, r.reference_perplexity, gates.max_ppl_ratio));
  }
  return failures;
}

ValidateReport run_validate(const ValidateJob& job) {
  PQ_CHECK(job.work.empty() || !fs::exists(job.work) || fs::is_directory(job.work),
           "{}: --work is not a directory", job.work.string());
  // A second validate on the same work directory would mix its boundaries with this one's.
  std::optional<LocationLock> work_lock;
  if (!job.work.empty()) work_lock.emplace(job.work);
  PQ_CHECK(job.sample_tokens >= 0, "sample length {} is negative", job.sample_tokens);
  const CompressedTensorsCheckpoint checkpoint = CompressedTensorsCheckpoint::open(job.checkpoint);
  check_marlin_group_scales(checkpoint, job.serve_on);
  // The structural checks above cover every architecture the inventory knows; scoring runs the
  // model, which the runtime may not support yet (Qwen3.5/3.6).
  try {
    runtime::require_runtime_support(checkpoint.config());
  } catch (const Error& e) {
    fail("{}: its tensors and quantization_config check out, but it cannot be scored: {}",
         job.checkpoint.string(), e.what());
  }
  ValidateReport report;
  report.checkpoint = job.checkpoint.string();
  report.reference = job.reference.string();
  report.format = checkpoint.format();
  report.serve_on = std::string(formats::serving_target_name(job.serve_on));
  report.gates = job.gates;
  report.seqlen = job.seqlen;
  for (const model::Linear& linear : checkpoint.spec().linears) {
    const Scheme* scheme = checkpoint.scheme_of(linear.name);
    report.linears_by_format[scheme == nullptr ? "ignored" : scheme->format] += 1;
  }

  const auto dataset =
      data::load_token_dataset(job.data, job.token_ids, job.checkpoint,
                               static_cast<std::int32_t>(checkpoint.config().vocab_size));
  const auto windows = heldout_windows(dataset, job.seqlen, job.max_seqs);
  // Samples are shown as text when the checkpoint has a tokenizer, as ids otherwise.
  const fs::path tokenizer_path = job.checkpoint / "tokenizer.json";
  std::optional<tokenizer::Tokenizer> tokenizer;
  if (fs::is_regular_file(tokenizer_path)) tokenizer = tokenizer::Tokenizer::load(tokenizer_path);
  const tokenizer::Tokenizer* text_of = tokenizer ? &*tokenizer : nullptr;

  std::vector<std::int32_t> prompt;
  if (job.prompt) {
    PQ_CHECK(tokenizer, "{}: no tokenizer.json to encode the sampling prompt with",
             job.checkpoint.string());
    prompt = tokenizer->encode(*job.prompt, /*add_special_tokens=*/true);
  } else {
    const auto& first = windows.front();
    prompt.assign(first.begin(),
                  first.begin() + std::min<std::int64_t>(kDefaultPromptTokens, job.seqlen));
  }
  PQ_CHECK(!prompt.empty(), "the sampling prompt is empty");
  report.prompt = sample_text(text_of, prompt);
  const runtime::RuntimeOptions options =
      options_for(checkpoint.spec().num_params(), job.resident_f32_bytes);
  report.sample_mode = options.keep_layers_resident ? "greedy" : "teacher-forced";
  // The text a teacher-forced sample is scored on: the prompt, then (for the default prompt) the
  // held-out tokens that follow it.
  std::vector<std::int32_t> text = prompt;
  if (!job.prompt) {
    const auto& first = windows.front();
    text.insert(text.end(), first.begin() + static_cast<std::int64_t>(prompt.size()),
                first.begin() +
                    std::min<std::int64_t>(
                        job.seqlen, static_cast<std::int64_t>(prompt.size()) + job.sample_tokens));
  }
  if (!job.work.empty()) {
    std::int64_t rows = 0;
    for (const std::vector<std::int32_t>& window : windows) {
      rows += static_cast<std::int64_t>(window.size());
    }
    require_disk_space(
        job.work, runtime::ForwardCheckpoint::disk_bytes(rows, checkpoint.config().hidden_size),
        "validate's layer boundaries (--work)");
  }
  const auto& stop = checkpoint.config().eos_token_ids;
  const auto sample = [&](runtime::Model& model) {
    if (options.keep_layers_resident) {
      return runtime::greedy_generate(model, prompt, job.sample_tokens, stop);
    }
    return teacher_forced_predictions(model, text, job.prompt ? 0 : prompt.size() - 1);
  };

  // The pre-export measurement's batching (the batch shapes the GEMM arithmetic), so that a
  // checkpoint that decodes to the measured weights reproduces the measured figures exactly. The
  // reference runs once, alone in memory: its held-out pass is kept as runtime::ReferenceLogits
  // (final hidden states and lm_head, not every logit) and scores the checkpoint afterwards.
  std::unique_ptr<runtime::ReferenceLogits> reference_logits;
  {
    runtime::CheckpointModel reference(job.reference, options);
    PQ_CHECK(reference.model().config().vocab_size == checkpoint.config().vocab_size,
             "reference {} has vocab size {}, the checkpoint {}", job.reference.string(),
             reference.model().config().vocab_size, checkpoint.config().vocab_size);
    const auto pass = resumable_pass(job, "reference", job.reference, windows);
    reference_logits = std::make_unique<runtime::ReferenceLogits>(
        reference.model(), runtime::ReferenceLogits::Keep::kHeadInputs, windows,
        runtime::kEvalWindowsPerPass, pointer(pass));
    report.reference_sample = sample_text(text_of, sample(reference.model()));
  }

  const DecodedCheckpointWeightSource decoded(checkpoint);
  const CheckpointActivationQuantizer activations(checkpoint, job.serve_on);
  report.activation_quantized_linears = static_cast<std::int64_t>(activations.size());
  runtime::RuntimeOptions model_options = options;
  if (activations.size() > 0) model_options.activation_quantizer = &activations;
  runtime::Model model(checkpoint.config(), decoded, model_options);
  const auto pass = resumable_pass(job, "checkpoint", job.checkpoint, windows);
  const runtime::EvalResult compared = runtime::evaluate(model, *reference_logits, pointer(pass));
  report.windows = compared.windows;
  report.predictions = compared.predictions;
  report.mean_kl = compared.mean_kl();
  report.top1_agreement = compared.top1_agreement();
  report.perplexity = compared.perplexity();
  report.reference_perplexity = reference_logits->self().perplexity();
  report.sample = sample_text(text_of, sample(model));
  report.failures = gate_failures(report, job.gates);

  if (!checkpoint.kv_cache_scales().empty()) {
    const runtime::Fp8KvCache kv_cache(checkpoint.kv_cache_scales());
    runtime::RuntimeOptions kv_options = model_options;
    kv_options.kv_cache = &kv_cache;
    runtime::Model kv_model(checkpoint.config(), decoded, kv_options);
    const auto kv_pass = resumable_pass(job, "fp8-kv-cache", job.checkpoint, windows);
    const runtime::EvalResult with_kv =
        runtime::evaluate(kv_model, *reference_logits, pointer(kv_pass));
    ValidateReport::KvCacheFigures kv;
    kv.layers = static_cast<std::int64_t>(kv_cache.layers().size());
    kv.min_scale = std::numeric_limits<float>::infinity();
    for (const auto& [layer, scales] : kv_cache.layers()) {
      kv.min_scale = std::min({kv.min_scale, scales.key, scales.value});
      kv.max_scale = std::max({kv.max_scale, scales.key, scales.value});
    }
    kv.mean_kl = with_kv.mean_kl();
    kv.top1_agreement = with_kv.top1_agreement();
    kv.perplexity = with_kv.perplexity();
    report.fp8_kv_cache = kv;
    ValidateReport as_served = report;
    as_served.mean_kl = kv.mean_kl;
    as_served.top1_agreement = kv.top1_agreement;
    as_served.perplexity = kv.perplexity;
    for (const std::string& failure : gate_failures(as_served, job.gates)) {
      report.failures.push_back("with the FP8 KV cache: " + failure);
    }
  }
  if (!job.work.empty()) {
    // The passes' directories, then the work directory itself if that left it empty.
    std::error_code error;
    for (const char* role : kPassRoles) fs::remove_all(job.work / role, error);
    fs::remove(job.work, error);
  }
  return report;
}

void write_report(const fs::path& path, const ValidateReport& report) {
  write_text_file_atomic(path, report.to_json().dump(2) + "\n");
}

}  // namespace pq::validate
