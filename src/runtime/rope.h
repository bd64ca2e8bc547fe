#pragma once

#include <cstdint>
#include <vector>

#include "model/config.h"

namespace pq::runtime {

// Rotary position embedding in the Hugging Face "rotate_half" layout: dimension i of a head is
// paired with dimension i + rotary_dim/2 (rotary_dim = head_dim unless partial) (transformers
// modeling_llama.py, rotate_half and apply_rotary_pos_emb). Frequencies follow transformers
// modeling_rope_utils.py for the rope_scaling types ModelConfig accepts.
struct RopeFrequencies {
  std::vector<double> inv_freq;   // [rotary_dim / 2]
  double attention_factor = 1.0;  // multiplies cos and sin (yarn)
};

// Dimensions rotated at the start of each head: head_dim, or head_dim * partial_rotary_factor for
// the hybrid families (Qwen3-Next, Qwen3.5/3.6: the first 64 of 256, facts §5 step 3); pq::Error
// for a partial factor elsewhere or an odd result.
std::int64_t rotary_dim(const model::ModelConfig& config);

// `seq_len` matters only for "dynamic" scaling, which rescales the base once a sequence is longer
// than max_position_embeddings (modeling_rope_utils.py _compute_dynamic_ntk_parameters).
RopeFrequencies rope_frequencies(const model::ModelConfig& config, std::int64_t seq_len);

// Gemma 4's full-attention RoPE (rope_type "proportional", transformers modeling_rope_utils.py
// _compute_proportional_rope_parameters; gemma4-architecture-facts.md §4.3): over the whole
// global_head_dim D, frequency i < int(partial_rotary_factor * D / 2) is theta^(-2i / D) (the
// denominator is D, not the rotated width) and the others are 0, so dims [0, n) pair with
// [D/2, D/2 + n) and the rest pass through. "default" is the same with factor 1.
std::vector<double> gemma4_full_attention_inv_freq(const model::ModelConfig& config);

// cos and sin of position x frequency for positions 0..positions-1.
class RopeTable {
 public:
  RopeTable(const model::ModelConfig& config, std::int64_t positions);
  // Rotate-half over the whole head with these frequencies ([head_dim / 2]; zeros leave their
  // pairs unrotated).
  RopeTable(std::int64_t head_dim, const std::vector<double>& inv_freq, std::int64_t positions);

  std::int64_t positions() const { return positions_; }
  std::int64_t head_dim() const { return head_dim_; }
  // Rotates rows [first_position, first_position + rows) of x [rows, heads * head_dim] in place.
  void apply(float* x, std::int64_t rows, std::int64_t heads, std::int64_t first_position) const;
  // The transpose of apply (its gradient): rotates by the negative angle.
  void apply_backward(float* dx, std::int64_t rows, std::int64_t heads,
                      std::int64_t first_position) const;
  // The interleaved (GPT-J) layout of DeepSeek-V3's rope dims (deepseek_v3-architecture-facts.md
  // §3.1): pair (2i, 2i + 1) rotates by position x frequency i. x points at the first rotary
  // dimension of row 0's head 0; head h of row t starts at x + (t * heads + h) * stride and holds
  // rotary_dim dims.
  void apply_interleaved(float* x, std::int64_t rows, std::int64_t heads, std::int64_t stride,
                         std::int64_t first_position) const;
  void apply_interleaved_backward(float* dx, std::int64_t rows, std::int64_t heads,
                                  std::int64_t stride, std::int64_t first_position) const;

 private:
  void rotate(float* x, std::int64_t rows, std::int64_t heads, std::int64_t first_position,
              float sin_sign) const;
  void rotate_pairs(float* x, std::int64_t rows, std::int64_t heads, std::int64_t stride,
                    std::int64_t first_position, float sin_sign) const;

  std::int64_t positions_ = 0;
  std::int64_t head_dim_ = 0;
  std::int64_t rotary_dim_ = 0;
  std::vector<float> cos_;  // [positions, rotary_dim / 2]
  std::vector<float> sin_;
};

}  // namespace pq::runtime
