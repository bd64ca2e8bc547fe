#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "runtime/model.h"

namespace pq::runtime {

// Consecutive non-overlapping windows of `length` tokens from the start of `tokens` (a shorter
// tail is dropped), at most `max_windows` of them (0: all). Throws pq::Error if not even one fits.
std::vector<std::vector<std::int32_t>> token_windows(std::span<const std::int32_t> tokens,
                                                     std::int64_t length, std::int64_t max_windows);

struct EvalResult {
  std::int64_t windows = 0;
  std::int64_t predictions = 0;  // each window of T tokens scores its T - 1 next-token predictions
  double nll_sum = 0.0;          // natural log
  // Each prediction's NLL in the order they are scored, which is the same for the same windows,
  // so two models' lists pair prediction by prediction (a paired comparison of their losses).
  std::vector<double> prediction_nll;
  // With a reference model: sum over predictions of KL(reference || model) in nats, and how many
  // predictions had the same arg-max token.
  double kl_sum = 0.0;
  std::int64_t top1_agreements = 0;

  double mean_nll() const { return nll_sum / static_cast<double>(predictions); }
  double perplexity() const;
  double mean_kl() const { return kl_sum / static_cast<double>(predictions); }
  double top1_agreement() const {
    return static_cast<double>(top1_agreements) / static_cast<double>(predictions);
  }
};

// Scores every window independently (positions restart at 0) with the arithmetic of one forward
// pass per `windows_per_pass` windows. Alone, the model runs one layer-major pass over all the
// windows (it is read once). With `reference`, also compares each prediction's distribution with
// the reference model's: both models then run group by group, so only one group's reference
// logits are held (ReferenceLogits reads each model once).
EvalResult evaluate(Model& model, std::span<const std::vector<std::int32_t>> windows,
                    Model* reference = nullptr, std::int64_t windows_per_pass = 4);

// Windows per forward pass of the held-out evaluations that must agree bit for bit (quantize's
// pre-export measurement, scout, validate): the batching is part of the arithmetic.
inline constexpr std::int64_t kEvalWindowsPerPass = 4;

// A reference model's logits on a fixed set of windows, computed once so that many candidate
// models (scout's assignments, the pre-export measurement) are compared with it without running
// it again.
//
// Keeping kHeadInputs, it holds only the reference's lm_head inputs (final normed hidden states,
// [tokens, hidden]) and the reference's own lm_head (Model::share_head: the one copy the forward
// pass multiplied, kept after the model is gone), and recomputes the logits of one lm_head block
// at a time with the GEMM call the forward pass made (same rows, same operands), so they are bit
// for bit the forward's logits. Memory: tokens x hidden + vocab x hidden floats, plus one block
// of logits while scoring. Keeping kLogits, it holds every logit: windows x length x vocab floats
// (5 GB for 16 x 512 tokens at a 151936 vocabulary).
class ReferenceLogits {
 public:
  enum class Keep { kHeadInputs, kLogits };
  // With `resume`, the reference's pass is resumable (Model::forward).
  ReferenceLogits(Model& reference, Keep keep, std::vector<std::vector<std::int32_t>> windows,
                  std::int64_t windows_per_pass = kEvalWindowsPerPass,
                  const ForwardCheckpoint* resume = nullptr);
  ~ReferenceLogits();
  ReferenceLogits(const ReferenceLogits&) = delete;
  ReferenceLogits& operator=(const ReferenceLogits&) = delete;

  const std::vector<std::vector<std::int32_t>>& windows() const { return windows_; }
  std::int64_t vocab() const { return vocab_; }
  std::int64_t windows_per_pass() const { return windows_per_pass_; }
  // The reference scored against itself: perplexity (KL 0, top-1 agreement 1).
  const EvalResult& self() const { return self_; }
  // Memory held: hidden states, head weight and stored logits.
  std::uint64_t bytes() const;

  // Reads the logits of window after window, in any order; a cursor holds the block of the last
  // window asked for, recomputed when a window outside it is asked for.
  class Cursor {
   public:
    explicit Cursor(const ReferenceLogits& reference) : reference_(reference) {}
    // [window length, vocab] logits of window w, valid until the next call.
    const float* logits(std::size_t w);

   private:
    const ReferenceLogits& reference_;
    std::size_t block_ = static_cast<std::size_t>(-1);
    std::vector<float> logits_;
  };

 private:
  // The rows of one lm_head call of the reference's forward passes: whole windows.
  struct Block {
    std::size_t first_window = 0, end_window = 0;
    std::vector<std::int64_t> window_rows;  // first row of each window in the block
    std::int64_t rows = 0;
    std::vector<float> hidden;  // [rows, hidden], what the GEMM multiplied
  };
  class HeadInputRecorder;

  void run_reference(Model& reference, const ForwardCheckpoint* resume);
  std::size_t block_of(std::size_t window) const;

  std::vector<std::vector<std::int32_t>> windows_;
  std::int64_t vocab_ = 0;
  std::int64_t windows_per_pass_ = 0;
  std::shared_ptr<const Model::Linear> head_;  // null: logits_ holds every window's logits
  std::vector<Block> blocks_;
  std::vector<std::vector<float>> logits_;
  EvalResult self_;
};

// evaluate() against precomputed reference logits: the same windows, passes and per-prediction
// arithmetic, so the result equals evaluate(model, windows, &reference_model, windows_per_pass)
// bit for bit. With `resume`, the model's pass is resumable (Model::forward); the result is the
// same.
EvalResult evaluate(Model& model, const ReferenceLogits& reference,
                    const ForwardCheckpoint* resume = nullptr);

// Greedy decoding: appends the arg-max token `new_tokens` times (stopping after a token in
// `stop_tokens`), with a key/value cache (Model::extend). Returns only the new tokens; pq::Error
// when the prompt and the new tokens exceed max_position_embeddings (where the config gives it).
std::vector<std::int32_t> greedy_generate(Model& model, std::span<const std::int32_t> prompt,
                                          std::int64_t new_tokens,
                                          std::span<const std::int64_t> stop_tokens = {});

}  // namespace pq::runtime
