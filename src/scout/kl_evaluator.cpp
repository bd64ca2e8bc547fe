#include "scout/kl_evaluator.h"

#include <algorithm>
#include <cmath>

#include "common/error.h"
#include "runtime/model.h"

namespace pq::scout {

namespace {

// log(sum(exp(row))) in double, stable for any logits.
double log_sum_exp(const float* row, std::int64_t vocab) {
  const float peak = *std::max_element(row, row + vocab);
  double sum = 0.0;
  for (std::int64_t v = 0; v < vocab; ++v) sum += std::exp(static_cast<double>(row[v] - peak));
  return std::log(sum) + peak;
}

std::int32_t arg_max(const float* row, std::int64_t vocab) {
  return static_cast<std::int32_t>(std::max_element(row, row + vocab) - row);
}

// Runs `model` over `windows`, `per_pass` windows per forward pass, handing each window's logits
// to `consume(window, logits)`.
template <typename Consume>
void for_each_window_logits(runtime::Model& model,
                            const std::vector<std::vector<std::int32_t>>& windows,
                            std::int64_t per_pass, Consume&& consume) {
  for (std::size_t first = 0; first < windows.size(); first += static_cast<std::size_t>(per_pass)) {
    const std::size_t last = std::min(windows.size(), first + static_cast<std::size_t>(per_pass));
    std::vector<runtime::Sequence> batch;
    for (std::size_t w = first; w < last; ++w) batch.push_back({windows[w], {}});
    model.forward(batch, [&](std::int64_t s, const float* logits, std::int64_t) {
      consume(first + static_cast<std::size_t>(s), logits);
    });
  }
}

}  // namespace

KlEvaluator::KlEvaluator(model::ModelConfig config, const runtime::WeightSource& source,
                         std::vector<std::vector<std::int32_t>> windows,
                         std::int64_t windows_per_pass)
    : config_(std::move(config)),
      source_(source),
      windows_(std::move(windows)),
      windows_per_pass_(windows_per_pass) {
  PQ_CHECK(!windows_.empty(), "scout: no held-out windows to measure KL on");
  PQ_CHECK(windows_per_pass_ > 0, "scout: windows per pass must be positive");
  window_length_ = static_cast<std::int64_t>(windows_.front().size());
  PQ_CHECK(window_length_ >= 2, "scout: held-out windows need at least 2 tokens");
  for (const auto& window : windows_) {
    PQ_CHECK(static_cast<std::int64_t>(window.size()) == window_length_,
             "scout: held-out windows differ in length ({} and {})", window.size(), window_length_);
  }
  const std::int64_t vocab = config_.vocab_size;
  const std::size_t rows = windows_.size() * static_cast<std::size_t>(window_length_ - 1);
  reference_log_probs_.resize(rows * static_cast<std::size_t>(vocab));
  reference_top1_.resize(rows);

  runtime::Model reference(config_, source_);
  double nll_sum = 0.0;
  for_each_window_logits(
      reference, windows_, windows_per_pass_, [&](std::size_t w, const float* logits) {
        const auto& tokens = windows_[w];
#pragma omp parallel for reduction(+ : nll_sum) schedule(static)
        for (std::int64_t t = 0; t < window_length_ - 1; ++t) {
          const float* z = logits + t * vocab;
          const double lse = log_sum_exp(z, vocab);
          float* out =
              reference_log_probs_.data() + row_offset(w, t) * static_cast<std::size_t>(vocab);
          for (std::int64_t v = 0; v < vocab; ++v) out[v] = static_cast<float>(z[v] - lse);
          reference_top1_[row_offset(w, t)] = arg_max(z, vocab);
          nll_sum -= out[tokens[static_cast<std::size_t>(t) + 1]];
        }
      });
  reference_nll_ = nll_sum / static_cast<double>(rows);
}

std::size_t KlEvaluator::row_offset(std::size_t window, std::int64_t position) const {
  return window * static_cast<std::size_t>(window_length_ - 1) + static_cast<std::size_t>(position);
}

KlMeasurement KlEvaluator::measure(const runtime::WeightTransform* weights,
                                   const runtime::ActivationQuantizer* activations) const {
  runtime::RuntimeOptions options;
  options.weight_transform = weights;
  options.activation_quantizer = activations;
  runtime::Model model(config_, source_, options);
  const std::int64_t vocab = config_.vocab_size;
  double kl_sum = 0.0;
  double nll_sum = 0.0;
  std::int64_t agreements = 0;
  for_each_window_logits(
      model, windows_, windows_per_pass_, [&](std::size_t w, const float* logits) {
        const auto& tokens = windows_[w];
#pragma omp parallel for reduction(+ : kl_sum, nll_sum, agreements) schedule(static)
        for (std::int64_t t = 0; t < window_length_ - 1; ++t) {
          const float* z = logits + t * vocab;
          const double lse = log_sum_exp(z, vocab);
          const float* log_p =
              reference_log_probs_.data() + row_offset(w, t) * static_cast<std::size_t>(vocab);
          // KL(p || q) = sum_v p_v (log p_v - log q_v), log q_v = z_v - lse.
          double kl = 0.0;
          for (std::int64_t v = 0; v < vocab; ++v) {
            const double lp = log_p[v];
            kl += std::exp(lp) * (lp - (static_cast<double>(z[v]) - lse));
          }
          kl_sum += kl;
          nll_sum += lse - z[tokens[static_cast<std::size_t>(t) + 1]];
          agreements += arg_max(z, vocab) == reference_top1_[row_offset(w, t)] ? 1 : 0;
        }
      });
  KlMeasurement m;
  m.predictions = static_cast<std::int64_t>(windows_.size()) * (window_length_ - 1);
  m.kl = kl_sum / static_cast<double>(m.predictions);
  m.nll = nll_sum / static_cast<double>(m.predictions);
  m.top1_agreement = static_cast<double>(agreements) / static_cast<double>(m.predictions);
  return m;
}

}  // namespace pq::scout
