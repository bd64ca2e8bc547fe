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
    result.prediction_nll.push_back(-log_q[tokens[t + 1]]);
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

// Runs `model` over the windows in one layer-major pass (the model is read once) whose
// micro-batches are `windows_per_pass` windows: the arithmetic of one forward pass per group of
// windows. Hands each window's logits to `consume(window index, logits, rows)`; `observer`
// (optional) sees the pass's Linears; `resume` (optional) makes the pass resumable.
template <typename Consumer>
void forward_windows(Model& model, std::span<const std::vector<std::int32_t>> windows,
                     std::int64_t windows_per_pass, const Consumer& consume,
                     LinearObserver* observer = nullptr,
                     const ForwardCheckpoint* resume = nullptr) {
  PQ_CHECK(windows_per_pass > 0, "windows per pass must be positive");
  std::vector<Sequence> batch;
  for (const std::vector<std::int32_t>& window : windows) batch.push_back({window, {}});
  model.forward(
      batch,
      [&](std::int64_t s, const float* logits, std::int64_t rows) {
        consume(static_cast<std::size_t>(s), logits, rows);
      },
      observer, windows_per_pass, resume);
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
  if (reference == nullptr) {
    forward_windows(model, windows, windows_per_pass,
                    [&](std::size_t w, const float* logits, std::int64_t rows) {
                      score_window(windows[w], logits, rows, nullptr, vocab, result);
                    });
    result.windows = static_cast<std::int64_t>(windows.size());
    PQ_CHECK(result.predictions > 0, "nothing to evaluate: no window has two tokens");
    return result;
  }
  // Both models, a group of windows at a time: only one group's reference logits are held.
  for (std::size_t first = 0; first < windows.size(); first += windows_per_pass) {
    const std::size_t last = std::min(windows.size(), first + windows_per_pass);
    const auto pass = windows.subspan(first, last - first);
    // The reference's logits of the whole pass, kept until the model's arrive.
    std::vector<std::vector<float>> reference_logits(pass.size());
    forward_windows(*reference, pass, windows_per_pass,
                    [&](std::size_t w, const float* logits, std::int64_t rows) {
                      reference_logits[w].assign(logits, logits + rows * vocab);
                    });
    forward_windows(
        model, pass, windows_per_pass, [&](std::size_t w, const float* logits, std::int64_t rows) {
          score_window(pass[w], logits, rows, reference_logits[w].data(), vocab, result);
        });
    result.windows += static_cast<std::int64_t>(pass.size());
  }
  PQ_CHECK(result.predictions > 0, "nothing to evaluate: no window has two tokens");
  return result;
}

// Records, during the forward pass over the windows, each lm_head call's input rows and the
// windows they belong to.
class ReferenceLogits::HeadInputRecorder final : public LinearObserver {
 public:
  explicit HeadInputRecorder(std::vector<Block>& blocks) : blocks_(blocks) {}

  void on_linear(const LinearActivity& activity) override {
    if (activity.layer != -1) return;
    Block block;
    block.first_window = static_cast<std::size_t>(activity.sequences.front().sequence);
    block.end_window = static_cast<std::size_t>(activity.sequences.back().sequence) + 1;
    for (const RowRange& range : activity.sequences) block.window_rows.push_back(range.begin);
    block.rows = activity.rows;
    block.hidden.assign(activity.input, activity.input + activity.rows * activity.in_features);
    blocks_.push_back(std::move(block));
  }

 private:
  std::vector<Block>& blocks_;
};

ReferenceLogits::ReferenceLogits(Model& reference, Keep keep,
                                 std::vector<std::vector<std::int32_t>> windows,
                                 std::int64_t windows_per_pass, const ForwardCheckpoint* resume)
    : windows_(std::move(windows)),
      vocab_(reference.config().vocab_size),
      windows_per_pass_(windows_per_pass) {
  // Taken before the pass, which then multiplies this copy: lm_head is loaded once.
  if (keep == Keep::kHeadInputs) {
    head_ = reference.share_head();
  } else {
    logits_.resize(windows_.size());
  }
  run_reference(reference, resume);
}

ReferenceLogits::~ReferenceLogits() = default;

void ReferenceLogits::run_reference(Model& reference, const ForwardCheckpoint* resume) {
  HeadInputRecorder recorder(blocks_);
  forward_windows(
      reference, windows_, windows_per_pass_,
      [&](std::size_t w, const float* logits, std::int64_t rows) {
        score_window(windows_[w], logits, rows, nullptr, vocab_, self_);
        if (!head_) logits_[w].assign(logits, logits + rows * vocab_);
      },
      head_ ? &recorder : nullptr, resume);
  self_.windows = static_cast<std::int64_t>(windows_.size());
  PQ_CHECK(self_.predictions > 0, "nothing to evaluate: no window has two tokens");
}

std::size_t ReferenceLogits::block_of(std::size_t window) const {
  const auto it = std::upper_bound(blocks_.begin(), blocks_.end(), window,
                                   [](std::size_t w, const Block& b) { return w < b.end_window; });
  PQ_CHECK(it != blocks_.end() && it->first_window <= window,
           "reference logits: no lm_head block holds window {}", window);
  return static_cast<std::size_t>(it - blocks_.begin());
}

std::uint64_t ReferenceLogits::bytes() const {
  std::uint64_t total = head_ ? Model::weight_bytes(*head_) : 0;
  for (const Block& block : blocks_) total += block.hidden.size() * sizeof(float);
  for (const auto& logits : logits_) total += logits.size() * sizeof(float);
  return total;
}

const float* ReferenceLogits::Cursor::logits(std::size_t w) {
  if (!reference_.head_) return reference_.logits_[w].data();
  const std::size_t b = reference_.block_of(w);
  const Block& block = reference_.blocks_[b];
  const std::int64_t row = block.window_rows[w - block.first_window];
  if (b != block_) {
    logits_.resize(block.rows * reference_.vocab_);
    Model::head_logits(*reference_.head_, block.hidden.data(), block.rows, logits_.data());
    block_ = b;
  }
  return logits_.data() + row * reference_.vocab_;
}

EvalResult evaluate(Model& model, const ReferenceLogits& reference,
                    const ForwardCheckpoint* resume) {
  PQ_CHECK(model.config().vocab_size == reference.vocab(),
           "reference logits have vocab size {}, the model {}", reference.vocab(),
           model.config().vocab_size);
  EvalResult result;
  ReferenceLogits::Cursor cursor(reference);
  forward_windows(
      model, reference.windows(), reference.windows_per_pass(),
      [&](std::size_t w, const float* logits, std::int64_t rows) {
        score_window(reference.windows()[w], logits, rows, cursor.logits(w), reference.vocab(),
                     result);
      },
      nullptr, resume);
  result.windows = static_cast<std::int64_t>(reference.windows().size());
  PQ_CHECK(result.predictions > 0, "nothing to evaluate: no window has two tokens");
  return result;
}

std::vector<std::int32_t> greedy_generate(Model& model, std::span<const std::int32_t> prompt,
                                          std::int64_t new_tokens,
                                          std::span<const std::int64_t> stop_tokens) {
  PQ_CHECK(!prompt.empty(), "generation needs a non-empty prompt");
  // Positions past max_position_embeddings are ones the model never saw; and a prompt that long
  // (a tokenizer.json can make a few words into 100,000 tokens) would cost a quadratic attention
  // pass before the first token.
  const std::int64_t context = model.config().max_position_embeddings;
  const auto length = static_cast<std::int64_t>(prompt.size()) + new_tokens;
  PQ_CHECK(context == 0 || length <= context,
           "a prompt of {} tokens and {} new tokens exceed the model's context "
           "(max_position_embeddings {})",
           prompt.size(), new_tokens, context);
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
