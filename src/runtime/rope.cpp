#include "runtime/rope.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "common/error.h"
#include "runtime/ops.h"

namespace pq::runtime {

namespace {

std::vector<double> default_inv_freq(double base, std::int64_t dim) {
  // inv_freq[i] = 1 / base^(2i / dim)  (_compute_default_rope_parameters)
  std::vector<double> inv_freq(dim / 2);
  for (std::int64_t i = 0; i < dim / 2; ++i) {
    inv_freq[i] = 1.0 / std::pow(base, static_cast<double>(2 * i) / static_cast<double>(dim));
  }
  return inv_freq;
}

// _compute_llama3_parameters: wavelengths longer than original_max / low_freq_factor are divided
// by `factor`, shorter than original_max / high_freq_factor kept, the band between interpolated.
void apply_llama3(const model::RopeScaling& s, std::vector<double>& inv_freq,
                  const std::string& label) {
  PQ_CHECK(s.original_max_position_embeddings > 0 && s.high_freq_factor > s.low_freq_factor,
           "{}: llama3 rope_scaling needs original_max_position_embeddings and "
           "high_freq_factor > low_freq_factor",
           label);
  const double old_context = static_cast<double>(s.original_max_position_embeddings);
  const double low_freq_wavelen = old_context / s.low_freq_factor;
  const double high_freq_wavelen = old_context / s.high_freq_factor;
  for (double& f : inv_freq) {
    const double wavelen = 2.0 * std::numbers::pi / f;
    if (wavelen > low_freq_wavelen) {
      f = f / s.factor;
    } else if (wavelen >= high_freq_wavelen) {
      const double smooth =
          (old_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      f = (1.0 - smooth) * f / s.factor + smooth * f;
    }
  }
}

// _compute_yarn_parameters (transformers 4.5x): blend of interpolated (divided by factor) and
// extrapolated frequencies with a linear ramp over the dimensions between the correction range
// given by beta_fast/beta_slow; cos/sin are scaled by attention_factor.
double apply_yarn(const model::ModelConfig& c, std::int64_t dim, std::vector<double>& inv_freq) {
  const model::RopeScaling& s = c.rope_scaling;
  double factor = s.factor;
  double original_max = static_cast<double>(c.max_position_embeddings);
  if (s.original_max_position_embeddings > 0) {
    // DeepSeek-style configs: the ratio of the two context lengths replaces `factor`.
    original_max = static_cast<double>(s.original_max_position_embeddings);
    factor = static_cast<double>(c.max_position_embeddings) / original_max;
  }
  const auto get_mscale = [](double scale, double mscale) {
    return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
  };
  double attention_factor;
  if (s.attention_factor.has_value()) {
    attention_factor = *s.attention_factor;
  } else if (s.mscale.value_or(0.0) != 0.0 && s.mscale_all_dim.value_or(0.0) != 0.0) {
    attention_factor = get_mscale(factor, *s.mscale) / get_mscale(factor, *s.mscale_all_dim);
  } else {
    attention_factor = get_mscale(factor, 1.0);
  }
  const double base = c.rope_theta;
  const auto correction_dim = [&](double rotations) {
    return (static_cast<double>(dim) *
            std::log(original_max / (rotations * 2.0 * std::numbers::pi))) /
           (2.0 * std::log(base));
  };
  double low = correction_dim(s.beta_fast);
  double high = correction_dim(s.beta_slow);
  if (s.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;  // the reference's guard against a zero-width ramp
  for (std::size_t i = 0; i < inv_freq.size(); ++i) {
    const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
    const double extrapolation_weight = 1.0 - ramp;
    const double extrapolated = inv_freq[i];
    const double interpolated = inv_freq[i] / factor;
    inv_freq[i] = interpolated * (1.0 - extrapolation_weight) + extrapolated * extrapolation_weight;
  }
  return attention_factor;
}

}  // namespace

std::int64_t rotary_dim(const model::ModelConfig& c) {
  const std::string label = "config.json of " + c.architecture;
  // Only the hybrid families' attention (qwen3_5 facts §5 step 3) and MiniMax-M2's (rotary_dim
  // of head_dim, minimax_m2-architecture-facts.md §3) rotate a leading part of each head;
  // elsewhere a partial factor would silently mean something the runtime does not do.
  const bool partial = c.attn_output_gate || c.linear_attention.has_value() ||
                       c.architecture == "MiniMaxM2ForCausalLM";
  PQ_CHECK(c.partial_rotary_factor == 1.0 || partial,
           "{}: partial_rotary_factor {} is not supported", label, c.partial_rotary_factor);
  // transformers: dim = int(head_dim * partial_rotary_factor).
  const auto dim =
      static_cast<std::int64_t>(static_cast<double>(c.head_dim) * c.partial_rotary_factor);
  PQ_CHECK(dim > 0 && dim % 2 == 0 && dim <= c.head_dim,
           "{}: rotary dimension {} (head_dim {} x partial_rotary_factor {}) must be even and "
           "within the head",
           label, dim, c.head_dim, c.partial_rotary_factor);
  return dim;
}

RopeFrequencies rope_frequencies(const model::ModelConfig& c, std::int64_t seq_len) {
  const std::string label = "config.json of " + c.architecture;
  const std::int64_t dim = rotary_dim(c);
  const model::RopeScaling& s = c.rope_scaling;
  RopeFrequencies r;
  if (s.type == "dynamic") {
    // base * ((factor * L / max_pos) - (factor - 1))^(dim / (dim - 2)), L = max(seq_len, max_pos)
    const double max_pos = static_cast<double>(c.max_position_embeddings);
    PQ_CHECK(max_pos > 0, "{}: dynamic rope_scaling needs max_position_embeddings", label);
    const double length = std::max(static_cast<double>(seq_len), max_pos);
    const double base =
        c.rope_theta * std::pow(s.factor * length / max_pos - (s.factor - 1.0),
                                static_cast<double>(dim) / static_cast<double>(dim - 2));
    r.inv_freq = default_inv_freq(base, dim);
    return r;
  }
  r.inv_freq = default_inv_freq(c.rope_theta, dim);
  if (s.type == "linear") {
    for (double& f : r.inv_freq) f /= s.factor;
  } else if (s.type == "llama3") {
    apply_llama3(s, r.inv_freq, label);
  } else if (s.type == "yarn") {
    r.attention_factor = apply_yarn(c, dim, r.inv_freq);
  }
  return r;
}

std::vector<double> gemma4_full_attention_inv_freq(const model::ModelConfig& config) {
  const model::Gemma4Config& g = *config.gemma4;
  const std::int64_t dim = g.global_head_dim;
  PQ_CHECK(dim % 2 == 0, "global_head_dim {} is odd", dim);
  const auto rotated =
      static_cast<std::int64_t>(g.full_partial_rotary_factor * static_cast<double>(dim) / 2.0);
  std::vector<double> inv_freq = default_inv_freq(g.full_rope_theta, dim);
  for (std::int64_t i = rotated; i < dim / 2; ++i) inv_freq[i] = 0.0;
  return inv_freq;
}

RopeTable::RopeTable(std::int64_t head_dim, const std::vector<double>& inv_freq,
                     std::int64_t positions)
    : positions_(positions), head_dim_(head_dim), rotary_dim_(head_dim) {
  const std::int64_t half = head_dim / 2;
  cos_.resize(positions * half);
  sin_.resize(positions * half);
  for (std::int64_t p = 0; p < positions; ++p) {
    for (std::int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(p) * inv_freq[i];
      cos_[p * half + i] = static_cast<float>(std::cos(angle));
      sin_[p * half + i] = static_cast<float>(std::sin(angle));
    }
  }
}

RopeTable::RopeTable(const model::ModelConfig& config, std::int64_t positions)
    : positions_(positions), head_dim_(config.head_dim), rotary_dim_(rotary_dim(config)) {
  const RopeFrequencies freqs = rope_frequencies(config, positions);
  const std::int64_t half = rotary_dim_ / 2;
  cos_.resize(positions * half);
  sin_.resize(positions * half);
  for (std::int64_t p = 0; p < positions; ++p) {
    for (std::int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(p) * freqs.inv_freq[i];
      cos_[p * half + i] = static_cast<float>(std::cos(angle) * freqs.attention_factor);
      sin_[p * half + i] = static_cast<float>(std::sin(angle) * freqs.attention_factor);
    }
  }
}

void RopeTable::rotate(float* x, std::int64_t rows, std::int64_t heads, std::int64_t first_position,
                       float sin_sign) const {
  const std::int64_t half = rotary_dim_ / 2;
  // out_i = x_i cos - x_{i+half} sin;  out_{i+half} = x_{i+half} cos + x_i sin, over the first
  // rotary_dim dimensions of each head; the rest pass through.
#pragma omp parallel for if (rows * heads * head_dim_ > kParallelElements)
  for (std::int64_t t = 0; t < rows; ++t) {
    const float* cs = cos_.data() + (first_position + t) * half;
    const float* sn = sin_.data() + (first_position + t) * half;
    for (std::int64_t h = 0; h < heads; ++h) {
      float* v = x + (t * heads + h) * head_dim_;
      for (std::int64_t i = 0; i < half; ++i) {
        const float a = v[i];
        const float b = v[i + half];
        const float s = sin_sign * sn[i];
        v[i] = a * cs[i] - b * s;
        v[i + half] = b * cs[i] + a * s;
      }
    }
  }
}

void RopeTable::rotate_pairs(float* x, std::int64_t rows, std::int64_t heads, std::int64_t stride,
                             std::int64_t first_position, float sin_sign) const {
  const std::int64_t half = rotary_dim_ / 2;
  // out_2i = x_2i cos - x_2i+1 sin;  out_2i+1 = x_2i sin + x_2i+1 cos (DeepSeek's complex
  // multiply of view_as_complex pairs, vLLM's rotate_gptj: facts §3.1).
#pragma omp parallel for if (rows * heads * rotary_dim_ > kParallelElements)
  for (std::int64_t t = 0; t < rows; ++t) {
    const float* cs = cos_.data() + (first_position + t) * half;
    const float* sn = sin_.data() + (first_position + t) * half;
    for (std::int64_t h = 0; h < heads; ++h) {
      float* v = x + (t * heads + h) * stride;
      for (std::int64_t i = 0; i < half; ++i) {
        const float a = v[2 * i];
        const float b = v[2 * i + 1];
        const float s = sin_sign * sn[i];
        v[2 * i] = a * cs[i] - b * s;
        v[2 * i + 1] = a * s + b * cs[i];
      }
    }
  }
}

void RopeTable::apply_interleaved(float* x, std::int64_t rows, std::int64_t heads,
                                  std::int64_t stride, std::int64_t first_position) const {
  rotate_pairs(x, rows, heads, stride, first_position, 1.0f);
}

void RopeTable::apply_interleaved_backward(float* dx, std::int64_t rows, std::int64_t heads,
                                           std::int64_t stride, std::int64_t first_position) const {
  rotate_pairs(dx, rows, heads, stride, first_position, -1.0f);
}

void RopeTable::apply(float* x, std::int64_t rows, std::int64_t heads,
                      std::int64_t first_position) const {
  rotate(x, rows, heads, first_position, 1.0f);
}

void RopeTable::apply_backward(float* dx, std::int64_t rows, std::int64_t heads,
                               std::int64_t first_position) const {
  rotate(dx, rows, heads, first_position, -1.0f);
}

}  // namespace pq::runtime
