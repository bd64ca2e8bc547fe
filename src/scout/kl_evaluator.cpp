#include "scout/kl_evaluator.h"

#include "common/error.h"
#include "runtime/model.h"

namespace pq::scout {

KlEvaluator::KlEvaluator(model::ModelConfig config, const runtime::WeightSource& source,
                         std::vector<std::vector<std::int32_t>> windows,
                         std::int64_t windows_per_pass)
    : config_(std::move(config)), source_(source) {
  PQ_CHECK(!windows.empty(), "scout: no held-out windows to measure KL on");
  PQ_CHECK(windows_per_pass > 0, "scout: windows per pass must be positive");
  const std::size_t length = windows.front().size();
  PQ_CHECK(length >= 2, "scout: held-out windows need at least 2 tokens");
  for (const auto& window : windows) {
    PQ_CHECK(window.size() == length, "scout: held-out windows differ in length ({} and {})",
             window.size(), length);
  }
  // Layers stream (memory about one layer): evaluate reads each of them once per measurement.
  runtime::Model reference(config_, source_);
  reference_ = std::make_unique<runtime::ReferenceLogits>(
      reference, runtime::ReferenceLogits::Keep::kHeadInputs, std::move(windows), windows_per_pass);
}

std::uint64_t KlEvaluator::reference_bytes() const {
  return reference_->bytes();
}

KlMeasurement KlEvaluator::measure(const runtime::WeightTransform* weights,
                                   const runtime::ActivationQuantizer* activations) const {
  runtime::Model model(config_, source_,
                       {.weight_transform = weights, .activation_quantizer = activations});
  const runtime::EvalResult result = runtime::evaluate(model, *reference_);
  KlMeasurement m;
  m.predictions = result.predictions;
  m.kl = result.mean_kl();
  m.nll = result.mean_nll();
  m.top1_agreement = result.top1_agreement();
  return m;
}

}  // namespace pq::scout
