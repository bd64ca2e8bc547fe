#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "model/config.h"
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

// Measures quantized variants of one model against its source on fixed held-out windows. The
// source model's log-probabilities are computed once, in the constructor, and kept in float32
// (windows * (seqlen - 1) * vocab values), so each measurement costs one forward pass of the
// quantized model. KL terms are accumulated in double.
class KlEvaluator {
 public:
  // `source` must outlive the evaluator. Windows must all have the same length (>= 2).
  KlEvaluator(model::ModelConfig config, const runtime::WeightSource& source,
              std::vector<std::vector<std::int32_t>> windows, std::int64_t windows_per_pass = 4);

  // The model whose Linears run with `weights` and `activations` (either may be null: the source
  // weight, no activation quantization).
  KlMeasurement measure(const runtime::WeightTransform* weights,
                        const runtime::ActivationQuantizer* activations) const;

  const model::ModelConfig& config() const { return config_; }
  std::size_t windows() const { return windows_.size(); }
  std::int64_t window_length() const { return window_length_; }
  // The reference's NLL per prediction (nats).
  double reference_nll() const { return reference_nll_; }
  std::uint64_t reference_bytes() const { return reference_log_probs_.size() * sizeof(float); }

 private:
  std::size_t row_offset(std::size_t window, std::int64_t position) const;

  model::ModelConfig config_;
  const runtime::WeightSource& source_;
  std::vector<std::vector<std::int32_t>> windows_;
  std::int64_t window_length_ = 0;
  std::int64_t windows_per_pass_ = 4;
  // log p_reference per (window, position < length - 1, token).
  std::vector<float> reference_log_probs_;
  std::vector<std::int32_t> reference_top1_;  // per (window, position)
  double reference_nll_ = 0.0;
};

}  // namespace pq::scout
