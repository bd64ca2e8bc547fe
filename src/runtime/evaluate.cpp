#include "runtime/evaluate.h"

#include <algorithm>
#include <cmath>

#include "common/error.h"

namespace pq::runtime {

namespace {

// log_softmax of one row into `out`, in double for the KL sums.
void log_softmax(const float* logits, std::int64_t vocab, std::vector<double>& out) {
  out.resize(vocab);
  const float max_logit = *std::max_element(logits, logits + vocab);
  double sum = 0.0;
  for (std::int64_t v = 0; v < vocab; ++v)
    sum += std::exp(static_cast<double>(logits[v]) - max_logit);
  const double log_sum = std::log(sum) + max_logit;
  for (std::int64_t v = 0; v < vocab; ++v) out[v] = logits[v] - log_sum;
}

std::int64_t arg_max(const float* logits, std::int64_t vocab) {
  return std::max_element(logits, logits + vocab) - logits;
}

// Adds the next-token predictions of one window's logits [rows, vocab] to `result`; with reference
// logits of the same window, also their KL and top-1 agreement. The one place predictions are
// scored, so every evaluation path gives the same numbers for the same logits.
void score_window(std::span<const std::int32_t> tokens, const float* logits, std::int64_t rows,
                  const float* reference_logits, std::int64_t vocab, EvalResult& result) {
  std::vector<double> log_p, log_q;
  for (std::int64_t t = 0; t + 1 < rows; ++t) {
    const float* z = logits + t * vocab;
    log_softmax(z, vocab, log_q);
    result.nll_sum -= log_q[tokens[t + 1]];
    if (reference_logits != nullptr) {
      const float* zr = reference_logits + t * vocab;
      log_softmax(zr, vocab, log_p);
      double kl = 0.0;
      for (std::int64_t v = 0; v < vocab; ++v) kl += std::exp(log_p[v]) * (log_p[v] - log_q[v]);
      result.kl_sum += kl;
      result.top1_agreements += arg_max(z, vocab) == arg_max(zr, vocab);
    }
    ++result.predictions;
  }
}

// Runs `model` over the windows, `windows_per_pass` at a time, handing each window's logits to
// `consume(window index, logits, rows)`.
template <typename Consumer>
void forward_windows(Model& model, std::span<const std::vector<std::int32_t>> windows,
                     std::int64_t windows_per_pass, const Consumer& consume) {
  PQ_CHECK(windows_per_pass > 0, "windows per pass must be positive");
  for (std::size_t first = 0; first < windows.size(); first += windows_per_pass) {
    const std::size_t last = std::min(windows.size(), first + windows_per_pass);
    std::vector<Sequence> batch;
    for (std::size_t w = first; w < last; ++w) batch.push_back({windows[w], {}});
    model.forward(batch, [&](std::int64_t s, const float* logits, std::int64_t rows) {
      consume(first + static_cast<std::size_t>(s), logits, rows);
    });
  }
}

}  // namespace

std::vector<std::vector<std::int32_t>> token_windows(std::span<const std::int32_t> tokens,
                                                     std::int64_t length,
                                                     std::int64_t max_windows) {
  PQ_CHECK(length >= 2, "window length {} is too short: need at least 2 tokens", length);
  std::int64_t count = static_cast<std::int64_t>(tokens.size()) / length;
  if (max_windows > 0) count = std::min(count, max_windows);
  PQ_CHECK(count > 0, "{} tokens do not fill one window of {} tokens", tokens.size(), length);
  std::vector<std::vector<std::int32_t>> windows;
  for (std::int64_t w = 0; w < count; ++w) {
    windows.emplace_back(tokens.begin() + w * length, tokens.begin() + (w + 1) * length);
  }
  return windows;
}

double EvalResult::perplexity() const {
  return std::exp(mean_nll());
}

EvalResult evaluate(Model& model, std::span<const std::vector<std::int32_t>> windows,
                    Model* reference, std::int64_t windows_per_pass) {
  PQ_CHECK(windows_per_pass > 0, "windows per pass must be positive");
  const std::int64_t vocab = model.config().vocab_size;
  PQ_CHECK(reference == nullptr || reference->config().vocab_size == vocab,
           "reference model has vocab size {}, the model {}",
           reference == nullptr ? 0 : reference->config().vocab_size, vocab);
  EvalResult result;
  for (std::size_t first = 0; first < windows.size(); first += windows_per_pass) {
    const std::size_t last = std::min(windows.size(), first + windows_per_pass);
    const auto pass = windows.subspan(first, last - first);
    // The reference's logits of the whole pass, kept until the model's arrive.
    std::vector<std::vector<float>> reference_logits(pass.size());
    if (reference != nullptr) {
      forward_windows(*reference, pass, windows_per_pass,
                      [&](std::size_t w, const float* logits, std::int64_t rows) {
                        reference_logits[w].assign(logits, logits + rows * vocab);
                      });
    }
    forward_windows(model, pass, windows_per_pass,
                    [&](std::size_t w, const float* logits, std::int64_t rows) {
                      score_window(pass[w], logits, rows,
                                   reference ? reference_logits[w].data() : nullptr, vocab, result);
                    });
    result.windows += static_cast<std::int64_t>(pass.size());
  }
  PQ_CHECK(result.predictions > 0, "nothing to evaluate: no window has two tokens");
  return result;
}

ReferenceLogits::ReferenceLogits(Model& reference, std::vector<std::vector<std::int32_t>> windows,
                                 std::int64_t windows_per_pass)
    : windows_(std::move(windows)),
      vocab_(reference.config().vocab_size),
      windows_per_pass_(windows_per_pass),
      logits_(windows_.size()) {
  forward_windows(reference, windows_, windows_per_pass_,
                  [&](std::size_t w, const float* logits, std::int64_t rows) {
                    logits_[w].assign(logits, logits + rows * vocab_);
                    score_window(windows_[w], logits, rows, nullptr, vocab_, self_);
                  });
  self_.windows = static_cast<std::int64_t>(windows_.size());
  PQ_CHECK(self_.predictions > 0, "nothing to evaluate: no window has two tokens");
}

EvalResult evaluate(Model& model, const ReferenceLogits& reference) {
  PQ_CHECK(model.config().vocab_size == reference.vocab(),
           "reference logits have vocab size {}, the model {}", reference.vocab(),
           model.config().vocab_size);
  EvalResult result;
  forward_windows(model, reference.windows(), reference.windows_per_pass(),
                  [&](std::size_t w, const float* logits, std::int64_t rows) {
                    score_window(reference.windows()[w], logits, rows, reference.logits(w).data(),
                                 reference.vocab(), result);
                  });
  result.windows = static_cast<std::int64_t>(reference.windows().size());
  PQ_CHECK(result.predictions > 0, "nothing to evaluate: no window has two tokens");
  return result;
}

std::vector<std::int32_t> greedy_generate(Model& model, std::span<const std::int32_t> prompt,
                                          std::int64_t new_tokens,
                                          std::span<const std::int64_t> stop_tokens) {
  PQ_CHECK(!prompt.empty(), "generation needs a non-empty prompt");
  const std::int64_t vocab = model.config().vocab_size;
  DecodeState state;
  std::vector<float> logits = model.extend(state, prompt);
  std::int64_t rows = static_cast<std::int64_t>(prompt.size());
  std::vector<std::int32_t> generated;
  for (std::int64_t step = 0; step < new_tokens; ++step) {
    const auto next = static_cast<std::int32_t>(arg_max(logits.data() + (rows - 1) * vocab, vocab));
    generated.push_back(next);
    if (std::find(stop_tokens.begin(), stop_tokens.end(), next) != stop_tokens.end()) break;
    if (step + 1 < new_tokens) {
      logits = model.extend(state, {&next, 1});
      rows = 1;
    }
  }
  return generated;
}

}  // namespace pq::runtime
