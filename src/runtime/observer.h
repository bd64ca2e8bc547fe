#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace pq::runtime {

// A block of consecutive rows that all belong to sequence `sequence` of the batch.
struct RowRange {
  std::int64_t begin = 0;
  std::int64_t end = 0;
  std::int64_t sequence = 0;
};

// What one Linear saw during a pass: its input rows X [rows, in_features] (after any activation
// quantizer) and, in a backward pass, the gradient of the loss at its output dY [rows,
// out_features]. For a MoE expert only the rows routed to it appear. The rows are grouped by
// sequence in `sequences`, so per-sequence statistics (||dY_s^T X_s||_F^2) can be formed. A Linear
// may be reported more than once per pass (lm_head: in blocks of whole sequences); row blocks of
// the same sequence are never split across calls.
struct LinearActivity {
  std::string_view name;    // weight name without ".weight": model.layers.0.self_attn.q_proj
  std::int64_t layer = -1;  // decoder layer, -1 for lm_head
  std::int64_t rows = 0;
  std::int64_t in_features = 0;
  std::int64_t out_features = 0;
  const float* input = nullptr;
  const float* output_grad = nullptr;  // nullptr in forward-only passes
  std::span<const RowRange> sequences;
};

// Router decisions of one MoE layer for every token of the batch.
struct RoutingActivity {
  std::int64_t layer = 0;
  std::int64_t tokens = 0;
  std::int64_t num_experts = 0;
  std::int64_t top_k = 0;
  // [tokens, num_experts], the router scores: softmax of the logits, or their sigmoid
  // (MiniMax-M2, before the selection bias)
  const float* probabilities = nullptr;
  const std::int32_t* experts = nullptr;  // [tokens, top_k], chosen experts, best first
  const float* weights = nullptr;         // [tokens, top_k], mixing weights actually used
  std::span<const std::int64_t> expert_token_counts;  // [num_experts]
  std::span<const RowRange> sequences;
};

// What one attention layer stores in its key/value cache for every row of the batch: keys after the
// k norm and RoPE and values (after Gemma 4's v norm), [rows, KV heads * head_dim] each, before any
// KV cache quantizer (RuntimeOptions::kv_cache). The probe takes the FP8 KV cache scales from their
// amax.
struct KvCacheActivity {
  std::int64_t layer = 0;
  std::int64_t rows = 0;
  // The layer's KV heads * head_dim: num_key_value_heads * head_dim, or on Gemma 4 that of the
  // layer's type (ModelConfig::attention_key_value_heads, attention_head_dim).
  std::int64_t width = 0;
  const float* keys = nullptr;
  const float* values = nullptr;
};

// Receives activations and gradients as the runtime produces them. Calls come from one thread;
// the pointers are valid only during the call.
class LinearObserver {
 public:
  virtual ~LinearObserver() = default;
  virtual void on_linear(const LinearActivity& activity) = 0;
  virtual void on_routing(const RoutingActivity& routing) {}
  virtual void on_kv_cache(const KvCacheActivity& kv) {}
};

// Accumulates dL/dW = sum over calls of dY^T X for every Linear of a backward pass (float32
// [out_features, in_features], keyed by the Linear's name). For a tied lm_head the entry holds
// only the head's share of the embedding gradient.
class WeightGradientCollector final : public LinearObserver {
 public:
  void on_linear(const LinearActivity& activity) override;
  const std::map<std::string, std::vector<float>, std::less<>>& gradients() const {
    return gradients_;
  }

 private:
  std::map<std::string, std::vector<float>, std::less<>> gradients_;
};

}  // namespace pq::runtime
