// Held-out measurement of an assignment before export.
#include "pipeline/measure.h"

#include "data/token_dataset.h"
#include "probe/fingerprint.h"
#include "runtime/forward_checkpoint.h"
#include "runtime/model.h"
#include "tokenizer/tokenizer.h"
#include "validate/validate.h"

namespace pq::pipeline {

std::vector<std::vector<std::int32_t>> heldout_windows(const std::filesystem::path& model_dir,
                                                       const std::filesystem::path& data,
                                                       bool token_ids, std::size_t count,
                                                       std::size_t seqlen) {
  return validate::heldout_windows(
      data::load_token_dataset(data, token_ids, model_dir, std::nullopt),
      static_cast<std::int64_t>(seqlen), static_cast<std::int64_t>(count));
}

exporter::MeasuredQuality measure_assignment(const model::ModelConfig& config,
                                             const io::Checkpoint& source,
                                             const exporter::LinearEncoder& encoder,
                                             const std::map<std::string, std::string>& format_of,
                                             const runtime::ReferenceLogits& reference,
                                             const runtime::Fp8KvCache* kv_cache,
                                             const std::filesystem::path& resume_dir) {
  // Layers stream (memory about one layer): evaluate's single pass renders, or reads from the
  // render cache, each Linear once.
  const exporter::EncodedLinears quantized(encoder, format_of);
  const runtime::CheckpointWeightSource weights(source);
  const auto run = [&](const runtime::Fp8KvCache* cache) {
    runtime::Model model(
        config, weights,
        {.weight_transform = &quantized, .activation_quantizer = &quantized, .kv_cache = cache});
    if (resume_dir.empty()) return runtime::evaluate(model, reference);
    probe::Fingerprint f;
    f.field("pass", "measure-assignment/1");
    f.field("encoder", encoder.fingerprint());
    for (const auto& [linear, format] : format_of) f.field(linear, format);
    f.field("fp8_kv_cache", cache != nullptr ? 1 : 0);
    f.field("windows_per_pass", static_cast<std::uint64_t>(reference.windows_per_pass()));
    f.token_windows(reference.windows());
    const runtime::ForwardCheckpoint resume(
        resume_dir / (cache != nullptr ? "fp8-kv-cache" : "bf16-kv-cache"), f.hex());
    return runtime::evaluate(model, reference, &resume);
  };
  const runtime::EvalResult result = run(nullptr);
  exporter::MeasuredQuality quality;
  quality.windows = result.windows;
  quality.seqlen = static_cast<std::int64_t>(reference.windows().front().size());
  quality.predictions = result.predictions;
  quality.mean_kl = result.mean_kl();
  quality.perplexity = result.perplexity();
  quality.source_perplexity = reference.self().perplexity();
  quality.top1_agreement = result.top1_agreement();
  quality.prediction_nll = result.prediction_nll;
  quality.source_prediction_nll = reference.self().prediction_nll;
  if (kv_cache != nullptr) {
    const runtime::EvalResult with_kv = run(kv_cache);
    quality.fp8_kv_cache = exporter::KvCacheQuality{.mean_kl = with_kv.mean_kl(),
                                                    .perplexity = with_kv.perplexity(),
                                                    .top1_agreement = with_kv.top1_agreement()};
  }
  return quality;
}

runtime::ForwardCheckpoint reference_pass(const std::filesystem::path& dir,
                                          const std::filesystem::path& model_dir,
                                          std::span<const std::vector<std::int32_t>> windows) {
  probe::Fingerprint f;
  f.field("pass", "measure-reference/1");
  f.checkpoint(model_dir);
  f.field("windows_per_pass", static_cast<std::uint64_t>(runtime::kEvalWindowsPerPass));
  f.token_windows(windows);
  return runtime::ForwardCheckpoint(dir, f.hex());
}

}  // namespace pq::pipeline
