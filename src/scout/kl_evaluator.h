#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "model/config.h"
#include "runtime/evaluate.h"
#include "runtime/weights.h"

namespace pq::scout {

// How far a model's next-token distributions are from the reference model's on the held-out
// windows: mean forward KL(reference || model) per prediction in nats, the model's own mean
// negative log-likelihood of the text, and how often both predict the same arg-max token.
struct KlMeasurement {
  double kl = 0.0;
  double nll = 0.0;
  double top1_agreement = 0.0;
  std::int64_t predictions = 0;
};

// Measures quantized variants of one model against its source on fixed held-out windows, with the
// runtime's evaluation (runtime::ReferenceLogits + runtime::evaluate): the source model runs once,
// in the constructor, and each measurement is one forward pass of the quantized model. Scored by
// the very arithmetic quantize's pre-export measurement and validate use, so a KL scout reports is
// reproduced bit for bit by `prismaquant validate` on the same windows.
class KlEvaluator {
 public:
  // `source` must outlive the evaluator. Windows must all have the same length (>= 2).
  KlEvaluator(model::ModelConfig config, const runtime::WeightSource& source,
              std::vector<std::vector<std::int32_t>> windows,
              std::int64_t windows_per_pass = runtime::kEvalWindowsPerPass);

  // The model whose Linears run with `weights` and `activations` (either may be null: the source
  // weight, no activation quantization).
  KlMeasurement measure(const runtime::WeightTransform* weights,
                        const runtime::ActivationQuantizer* activations) const;

  const model::ModelConfig& config() const { return config_; }
  std::size_t windows() const { return reference_->windows().size(); }
  std::int64_t window_length() const {
    return static_cast<std::int64_t>(reference_->windows().front().size());
  }
  // The reference's NLL per prediction (nats).
  double reference_nll() const { return reference_->self().mean_nll(); }
  // Memory holding the reference's logits (its final hidden states and lm_head weight).
  std::uint64_t reference_bytes() const;

 private:
  model::ModelConfig config_;
  const runtime::WeightSource& source_;
  std::unique_ptr<runtime::ReferenceLogits> reference_;
};

}  // namespace pq::scout
