// Held-out measurement of an assignment before export.
#include "pipeline/measure.h"

#include "data/token_dataset.h"
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
                                             const runtime::Fp8KvCache* kv_cache) {
  // Layers stream (memory about one layer): evaluate's single pass renders, or reads from the
  // render cache, each Linear once.
  const exporter::EncodedLinears quantized(encoder, format_of);
  const runtime::CheckpointWeightSource weights(source);
  const auto run = [&](const runtime::Fp8KvCache* cache) {
    runtime::Model model(
        config, weights,
        {.weight_transform = &quantized, .activation_quantizer = &quantized, .kv_cache = cache});
    return runtime::evaluate(model, reference);
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

}  // namespace pq::pipeline
