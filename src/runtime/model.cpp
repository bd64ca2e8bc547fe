#include "runtime/model.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>

#include "common/error.h"
#include "common/interrupt.h"
#include "common/json_reader.h"
#include "io/dtype.h"
#include "runtime/kernels/attention.h"
#include "runtime/kernels/gemm.h"
#include "runtime/memory_estimate.h"
#include "runtime/ops.h"
#include "runtime/rope.h"

namespace pq::runtime {

// A Linear y = x W^T (+ b), W [out_features, in_features] as Hugging Face stores it.
struct Model::Linear {
  std::string name;  // tensor name without ".weight"
  std::int64_t out_features = 0;
  std::int64_t in_features = 0;
  // float32 values after the weight transform; in bf16 compute mode only their rounded copy
  // weight_bf16 is kept.
  std::vector<float> weight;
  std::vector<std::uint16_t> weight_bf16;
  std::vector<float> bias;  // empty when the Linear has none
};

struct Model::Layer {
  std::int64_t index = 0;
  std::int64_t sliding_window = 0;  // 0: full causal attention
  std::vector<float> input_norm, post_attention_norm, q_norm, k_norm;
  Linear q_proj, k_proj, v_proj, o_proj;
  bool moe = false;
  struct Mlp {
    Linear gate_proj, up_proj, down_proj;
  };
  Mlp mlp;                   // dense layers
  Linear router;             // MoE: mlp.gate
  std::vector<Mlp> experts;  // MoE: mlp.experts.N
};

// Where each sequence's rows sit in the concatenated [rows, hidden] activations.
struct Model::Layout {
  std::vector<std::int64_t> offsets;  // sequences + 1 entries
  std::vector<RowRange> ranges;
  std::vector<std::int64_t> sequence_of_row;
  std::int64_t rows = 0;
  std::int64_t max_length = 0;
  std::shared_ptr<const RopeTable> rope;

  std::int64_t sequences() const { return static_cast<std::int64_t>(ranges.size()); }
  std::int64_t length(std::int64_t s) const { return offsets[s + 1] - offsets[s]; }
};

// Intermediate values of one layer's forward, kept for its backward.
struct Model::LayerTape {
  const float* x = nullptr;           // layer input [rows, hidden], owned by the caller
  std::vector<float> h1, rstd1;       // input_layernorm output and 1/rms
  std::vector<float> q_proj, k_proj;  // q/k projections before the per-head norm (Qwen3)
  std::vector<float> q_rstd, k_rstd;  // per (row, head)
  std::vector<float> q, k, v;         // what attention multiplied (normed, rotated)
  std::vector<float> attn, lse;       // attention output [rows, H*D] and lse [H, T] per seq
  std::vector<float> x2;              // residual stream after attention
  std::vector<float> h2, rstd2;       // post_attention_layernorm output and 1/rms
  struct MlpTape {
    std::vector<float> input, gate, up, act, out;  // input/out: gathered rows (MoE experts)
    std::vector<std::int64_t> rows;                // MoE: token rows routed here, ascending
    std::vector<std::int64_t> slots;               // MoE: which of the top-k choices it was
    std::vector<RowRange> ranges;
  };
  MlpTape mlp;
  std::vector<MlpTape> experts;
  std::vector<float> router_probs;     // [rows, E]
  std::vector<std::int32_t> chosen;    // [rows, k]
  std::vector<float> routing_weights;  // [rows, k]
  // Inputs rewritten by the activation quantizer, per Linear.
  std::map<const Linear*, std::vector<float>> quantized_inputs;
};

namespace {

bool architecture_has_qk_norm(const std::string& arch) {
  // Qwen3Attention applies q_norm/k_norm (RMSNorm over head_dim) before RoPE
  // (transformers models/qwen3/modeling_qwen3.py).
  return arch == "Qwen3ForCausalLM" || arch == "Qwen3MoeForCausalLM";
}

std::vector<RowRange> ranges_of_rows(std::span<const std::int64_t> rows,
                                     std::span<const std::int64_t> sequence_of_row) {
  std::vector<RowRange> ranges;
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const std::int64_t s = sequence_of_row[rows[i]];
    if (ranges.empty() || ranges.back().sequence != s) {
      ranges.push_back({static_cast<std::int64_t>(i), static_cast<std::int64_t>(i) + 1, s});
    } else {
      ranges.back().end = static_cast<std::int64_t>(i) + 1;
    }
  }
  return ranges;
}

void report(LinearObserver* observer, const std::string& name, std::int64_t layer,
            std::int64_t rows, std::int64_t in_features, std::int64_t out_features,
            const float* input, const float* output_grad, std::span<const RowRange> ranges) {
  if (observer == nullptr) return;
  LinearActivity activity;
  activity.name = name;
  activity.layer = layer;
  activity.rows = rows;
  activity.in_features = in_features;
  activity.out_features = out_features;
  activity.input = input;
  activity.output_grad = output_grad;
  activity.sequences = ranges;
  observer->on_linear(activity);
}

}  // namespace

void require_runtime_support(const model::ModelConfig& config) {
  const std::string& arch = config.architecture;
  // The hybrid families' parts (qwen3_5-architecture-facts.md §4, §5, §6.2).
  std::vector<std::string_view> missing;
  if (std::find(config.layer_types.begin(), config.layer_types.end(),
                model::LayerType::kLinearAttention) != config.layer_types.end()) {
    missing.push_back("linear_attention layers");
  }
  if (config.attn_output_gate) missing.push_back("gated attention");
  if (config.shared_expert_intermediate_size > 0) missing.push_back("shared experts");
  if (!missing.empty()) {
    const std::string_view last = missing.back();
    missing.pop_back();
    fail("the runtime does not support the {}{}{} of {} yet", fmt::join(missing, ", "),
         missing.empty() ? "" : " and ", last, quoted_json_string(arch));
  }
  static const std::vector<std::string> kSupported = {"LlamaForCausalLM", "MistralForCausalLM",
                                                      "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                                                      "Qwen3MoeForCausalLM"};
  PQ_CHECK(std::find(kSupported.begin(), kSupported.end(), arch) != kSupported.end(),
           "architecture {} is not supported by the runtime (supported: {})",
           quoted_json_string(arch), fmt::join(kSupported, ", "));
}

Model::Model(model::ModelConfig config, const WeightSource& weights, RuntimeOptions options)
    : config_(std::move(config)), weights_(weights), options_(options) {
  require_runtime_support(config_);
  const std::string& arch = config_.architecture;
  PQ_CHECK(config_.hidden_act == "silu", "{}: hidden_act {} is not supported (only silu)", arch,
           quoted_json_string(config_.hidden_act));
  PQ_CHECK(config_.num_experts == 0 || arch == "Qwen3MoeForCausalLM",
           "{}: num_experts is set but the architecture has no MoE support", arch);
  PQ_CHECK(options_.logits_block_rows > 0, "logits_block_rows must be positive");
  qk_norm_ = architecture_has_qk_norm(arch);

  const std::int64_t hidden = config_.hidden_size;
  check_matrix("model.embed_tokens.weight", config_.vocab_size, hidden);
  final_norm_ = load_vector("model.norm.weight", hidden);
  // A tied head reuses the embedding values (transformers tie_weights); it is still its own
  // Linear so that a weight transform can quantize the head without touching the embedding.
  tied_head_ = config_.tie_word_embeddings && !weights_.contains("lm_head.weight");
  if (!tied_head_) {
    check_matrix("lm_head.weight", config_.vocab_size, hidden);
    PQ_CHECK(!weights_.contains("lm_head.bias"), "lm_head.bias: unexpected bias tensor");
  }
  resident_.resize(config_.num_hidden_layers);
}

Model::~Model() = default;

std::vector<float> Model::load_vector(const std::string& name, std::int64_t size) const {
  PQ_CHECK(weights_.contains(name), "checkpoint has no tensor {}", name);
  const auto shape = weights_.shape(name);
  PQ_CHECK(shape == std::vector<std::int64_t>({size}), "{}: shape [{}], expected [{}]", name,
           fmt::join(shape, ", "), size);
  return fetch(name);
}

void Model::check_matrix(const std::string& name, std::int64_t rows, std::int64_t columns) const {
  PQ_CHECK(weights_.contains(name), "checkpoint has no tensor {}", name);
  const auto shape = weights_.shape(name);
  PQ_CHECK(shape == std::vector<std::int64_t>({rows, columns}), "{}: shape [{}], expected [{}, {}]",
           name, fmt::join(shape, ", "), rows, columns);
}

void Model::load_linear(Linear& linear, const std::string& name, std::int64_t out_features,
                        std::int64_t in_features, bool bias_allowed) const {
  const std::string weight_name = name + ".weight";
  check_matrix(weight_name, out_features, in_features);
  linear.name = name;
  linear.out_features = out_features;
  linear.in_features = in_features;
  linear.weight = fetch(weight_name);
  prepare_linear(linear);
  // Biases are used exactly when the checkpoint has them: Qwen2 always has q/k/v biases,
  // Llama/Qwen3 have them when attention_bias / mlp_bias are set (transformers modeling_*.py).
  const std::string bias_name = name + ".bias";
  if (weights_.contains(bias_name)) {
    PQ_CHECK(bias_allowed, "{}: unexpected bias tensor", bias_name);
    linear.bias = load_vector(bias_name, out_features);
  }
}

void Model::prepare_linear(Linear& linear) const {
  if (options_.weight_transform != nullptr) {
    options_.weight_transform->apply(linear.name, linear.out_features, linear.in_features,
                                     linear.weight);
  }
  if (options_.compute == ComputeType::kBF16) {
    linear.weight_bf16.resize(linear.weight.size());
    convert_f32_to_bf16(linear.weight, linear.weight_bf16);
    linear.weight = {};
  }
}

std::unique_ptr<Model::Layer> Model::load_layer(std::int64_t index) const {
  const model::ModelConfig& c = config_;
  auto layer = std::make_unique<Layer>();
  layer->index = index;
  const std::string prefix = fmt::format("model.layers.{}.", index);
  const std::int64_t hidden = c.hidden_size;
  const std::int64_t q_width = c.num_attention_heads * c.head_dim;
  const std::int64_t kv_width = c.num_key_value_heads * c.head_dim;

  if (c.sliding_window.has_value() && *c.sliding_window > 0) {
    // Qwen2/Qwen3 slide only from layer max_window_layers on (transformers
    // configuration_qwen2.py layer_types); Mistral slides on every layer.
    const bool qwen = c.architecture.rfind("Qwen", 0) == 0;
    const std::int64_t first = qwen ? c.max_window_layers.value_or(c.num_hidden_layers) : 0;
    if (index >= first) layer->sliding_window = *c.sliding_window;
  }

  layer->input_norm = load_vector(prefix + "input_layernorm.weight", hidden);
  layer->post_attention_norm = load_vector(prefix + "post_attention_layernorm.weight", hidden);
  load_linear(layer->q_proj, prefix + "self_attn.q_proj", q_width, hidden, true);
  load_linear(layer->k_proj, prefix + "self_attn.k_proj", kv_width, hidden, true);
  load_linear(layer->v_proj, prefix + "self_attn.v_proj", kv_width, hidden, true);
  load_linear(layer->o_proj, prefix + "self_attn.o_proj", hidden, q_width, true);
  if (qk_norm_) {
    layer->q_norm = load_vector(prefix + "self_attn.q_norm.weight", c.head_dim);
    layer->k_norm = load_vector(prefix + "self_attn.k_norm.weight", c.head_dim);
  }
  const auto load_mlp = [&](Layer::Mlp& mlp, const std::string& mlp_prefix,
                            std::int64_t intermediate) {
    load_linear(mlp.gate_proj, mlp_prefix + "gate_proj", intermediate, hidden, true);
    load_linear(mlp.up_proj, mlp_prefix + "up_proj", intermediate, hidden, true);
    load_linear(mlp.down_proj, mlp_prefix + "down_proj", hidden, intermediate, true);
  };
  layer->moe = c.is_moe_layer(index);
  if (layer->moe) {
    load_linear(layer->router, prefix + "mlp.gate", c.num_experts, hidden, false);
    layer->experts.resize(c.num_experts);
    for (std::int64_t e = 0; e < c.num_experts; ++e) {
      load_mlp(layer->experts[e], fmt::format("{}mlp.experts.{}.", prefix, e),
               c.moe_intermediate_size);
    }
  } else {
    PQ_CHECK(c.intermediate_size > 0, "config.json: intermediate_size is missing");
    load_mlp(layer->mlp, prefix + "mlp.", c.intermediate_size);
  }
  return layer;
}

const Model::Linear& Model::acquire_head() {
  if (lm_head_) return *lm_head_;
  lm_head_ = std::make_shared<Linear>();
  if (tied_head_) {
    lm_head_->name = "lm_head";
    lm_head_->out_features = config_.vocab_size;
    lm_head_->in_features = config_.hidden_size;
    lm_head_->weight = fetch("model.embed_tokens.weight");
    prepare_linear(*lm_head_);
  } else {
    load_linear(*lm_head_, "lm_head", config_.vocab_size, config_.hidden_size,
                /*bias_allowed=*/false);
  }
  return *lm_head_;
}

std::shared_ptr<const Model::Linear> Model::share_head() {
  acquire_head();
  return lm_head_;
}

void Model::release_head() {
  if (!options_.keep_layers_resident) lm_head_.reset();
}

const Model::Layer& Model::acquire_layer(std::int64_t index) {
  // Every pass (eval, probe, scout, validate, generate) starts each layer here: a check point.
  throw_if_interrupted();
  if (!resident_[index]) resident_[index] = load_layer(index);
  return *resident_[index];
}

void Model::release_layer(std::int64_t index) {
  if (!options_.keep_layers_resident) resident_[index].reset();
}

std::vector<float> Model::fetch(const std::string& name) const {
  std::vector<float> values = weights_.load_f32(name);
  // The decoded copy is all the runtime reads, so the stored bytes can leave memory now
  // (madvise on a mapped checkpoint): resident memory stays near one decoded layer.
  weights_.release(name);
  return values;
}

// ---- Linear -------------------------------------------------------------------------------

void Model::multiply(const Linear& linear, const float* x, std::int64_t rows, float* y) {
  if (rows == 0) return;
  // prepare_linear keeps only the bf16 rounding in bf16 compute mode.
  if (!linear.weight_bf16.empty()) {
    std::vector<std::uint16_t> x_bf16(rows * linear.in_features);
    convert_f32_to_bf16({x, x_bf16.size()}, x_bf16);
    gemm_bf16(Transpose::kNo, Transpose::kYes, rows, linear.out_features, linear.in_features, 1.0f,
              x_bf16.data(), linear.in_features, linear.weight_bf16.data(), linear.in_features,
              0.0f, y, linear.out_features);
  } else {
    gemm_f32(Transpose::kNo, Transpose::kYes, rows, linear.out_features, linear.in_features, 1.0f,
             x, linear.in_features, linear.weight.data(), linear.in_features, 0.0f, y,
             linear.out_features);
  }
  if (!linear.bias.empty()) add_bias(y, linear.bias.data(), rows, linear.out_features);
}

std::uint64_t Model::weight_bytes(const Linear& linear) {
  return linear.weight.size() * sizeof(float) + linear.weight_bf16.size() * sizeof(std::uint16_t) +
         linear.bias.size() * sizeof(float);
}

void Model::linear_forward(const Linear& linear, const float* x, std::int64_t rows, float* y,
                           LayerTape* tape) const {
  const ActivationQuantizer* quantizer = options_.activation_quantizer;
  std::vector<float> quantized;
  if (quantizer != nullptr && quantizer->applies_to(linear.name)) {
    quantized.assign(x, x + rows * linear.in_features);
    quantizer->quantize(linear.name, rows, linear.in_features, quantized);
    x = quantized.data();
  }
  multiply(linear, x, rows, y);
  if (tape != nullptr && !quantized.empty()) tape->quantized_inputs[&linear] = std::move(quantized);
}

const float* Model::linear_input(const Linear& linear, const float* x,
                                 const LayerTape& tape) const {
  const auto it = tape.quantized_inputs.find(&linear);
  return it == tape.quantized_inputs.end() ? x : it->second.data();
}

void Model::linear_backward_input(const Linear& linear, const float* dy, std::int64_t rows,
                                  float* dx, bool accumulate) const {
  // dX [rows, in] (+)= dY [rows, out] W [out, in]
  if (rows == 0) return;
  const float beta = accumulate ? 1.0f : 0.0f;
  if (options_.compute == ComputeType::kBF16) {
    std::vector<std::uint16_t> dy_bf16(rows * linear.out_features);
    convert_f32_to_bf16({dy, dy_bf16.size()}, dy_bf16);
    gemm_bf16(Transpose::kNo, Transpose::kNo, rows, linear.in_features, linear.out_features, 1.0f,
              dy_bf16.data(), linear.out_features, linear.weight_bf16.data(), linear.in_features,
              beta, dx, linear.in_features);
  } else {
    gemm_f32(Transpose::kNo, Transpose::kNo, rows, linear.in_features, linear.out_features, 1.0f,
             dy, linear.out_features, linear.weight.data(), linear.in_features, beta, dx,
             linear.in_features);
  }
}

// ---- Attention ----------------------------------------------------------------------------

void Model::project_qkv(const Layer& layer, const Layout& layout, LayerTape& t,
                        std::int64_t first_position) const {
  const model::ModelConfig& c = config_;
  const std::int64_t n = layout.rows;
  const std::int64_t heads = c.num_attention_heads;
  const std::int64_t kv_heads = c.num_key_value_heads;
  const std::int64_t d = c.head_dim;
  const float eps = static_cast<float>(c.rms_norm_eps);

  t.q.resize(n * heads * d);
  t.k.resize(n * kv_heads * d);
  t.v.resize(n * kv_heads * d);
  if (qk_norm_) {
    t.q_proj.resize(t.q.size());
    t.k_proj.resize(t.k.size());
    t.q_rstd.resize(n * heads);
    t.k_rstd.resize(n * kv_heads);
    linear_forward(layer.q_proj, t.h1.data(), n, t.q_proj.data(), &t);
    linear_forward(layer.k_proj, t.h1.data(), n, t.k_proj.data(), &t);
    rms_norm_forward(t.q_proj.data(), layer.q_norm.data(), n * heads, d, eps, t.q.data(),
                     t.q_rstd.data());
    rms_norm_forward(t.k_proj.data(), layer.k_norm.data(), n * kv_heads, d, eps, t.k.data(),
                     t.k_rstd.data());
  } else {
    linear_forward(layer.q_proj, t.h1.data(), n, t.q.data(), &t);
    linear_forward(layer.k_proj, t.h1.data(), n, t.k.data(), &t);
  }
  linear_forward(layer.v_proj, t.h1.data(), n, t.v.data(), &t);
  for (std::int64_t s = 0; s < layout.sequences(); ++s) {
    const std::int64_t off = layout.offsets[s];
    const std::int64_t len = layout.length(s);
    layout.rope->apply(t.q.data() + off * heads * d, len, heads, first_position);
    layout.rope->apply(t.k.data() + off * kv_heads * d, len, kv_heads, first_position);
  }
}

void Model::attention_forward(const Layer& layer, const Layout& layout, LayerTape& t) const {
  const model::ModelConfig& c = config_;
  const std::int64_t n = layout.rows;
  const std::int64_t heads = c.num_attention_heads;
  const std::int64_t kv_heads = c.num_key_value_heads;
  const std::int64_t d = c.head_dim;
  project_qkv(layer, layout, t, 0);
  t.attn.resize(n * heads * d);
  t.lse.resize(n * heads);
  for (std::int64_t s = 0; s < layout.sequences(); ++s) {
    const std::int64_t off = layout.offsets[s];
    const std::int64_t len = layout.length(s);
    if (len == 0) continue;
    const AttentionShape shape{
        len, heads, kv_heads, d, 1.0f / std::sqrt(static_cast<float>(d)), layer.sliding_window};
    causal_attention_forward(shape, t.q.data() + off * heads * d, t.k.data() + off * kv_heads * d,
                             t.v.data() + off * kv_heads * d, t.attn.data() + off * heads * d,
                             t.lse.data() + off * heads);
  }
}

void Model::attention_forward_cached(const Layer& layer, const Layout& layout, LayerTape& t,
                                     DecodeState& state) const {
  const model::ModelConfig& c = config_;
  const std::int64_t n = layout.rows;  // new tokens, one sequence
  const std::int64_t heads = c.num_attention_heads;
  const std::int64_t kv_heads = c.num_key_value_heads;
  const std::int64_t d = c.head_dim;
  const std::int64_t group = heads / kv_heads;
  const std::int64_t past = state.length;
  project_qkv(layer, layout, t, past);
  std::vector<float>& keys = state.keys[layer.index];
  std::vector<float>& values = state.values[layer.index];
  keys.insert(keys.end(), t.k.begin(), t.k.end());
  values.insert(values.end(), t.v.begin(), t.v.end());
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  t.attn.resize(n * heads * d);
  // New token i (position past + i) attends cached positions j <= past + i, inside the sliding
  // window if the layer has one (the convention of causal_attention_forward).
#pragma omp parallel for collapse(2) if (n * heads * (past + n) * d > kParallelElements)
  for (std::int64_t i = 0; i < n; ++i) {
    for (std::int64_t h = 0; h < heads; ++h) {
      const std::int64_t position = past + i;
      const std::int64_t first =
          layer.sliding_window > 0 ? std::max<std::int64_t>(0, position - layer.sliding_window + 1)
                                   : 0;
      const float* q = t.q.data() + (i * heads + h) * d;
      const std::int64_t kv = h / group;
      std::vector<float> scores(position + 1 - first);
      float max_score = -INFINITY;
      for (std::int64_t j = first; j <= position; ++j) {
        const float* k = keys.data() + (j * kv_heads + kv) * d;
        float dot = 0.0f;
        for (std::int64_t e = 0; e < d; ++e) dot += q[e] * k[e];
        scores[j - first] = dot * scale;
        max_score = std::max(max_score, scores[j - first]);
      }
      double sum = 0.0;
      for (float& score : scores) {
        score = std::exp(score - max_score);
        sum += score;
      }
      float* out = t.attn.data() + (i * heads + h) * d;
      std::fill(out, out + d, 0.0f);
      for (std::int64_t j = first; j <= position; ++j) {
        const float p = static_cast<float>(scores[j - first] / sum);
        const float* v = values.data() + (j * kv_heads + kv) * d;
        for (std::int64_t e = 0; e < d; ++e) out[e] += p * v[e];
      }
    }
  }
}

void Model::attention_backward(const Layer& layer, const Layout& layout, LayerTape& t,
                               const float* dattn_out, float* dh1, LinearObserver& observer) const {
  const model::ModelConfig& c = config_;
  const std::int64_t n = layout.rows;
  const std::int64_t heads = c.num_attention_heads;
  const std::int64_t kv_heads = c.num_key_value_heads;
  const std::int64_t d = c.head_dim;
  const std::int64_t hidden = c.hidden_size;

  // o_proj: dY = d(attention output of the layer), X = attention values.
  report(&observer, layer.o_proj.name, layer.index, n, heads * d, hidden,
         linear_input(layer.o_proj, t.attn.data(), t), dattn_out, layout.ranges);
  std::vector<float> dattn(n * heads * d);
  linear_backward_input(layer.o_proj, dattn_out, n, dattn.data(), false);

  std::vector<float> dq(t.q.size()), dk(t.k.size()), dv(t.v.size());
  for (std::int64_t s = 0; s < layout.sequences(); ++s) {
    const std::int64_t off = layout.offsets[s];
    const std::int64_t len = layout.length(s);
    if (len == 0) continue;
    const AttentionShape shape{
        len, heads, kv_heads, d, 1.0f / std::sqrt(static_cast<float>(d)), layer.sliding_window};
    causal_attention_backward(shape, t.q.data() + off * heads * d, t.k.data() + off * kv_heads * d,
                              t.v.data() + off * kv_heads * d, t.attn.data() + off * heads * d,
                              t.lse.data() + off * heads, dattn.data() + off * heads * d,
                              dq.data() + off * heads * d, dk.data() + off * kv_heads * d,
                              dv.data() + off * kv_heads * d);
    layout.rope->apply_backward(dq.data() + off * heads * d, len, heads, 0);
    layout.rope->apply_backward(dk.data() + off * kv_heads * d, len, kv_heads, 0);
  }
  if (qk_norm_) {
    // dq, dk now hold gradients of the normalized values; take them back through the norms.
    std::vector<float> dq_proj(dq.size()), dk_proj(dk.size());
    rms_norm_backward(t.q_proj.data(), layer.q_norm.data(), t.q_rstd.data(), dq.data(), n * heads,
                      d, dq_proj.data(), false);
    rms_norm_backward(t.k_proj.data(), layer.k_norm.data(), t.k_rstd.data(), dk.data(),
                      n * kv_heads, d, dk_proj.data(), false);
    dq.swap(dq_proj);
    dk.swap(dk_proj);
  }
  const struct {
    const Linear& linear;
    const std::vector<float>& grad;
  } projections[] = {{layer.q_proj, dq}, {layer.k_proj, dk}, {layer.v_proj, dv}};
  bool first = true;
  for (const auto& p : projections) {
    report(&observer, p.linear.name, layer.index, n, hidden, p.linear.out_features,
           linear_input(p.linear, t.h1.data(), t), p.grad.data(), layout.ranges);
    linear_backward_input(p.linear, p.grad.data(), n, dh1, !first);
    first = false;
  }
}

// ---- MLP and MoE --------------------------------------------------------------------------

void Model::mlp_forward(const Layer& layer, const Layout& layout, LayerTape& t, float* out,
                        LinearObserver* observer, bool report_linears) const {
  const model::ModelConfig& c = config_;
  const std::int64_t n = layout.rows;
  const std::int64_t hidden = c.hidden_size;
  LinearObserver* linear_observer = report_linears ? observer : nullptr;

  // Runs gate/up/act/down on `rows` rows of `input`, writing `rows x hidden` to `result`.
  const auto run_mlp = [&](const Layer::Mlp& mlp, LayerTape::MlpTape& m, const float* input,
                           std::int64_t rows, float* result, std::span<const RowRange> ranges) {
    const std::int64_t inter = mlp.gate_proj.out_features;
    m.gate.resize(rows * inter);
    m.up.resize(rows * inter);
    m.act.resize(rows * inter);
    linear_forward(mlp.gate_proj, input, rows, m.gate.data(), &t);
    linear_forward(mlp.up_proj, input, rows, m.up.data(), &t);
    swiglu_forward(m.gate.data(), m.up.data(), rows * inter, m.act.data());
    linear_forward(mlp.down_proj, m.act.data(), rows, result, &t);
    report(linear_observer, mlp.gate_proj.name, layer.index, rows, hidden, inter,
           linear_input(mlp.gate_proj, input, t), nullptr, ranges);
    report(linear_observer, mlp.up_proj.name, layer.index, rows, hidden, inter,
           linear_input(mlp.up_proj, input, t), nullptr, ranges);
    report(linear_observer, mlp.down_proj.name, layer.index, rows, inter, hidden,
           linear_input(mlp.down_proj, m.act.data(), t), nullptr, ranges);
  };

  if (!layer.moe) {
    run_mlp(layer.mlp, t.mlp, t.h2.data(), n, out, layout.ranges);
    return;
  }

  // Qwen3MoeSparseMoeBlock (transformers models/qwen3_moe/modeling_qwen3_moe.py): softmax of
  // the router logits in float32, top-k, optional renormalization of the k weights, then the
  // weighted sum of the chosen experts' SwiGLU outputs.
  const std::int64_t experts = c.num_experts;
  const std::int64_t top_k = c.num_experts_per_tok;
  t.router_probs.resize(n * experts);
  linear_forward(layer.router, t.h2.data(), n, t.router_probs.data(), &t);
  report(linear_observer, layer.router.name, layer.index, n, hidden, experts,
         linear_input(layer.router, t.h2.data(), t), nullptr, layout.ranges);
  t.chosen.resize(n * top_k);
  t.routing_weights.resize(n * top_k);
#pragma omp parallel for if (n * experts > kParallelElements)
  for (std::int64_t r = 0; r < n; ++r) {
    float* p = t.router_probs.data() + r * experts;
    const float max_logit = *std::max_element(p, p + experts);
    double sum = 0.0;
    for (std::int64_t e = 0; e < experts; ++e)
      sum += std::exp(static_cast<double>(p[e]) - max_logit);
    for (std::int64_t e = 0; e < experts; ++e) {
      p[e] = static_cast<float>(std::exp(static_cast<double>(p[e]) - max_logit) / sum);
    }
    std::vector<std::int32_t> order(experts);
    std::iota(order.begin(), order.end(), 0);
    // Highest probability first; equal probabilities keep the lower expert index first.
    std::partial_sort(
        order.begin(), order.begin() + top_k, order.end(),
        [p](std::int32_t a, std::int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    double chosen_sum = 0.0;
    for (std::int64_t j = 0; j < top_k; ++j) chosen_sum += p[order[j]];
    for (std::int64_t j = 0; j < top_k; ++j) {
      t.chosen[r * top_k + j] = order[j];
      t.routing_weights[r * top_k + j] =
          c.norm_topk_prob ? static_cast<float>(p[order[j]] / chosen_sum) : p[order[j]];
    }
  }

  std::fill(out, out + n * hidden, 0.0f);
  t.experts.assign(experts, {});
  std::vector<std::int64_t> counts(experts, 0);
  for (std::int64_t r = 0; r < n; ++r) {
    for (std::int64_t j = 0; j < top_k; ++j) {
      LayerTape::MlpTape& m = t.experts[t.chosen[r * top_k + j]];
      m.rows.push_back(r);
      m.slots.push_back(j);
    }
  }
  for (std::int64_t e = 0; e < experts; ++e) {
    LayerTape::MlpTape& m = t.experts[e];
    const std::int64_t rows = static_cast<std::int64_t>(m.rows.size());
    counts[e] = rows;
    m.ranges = ranges_of_rows(m.rows, layout.sequence_of_row);
    m.input.resize(rows * hidden);
    for (std::int64_t i = 0; i < rows; ++i) {
      std::copy_n(t.h2.data() + m.rows[i] * hidden, hidden, m.input.data() + i * hidden);
    }
    m.out.resize(rows * hidden);
    run_mlp(layer.experts[e], m, m.input.data(), rows, m.out.data(), m.ranges);
    for (std::int64_t i = 0; i < rows; ++i) {
      const float w = t.routing_weights[m.rows[i] * top_k + m.slots[i]];
      float* dst = out + m.rows[i] * hidden;
      const float* src = m.out.data() + i * hidden;
      for (std::int64_t h = 0; h < hidden; ++h) dst[h] += w * src[h];
    }
  }
  if (observer != nullptr) {
    RoutingActivity routing;
    routing.layer = layer.index;
    routing.tokens = n;
    routing.num_experts = experts;
    routing.top_k = top_k;
    routing.probabilities = t.router_probs.data();
    routing.experts = t.chosen.data();
    routing.weights = t.routing_weights.data();
    routing.expert_token_counts = counts;
    routing.sequences = layout.ranges;
    observer->on_routing(routing);
  }
}

void Model::mlp_backward(const Layer& layer, const Layout& layout, LayerTape& t, const float* dout,
                         float* dh2, LinearObserver& observer) const {
  const model::ModelConfig& c = config_;
  const std::int64_t n = layout.rows;
  const std::int64_t hidden = c.hidden_size;

  // Backward of one SwiGLU MLP on `rows` rows: dy [rows, hidden] -> d(input), written or added.
  const auto run_mlp_backward =
      [&](const Layer::Mlp& mlp, LayerTape::MlpTape& m, const float* input, std::int64_t rows,
          const float* dy, float* dinput, bool accumulate, std::span<const RowRange> ranges) {
        const std::int64_t inter = mlp.gate_proj.out_features;
        report(&observer, mlp.down_proj.name, layer.index, rows, inter, hidden,
               linear_input(mlp.down_proj, m.act.data(), t), dy, ranges);
        std::vector<float> dact(rows * inter);
        linear_backward_input(mlp.down_proj, dy, rows, dact.data(), false);
        std::vector<float> dgate(rows * inter), dup(rows * inter);
        swiglu_backward(m.gate.data(), m.up.data(), dact.data(), rows * inter, dgate.data(),
                        dup.data());
        report(&observer, mlp.gate_proj.name, layer.index, rows, hidden, inter,
               linear_input(mlp.gate_proj, input, t), dgate.data(), ranges);
        report(&observer, mlp.up_proj.name, layer.index, rows, hidden, inter,
               linear_input(mlp.up_proj, input, t), dup.data(), ranges);
        linear_backward_input(mlp.gate_proj, dgate.data(), rows, dinput, accumulate);
        linear_backward_input(mlp.up_proj, dup.data(), rows, dinput, true);
      };

  if (!layer.moe) {
    run_mlp_backward(layer.mlp, t.mlp, t.h2.data(), n, dout, dh2, false, layout.ranges);
    return;
  }

  const std::int64_t experts = c.num_experts;
  const std::int64_t top_k = c.num_experts_per_tok;
  std::fill(dh2, dh2 + n * hidden, 0.0f);
  std::vector<float> dweights(n * top_k, 0.0f);  // dLoss / d(routing weight)
  for (std::int64_t e = 0; e < experts; ++e) {
    LayerTape::MlpTape& m = t.experts[e];
    const std::int64_t rows = static_cast<std::int64_t>(m.rows.size());
    std::vector<float> dy(rows * hidden), dinput(rows * hidden);
    for (std::int64_t i = 0; i < rows; ++i) {
      const std::int64_t r = m.rows[i];
      const float w = t.routing_weights[r * top_k + m.slots[i]];
      double dot = 0.0;
      for (std::int64_t h = 0; h < hidden; ++h) {
        dy[i * hidden + h] = w * dout[r * hidden + h];
        dot += static_cast<double>(dout[r * hidden + h]) * m.out[i * hidden + h];
      }
      dweights[r * top_k + m.slots[i]] = static_cast<float>(dot);
    }
    run_mlp_backward(layer.experts[e], m, m.input.data(), rows, dy.data(), dinput.data(), false,
                     m.ranges);
    for (std::int64_t i = 0; i < rows; ++i) {
      add_inplace(dh2 + m.rows[i] * hidden, dinput.data() + i * hidden, hidden);
    }
  }

  // Through the (optionally renormalized) top-k selection and the softmax to the router logits.
  // With S = sum of the chosen probabilities and w_j = p_j / S:
  // dL/dp_j = (g_j - sum_i g_i w_i) / S for chosen j, 0 otherwise; then
  // dL/dlogit = p * (dL/dp - sum(p * dL/dp)).
  std::vector<float> dlogits(n * experts);
#pragma omp parallel for if (n * experts > kParallelElements)
  for (std::int64_t r = 0; r < n; ++r) {
    const float* p = t.router_probs.data() + r * experts;
    std::vector<double> dp(experts, 0.0);
    double chosen_sum = 0.0, gw = 0.0;
    for (std::int64_t j = 0; j < top_k; ++j) {
      chosen_sum += p[t.chosen[r * top_k + j]];
      gw += static_cast<double>(dweights[r * top_k + j]) * t.routing_weights[r * top_k + j];
    }
    for (std::int64_t j = 0; j < top_k; ++j) {
      const double g = dweights[r * top_k + j];
      dp[t.chosen[r * top_k + j]] = c.norm_topk_prob ? (g - gw) / chosen_sum : g;
    }
    double dot = 0.0;
    for (std::int64_t e = 0; e < experts; ++e) dot += p[e] * dp[e];
    for (std::int64_t e = 0; e < experts; ++e) {
      dlogits[r * experts + e] = static_cast<float>(p[e] * (dp[e] - dot));
    }
  }
  report(&observer, layer.router.name, layer.index, n, hidden, experts,
         linear_input(layer.router, t.h2.data(), t), dlogits.data(), layout.ranges);
  linear_backward_input(layer.router, dlogits.data(), n, dh2, true);
}

// ---- Layer --------------------------------------------------------------------------------

void Model::layer_forward(const Layer& layer, const Layout& layout, const float* x, float* out,
                          LayerTape& t, LinearObserver* observer, bool report_linears,
                          DecodeState* cache) const {
  const model::ModelConfig& c = config_;
  const std::int64_t n = layout.rows;
  const std::int64_t hidden = c.hidden_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  LinearObserver* linear_observer = report_linears ? observer : nullptr;

  t.x = x;
  t.h1.resize(n * hidden);
  t.rstd1.resize(n);
  rms_norm_forward(x, layer.input_norm.data(), n, hidden, eps, t.h1.data(), t.rstd1.data());
  if (cache != nullptr) {
    attention_forward_cached(layer, layout, t, *cache);
  } else {
    attention_forward(layer, layout, t);
  }
  for (const Linear* p : {&layer.q_proj, &layer.k_proj, &layer.v_proj}) {
    report(linear_observer, p->name, layer.index, n, hidden, p->out_features,
           linear_input(*p, t.h1.data(), t), nullptr, layout.ranges);
  }
  t.x2.resize(n * hidden);
  linear_forward(layer.o_proj, t.attn.data(), n, t.x2.data(), &t);
  report(linear_observer, layer.o_proj.name, layer.index, n, layer.o_proj.in_features, hidden,
         linear_input(layer.o_proj, t.attn.data(), t), nullptr, layout.ranges);
  add_inplace(t.x2.data(), x, n * hidden);

  t.h2.resize(n * hidden);
  t.rstd2.resize(n);
  rms_norm_forward(t.x2.data(), layer.post_attention_norm.data(), n, hidden, eps, t.h2.data(),
                   t.rstd2.data());
  mlp_forward(layer, layout, t, out, observer, report_linears);
  add_inplace(out, t.x2.data(), n * hidden);
}

void Model::layer_backward(const Layer& layer, const Layout& layout, LayerTape& t, float* dx,
                           LinearObserver& observer) const {
  // On entry dx holds dL/d(layer output); on exit dL/d(layer input).
  const std::int64_t n = layout.rows;
  const std::int64_t hidden = config_.hidden_size;
  // out = x2 + mlp(norm(x2)): dx2 = dout + norm_backward(mlp_backward(dout)).
  std::vector<float> dh(n * hidden);
  mlp_backward(layer, layout, t, dx, dh.data(), observer);
  rms_norm_backward(t.x2.data(), layer.post_attention_norm.data(), t.rstd2.data(), dh.data(), n,
                    hidden, dx, /*accumulate=*/true);
  // x2 = x + o_proj(attn(norm(x))): dx = dx2 + norm_backward(attention_backward(dx2)).
  attention_backward(layer, layout, t, dx, dh.data(), observer);
  rms_norm_backward(t.x, layer.input_norm.data(), t.rstd1.data(), dh.data(), n, hidden, dx,
                    /*accumulate=*/true);
}

// ---- Passes -------------------------------------------------------------------------------

namespace {

// Groups whole sequences into blocks of at most `max_rows` rows (a longer sequence alone).
std::vector<std::pair<std::int64_t, std::int64_t>> sequence_blocks(
    const std::vector<std::int64_t>& offsets, std::int64_t max_rows) {
  std::vector<std::pair<std::int64_t, std::int64_t>> blocks;
  const std::int64_t count = static_cast<std::int64_t>(offsets.size()) - 1;
  std::int64_t first = 0;
  while (first < count) {
    std::int64_t last = first + 1;
    while (last < count && offsets[last + 1] - offsets[first] <= max_rows) ++last;
    blocks.emplace_back(first, last);
    first = last;
  }
  return blocks;
}

// The row ranges of sequences [first, last), relative to the first one's first row.
std::vector<RowRange> block_ranges(const std::vector<RowRange>& ranges, std::int64_t first,
                                   std::int64_t last) {
  std::vector<RowRange> out;
  for (std::int64_t s = first; s < last; ++s) {
    out.push_back({ranges[s].begin - ranges[first].begin, ranges[s].end - ranges[first].begin, s});
  }
  return out;
}

}  // namespace

struct Model::Pass {
  std::span<const Sequence> batch;
  Layout whole;
  // Micro-batches: sequences [first, last) of the batch, laid out from row whole.offsets[first]
  // with rows relative to it; RowRange::sequence stays the batch index.
  struct Micro {
    std::int64_t first = 0;
    std::int64_t last = 0;
    Layout layout;
  };
  std::vector<Micro> micro;
};

std::shared_ptr<const Model::Pass> Model::begin_pass(std::span<const Sequence> batch,
                                                     std::int64_t sequences_per_micro_batch) const {
  PQ_CHECK(sequences_per_micro_batch >= 0, "sequences per micro-batch {} is negative",
           sequences_per_micro_batch);
  auto pass = std::make_shared<Pass>();
  pass->batch = batch;
  pass->whole = make_layout(batch);
  const Layout& whole = pass->whole;
  std::vector<std::pair<std::int64_t, std::int64_t>> groups;
  if (sequences_per_micro_batch > 0) {
    const std::int64_t count = whole.sequences();
    for (std::int64_t first = 0; first < count; first += sequences_per_micro_batch) {
      groups.emplace_back(first, std::min(count, first + sequences_per_micro_batch));
    }
  } else {
    groups = sequence_blocks(whole.offsets, options_.micro_batch_rows);
  }
  for (const auto& [first, last] : groups) {
    Layout layout;
    const std::int64_t base = whole.offsets[first];
    for (std::int64_t s = first; s <= last; ++s) layout.offsets.push_back(whole.offsets[s] - base);
    layout.ranges = block_ranges(whole.ranges, first, last);
    layout.rows = whole.offsets[last] - base;
    layout.sequence_of_row.assign(whole.sequence_of_row.begin() + base,
                                  whole.sequence_of_row.begin() + base + layout.rows);
    for (std::int64_t s = first; s < last; ++s) {
      layout.max_length = std::max(layout.max_length, whole.length(s));
    }
    // One table for the whole batch: "dynamic" RoPE depends on the batch's longest sequence.
    layout.rope = whole.rope;
    pass->micro.push_back({first, last, std::move(layout)});
  }
  std::int64_t largest_micro_batch = 0;
  for (const Pass::Micro& m : pass->micro) {
    largest_micro_batch = std::max(largest_micro_batch, m.layout.rows);
  }
  // A forward pass holds two boundary activations (a layer's input and output).
  require_memory(
      "a pass over this batch",
      estimate_pass_memory(config_, whole.rows, largest_micro_batch, options_.logits_block_rows,
                           /*boundaries=*/2, options_.compute),
      memory_limit(options_.max_memory));
  return pass;
}

std::int64_t Model::rows(const Pass& pass) {
  return pass.whole.rows;
}

void Model::embed_tokens(std::span<const Sequence> batch, const Layout& layout, float* x) const {
  const std::int64_t hidden = config_.hidden_size;
  std::vector<std::int64_t> ids;
  for (std::int64_t s = 0; s < layout.sequences(); ++s) {
    const auto& tokens = batch[s].tokens;
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      const std::int32_t id = tokens[i];
      PQ_CHECK(id >= 0 && id < config_.vocab_size,
               "sequence {}: token id {} at position {} is outside the vocabulary [0, {})", s, id,
               i, config_.vocab_size);
      ids.push_back(id);
    }
  }
  // Only the rows the batch uses are decoded: at 150k vocabulary the whole table would be
  // gigabytes of float32.
  std::vector<std::int64_t> unique = ids;
  std::sort(unique.begin(), unique.end());
  unique.erase(std::unique(unique.begin(), unique.end()), unique.end());
  const std::string name = "model.embed_tokens.weight";
  const std::vector<float> rows = weights_.load_rows_f32(name, unique);
  weights_.release(name);
  for (std::size_t r = 0; r < ids.size(); ++r) {
    const auto at = std::lower_bound(unique.begin(), unique.end(), ids[r]) - unique.begin();
    std::copy_n(rows.data() + at * hidden, hidden, x + static_cast<std::int64_t>(r) * hidden);
  }
}

void Model::embed(const Pass& pass, float* x) const {
  embed_tokens(pass.batch, pass.whole, x);
}

void Model::require_finite_activations(std::int64_t layer, std::string_view what,
                                       const float* values, std::int64_t count) const {
  // The weights were checked when they were decoded, so a non-finite value here is an overflow of
  // float32 inside the layer (or a damaged quantized weight): named here rather than reported
  // later as a NaN loss.
  const std::size_t i = io::first_non_finite({values, static_cast<std::size_t>(count)});
  PQ_CHECK(i == static_cast<std::size_t>(count),
           "decoder layer {} produced a non-finite {} ({} at row {}, column {})", layer, what,
           values[i], static_cast<std::int64_t>(i) / config_.hidden_size,
           static_cast<std::int64_t>(i) % config_.hidden_size);
}

void Model::forward_layer(std::int64_t index, const Pass& pass, const float* x, float* out,
                          LinearObserver* observer) {
  const std::int64_t hidden = config_.hidden_size;
  const Layer& layer = acquire_layer(index);
  for (const Pass::Micro& m : pass.micro) {
    const std::int64_t base = pass.whole.offsets[m.first] * hidden;
    LayerTape tape;
    layer_forward(layer, m.layout, x + base, out + base, tape, observer, /*report_linears=*/true);
  }
  release_layer(index);
  require_finite_activations(index, "output", out, rows(pass) * hidden);
}

void Model::backward_layer(std::int64_t index, const Pass& pass, const float* x, float* dx,
                           LinearObserver& observer) {
  const std::int64_t hidden = config_.hidden_size;
  const Layer& layer = acquire_layer(index);
  for (const Pass::Micro& m : pass.micro) {
    const std::int64_t base = pass.whole.offsets[m.first] * hidden;
    LayerTape tape;
    std::vector<float> out(m.layout.rows * hidden);
    // Recompute the layer from its saved input; routing decisions are reported here.
    layer_forward(layer, m.layout, x + base, out.data(), tape, &observer,
                  /*report_linears=*/false);
    layer_backward(layer, m.layout, tape, dx + base, observer);
  }
  release_layer(index);
  require_finite_activations(index, "input gradient", dx, rows(pass) * hidden);
}

std::vector<float> Model::final_hidden(const Pass& pass, LinearObserver* observer) {
  const std::int64_t n = pass.whole.rows;
  const std::int64_t hidden = config_.hidden_size;
  std::vector<float> x(n * hidden), next(n * hidden);
  embed(pass, x.data());
  for (std::int64_t l = 0; l < config_.num_hidden_layers; ++l) {
    forward_layer(l, pass, x.data(), next.data(), observer);
    x.swap(next);
  }
  return x;
}

Model::Layout Model::make_layout(std::span<const Sequence> batch) const {
  Layout layout;
  layout.offsets.push_back(0);
  for (std::size_t s = 0; s < batch.size(); ++s) {
    const std::int64_t len = static_cast<std::int64_t>(batch[s].tokens.size());
    PQ_CHECK(
        batch[s].loss_weights.empty() || static_cast<std::int64_t>(batch[s].loss_weights.size()) ==
                                             std::max<std::int64_t>(len - 1, 0),
        "sequence {}: {} loss weights for {} tokens (expected one per prediction, {})", s,
        batch[s].loss_weights.size(), len, std::max<std::int64_t>(len - 1, 0));
    layout.ranges.push_back({layout.rows, layout.rows + len, static_cast<std::int64_t>(s)});
    layout.rows += len;
    layout.offsets.push_back(layout.rows);
    layout.max_length = std::max(layout.max_length, len);
  }
  layout.sequence_of_row.resize(layout.rows);
  for (const RowRange& r : layout.ranges) {
    std::fill(layout.sequence_of_row.begin() + r.begin, layout.sequence_of_row.begin() + r.end,
              r.sequence);
  }
  // "dynamic" RoPE scaling depends on the longest sequence, as in transformers'
  // dynamic_rope_update (seq_len = largest position + 1).
  layout.rope = std::make_shared<RopeTable>(config_, std::max<std::int64_t>(layout.max_length, 1));
  return layout;
}

void Model::for_each_logits_block(
    const Pass& pass, const float* x, LinearObserver* observer,
    const std::function<void(std::int64_t first, std::int64_t last, const float* input,
                             const float* rstd, float* logits)>& block) {
  const Layout& layout = pass.whole;
  const std::int64_t hidden = config_.hidden_size;
  const std::int64_t vocab = config_.vocab_size;
  const Linear& head = acquire_head();
  // Blocks within each micro-batch, so a pass of several micro-batches multiplies the rows that
  // separate passes over them would.
  std::vector<std::pair<std::int64_t, std::int64_t>> blocks;
  for (const Pass::Micro& m : pass.micro) {
    for (const auto& [first, last] :
         sequence_blocks(m.layout.offsets, options_.logits_block_rows)) {
      blocks.emplace_back(m.first + first, m.first + last);
    }
  }
  for (const auto& [first, last] : blocks) {
    const std::int64_t begin = layout.offsets[first];
    const std::int64_t rows = layout.offsets[last] - begin;
    // The final norm is per row, so normalizing block by block equals normalizing the batch.
    std::vector<float> h(rows * hidden), rstd(rows), logits(rows * vocab);
    rms_norm_forward(x + begin * hidden, final_norm_.data(), rows, hidden,
                     static_cast<float>(config_.rms_norm_eps), h.data(), rstd.data());
    LayerTape tape;
    linear_forward(head, h.data(), rows, logits.data(), &tape);
    io::require_finite(logits, "lm_head's output (the logits)");
    const std::vector<RowRange> ranges = block_ranges(layout.ranges, first, last);
    const float* input = linear_input(head, h.data(), tape);
    report(observer, head.name, -1, rows, hidden, vocab, input, nullptr, ranges);
    block(first, last, input, rstd.data(), logits.data());
  }
  release_head();
}

void Model::forward(std::span<const Sequence> batch, const LogitsConsumer& consume,
                    LinearObserver* observer, std::int64_t sequences_per_micro_batch) {
  const auto pass = begin_pass(batch, sequences_per_micro_batch);
  const Layout& layout = pass->whole;
  const std::int64_t vocab = config_.vocab_size;
  const std::vector<float> x = final_hidden(*pass, observer);
  for_each_logits_block(
      *pass, x.data(), observer,
      [&](std::int64_t first, std::int64_t last, const float*, const float*, float* logits) {
        const std::int64_t begin = layout.offsets[first];
        for (std::int64_t s = first; s < last; ++s) {
          consume(s, logits + (layout.offsets[s] - begin) * vocab, layout.length(s));
        }
      });
}

std::vector<float> Model::logits(std::span<const std::int32_t> tokens) {
  const Sequence sequence{{tokens.begin(), tokens.end()}, {}};
  std::vector<float> result;
  forward({&sequence, 1}, [&](std::int64_t, const float* logits, std::int64_t rows) {
    result.assign(logits, logits + rows * config_.vocab_size);
  });
  return result;
}

std::vector<float> Model::extend(DecodeState& state, std::span<const std::int32_t> tokens) {
  PQ_CHECK(!tokens.empty(), "extend: no tokens given");
  const std::int64_t layers = config_.num_hidden_layers;
  if (state.keys.empty()) {
    state.keys.resize(layers);
    state.values.resize(layers);
  }
  PQ_CHECK(static_cast<std::int64_t>(state.keys.size()) == layers,
           "extend: the decode state belongs to a model with {} layers, not {}", state.keys.size(),
           layers);
  const Sequence sequence{{tokens.begin(), tokens.end()}, {}};
  Layout layout = make_layout({&sequence, 1});
  const std::int64_t n = layout.rows;
  layout.rope = std::make_shared<RopeTable>(config_, state.length + n);
  const std::int64_t hidden = config_.hidden_size;
  std::vector<float> x(n * hidden), next(n * hidden);
  embed_tokens({&sequence, 1}, layout, x.data());
  for (std::int64_t l = 0; l < layers; ++l) {
    const Layer& layer = acquire_layer(l);
    LayerTape tape;
    layer_forward(layer, layout, x.data(), next.data(), tape, nullptr, false, &state);
    release_layer(l);
    require_finite_activations(l, "output", next.data(), n * hidden);
    x.swap(next);
  }
  state.length += n;
  std::vector<float> h(n * hidden), rstd(n);
  rms_norm_forward(x.data(), final_norm_.data(), n, hidden,
                   static_cast<float>(config_.rms_norm_eps), h.data(), rstd.data());
  std::vector<float> logits(n * config_.vocab_size);
  linear_forward(acquire_head(), h.data(), n, logits.data(), nullptr);
  release_head();
  io::require_finite(logits, "lm_head's output (the logits)");
  return logits;
}

double Model::head_backward(const Pass& pass, const float* x, float* dx, LinearObserver* observer,
                            const LossWeighting& weighting) {
  const Layout& layout = pass.whole;
  const std::int64_t hidden = config_.hidden_size;
  const std::int64_t vocab = config_.vocab_size;
  double loss = 0.0;
  for_each_logits_block(
      pass, x, nullptr,
      [&](std::int64_t first, std::int64_t last, const float* input, const float* rstd,
          float* logits) {
        const std::int64_t begin = layout.offsets[first];
        const std::int64_t rows = layout.offsets[last] - begin;
        // Position t of a sequence predicts token t + 1; its last position predicts nothing.
        std::vector<std::int32_t> targets(rows, -1);
        std::vector<float> weights(rows, 0.0f);
        for (std::int64_t s = first; s < last; ++s) {
          const Sequence& seq = pass.batch[s];
          const std::int64_t offset = layout.offsets[s] - begin;
          std::vector<float> computed;
          if (weighting) {
            computed = weighting(s, logits + offset * vocab, layout.length(s));
            PQ_CHECK(static_cast<std::int64_t>(computed.size()) ==
                         std::max<std::int64_t>(layout.length(s) - 1, 0),
                     "sequence {}: the loss weighting gave {} weights for {} tokens", s,
                     computed.size(), layout.length(s));
          }
          const std::vector<float>& given = weighting ? computed : seq.loss_weights;
          for (std::int64_t t = 0; t + 1 < layout.length(s); ++t) {
            targets[offset + t] = seq.tokens[t + 1];
            weights[offset + t] = given.empty() ? 1.0f : given[t];
          }
        }
        loss += cross_entropy_forward_backward(logits, targets.data(), weights.data(), rows, vocab);
        if (dx == nullptr) return;
        const Linear& head = *lm_head_;
        const std::vector<RowRange> ranges = block_ranges(layout.ranges, first, last);
        report(observer, head.name, -1, rows, hidden, vocab, input, logits, ranges);
        std::vector<float> dh(rows * hidden);
        linear_backward_input(head, logits, rows, dh.data(), false);
        rms_norm_backward(x + begin * hidden, final_norm_.data(), rstd, dh.data(), rows, hidden,
                          dx + begin * hidden, /*accumulate=*/false);
      });
  return loss;
}

double Model::loss(std::span<const Sequence> batch) {
  const auto pass = begin_pass(batch);
  const std::vector<float> x = final_hidden(*pass, nullptr);
  return head_backward(*pass, x.data(), nullptr, nullptr);
}

double Model::backward(std::span<const Sequence> batch, LinearObserver& observer) {
  const auto pass = begin_pass(batch);
  const std::int64_t n = pass->whole.rows;
  const std::int64_t hidden = config_.hidden_size;
  // Layer-boundary activations: input of every layer, then the last layer's output.
  std::vector<std::vector<float>> inputs(config_.num_hidden_layers + 1);
  inputs[0].resize(n * hidden);
  embed(*pass, inputs[0].data());
  for (std::int64_t l = 0; l < config_.num_hidden_layers; ++l) {
    inputs[l + 1].resize(n * hidden);
    forward_layer(l, *pass, inputs[l].data(), inputs[l + 1].data(), nullptr);
  }
  std::vector<float> dx(n * hidden);
  const double loss =
      head_backward(*pass, inputs[config_.num_hidden_layers].data(), dx.data(), &observer);
  inputs.pop_back();
  for (std::int64_t l = config_.num_hidden_layers - 1; l >= 0; --l) {
    backward_layer(l, *pass, inputs[l].data(), dx.data(), observer);
    inputs[l] = {};
  }
  return loss;
}

}  // namespace pq::runtime
