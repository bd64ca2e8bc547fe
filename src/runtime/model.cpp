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
#include "runtime/kernels/causal_conv1d.h"
#include "runtime/kernels/gated_delta_net_norms.h"
#include "runtime/kernels/gated_delta_rule.h"
#include "runtime/kernels/gemm.h"
#include "runtime/memory_estimate.h"
#include "runtime/ops.h"
#include "runtime/rope.h"

namespace pq::runtime {

std::string_view compute_type_name(ComputeType compute) {
  return compute == ComputeType::kBF16 ? "bf16" : "f32";
}

ComputeType parse_compute_type(std::string_view name) {
  if (name == "f32") return ComputeType::kF32;
  if (name == "bf16") return ComputeType::kBF16;
  fail("unknown compute type {}: expected f32 or bf16", quoted_json_string(name));
}

// A Linear y = x W^T (+ b), W [out_features, in_features] as Hugging Face stores it.
struct Model::Linear {
  std::string name;  // tensor name without ".weight"
  std::int64_t out_features = 0;
  std::int64_t in_features = 0;
  // float32 values after the weight transform; in bf16 compute mode only their rounded copy
  // weight_bf16 is kept, unless keep_f32.
  std::vector<float> weight;
  std::vector<std::uint16_t> weight_bf16;
  std::vector<float> bias;  // empty when the Linear has none
  // Multiplied in float32 in bf16 compute mode too: MiniMax-M2's router, which vLLM holds in
  // fp32 and feeds an fp32 input (minimax_m2-architecture-facts.md §4 step 1).
  bool keep_f32 = false;
  // lm_head of Gemma 4: its outputs are soft-capped c tanh(raw / c) (final_logit_softcapping,
  // gemma4-architecture-facts.md §2 step 4, §8); 0: none.
  float logit_softcap = 0.0f;
};

struct Model::Mlp {
  Linear gate_proj, up_proj, down_proj;
};

struct Model::Layer {
  std::int64_t index = 0;
  std::int64_t sliding_window = 0;  // 0: full causal attention
  // Attention geometry of this layer (Gemma 4's full layers differ from its sliding ones,
  // gemma4-architecture-facts.md §4.1); elsewhere head_dim and num_key_value_heads.
  std::int64_t head_dim = 0;
  std::int64_t kv_heads = 0;
  float attention_scale = 1.0f;      // 1/sqrt(head_dim), or 1 (Gemma 4, §4.2 step 4)
  bool full_attention_rope = false;  // Gemma 4's full layers: Layout::full_attention_rope
  // Gemma 4 (§4.2): V = v_norm(v_proj x), a scale-free RMSNorm (these are its ones); on
  // attention_k_eq_v layers there is no v_proj and V = v_norm(k_proj x).
  std::vector<float> v_norm;
  bool values_from_keys = false;
  // Norm weights as multiplied: 1 + w for the hybrid families' zero-centred norms (facts §3.1).
  std::vector<float> input_norm, post_attention_norm, q_norm, k_norm;
  Linear q_proj, k_proj, v_proj, o_proj;  // attention layers
  // Multi-head latent attention (DeepSeek-V3, deepseek_v3-architecture-facts.md §3): q_a_proj,
  // q_a_layernorm and q_b_proj (or q_proj alone without q_lora_rank), kv_a_proj_with_mqa,
  // kv_a_layernorm and kv_b_proj, in place of k_proj and v_proj; o_proj as above.
  Linear q_a_proj, q_b_proj, kv_a_proj, kv_b_proj;
  std::vector<float> q_a_norm, kv_a_norm;
  // The token mixer of "linear_attention" layers (facts §4.1), in place of q/k/v/o_proj.
  struct GatedDeltaNet {
    // Qwen3-Next fuses q/k/v/z into in_proj_qkvz and b/a into in_proj_ba, interleaved per key-head
    // group (§4.1); Qwen3.5/3.6 store in_proj_qkv, in_proj_z, in_proj_b and in_proj_a.
    bool fused = false;
    Linear in_proj_qkv, in_proj_z, in_proj_b, in_proj_a;
    Linear in_proj_qkvz, in_proj_ba;
    Linear out_proj;
    std::vector<float> conv_weight;  // [conv channels, 1, kernel]
    std::vector<float> a_log, dt_bias;
    std::vector<float> norm;  // linear_attn.norm: plain w, not zero-centred (§3.2)

    // The input projections in the order the passes report them.
    std::vector<const Linear*> input_projections() const {
      if (fused) return {&in_proj_qkvz, &in_proj_ba};
      return {&in_proj_qkv, &in_proj_z, &in_proj_b, &in_proj_a};
    }
  };
  std::unique_ptr<GatedDeltaNet> linear_attention;  // null on attention layers
  bool moe = false;
  Mlp mlp;        // dense layers (Gemma 4: every layer)
  Linear router;  // MoE: mlp.gate (MiniMax-M2: block_sparse_moe.gate)
  // MiniMax-M2's e_score_correction_bias [E]: added to the router scores to choose experts only.
  std::vector<float> router_selection_bias;
  std::vector<Mlp> experts;  // MoE: mlp.experts.N
  // MoE with a shared expert (facts §6.2 step 3): mlp.shared_expert, scaled per token by
  // sigmoid(mlp.shared_expert_gate x).
  bool has_shared_expert = false;
  Mlp shared_expert;
  Linear shared_expert_gate;
  // Gemma 4 (§2, §3, §6): sandwich norms around the MLP, the MoE block's own norms (the
  // experts' input _2, the dense branch's output _1, the experts' output _2), the router's input
  // norm weight router.scale * hidden^-1/2, the experts' per_expert_scale, and layer_scalar.
  std::vector<float> pre_feedforward_norm, post_feedforward_norm;
  std::vector<float> pre_feedforward_norm_2, post_feedforward_norm_1, post_feedforward_norm_2;
  std::vector<float> router_input_norm, per_expert_scale;
  float layer_scalar = 1.0f;
};

// Where each sequence's rows sit in the concatenated [rows, hidden] activations.
struct Model::Layout {
  std::vector<std::int64_t> offsets;  // sequences + 1 entries
  std::vector<RowRange> ranges;
  std::vector<std::int64_t> sequence_of_row;
  std::int64_t rows = 0;
  std::int64_t max_length = 0;
  std::shared_ptr<const RopeTable> rope;
  // Gemma 4's full-attention layers rotate by their own table (rope.h,
  // gemma4_full_attention_inv_freq); null elsewhere.
  std::shared_ptr<const RopeTable> full_attention_rope;

  std::int64_t sequences() const { return static_cast<std::int64_t>(ranges.size()); }
  std::int64_t length(std::int64_t s) const { return offsets[s + 1] - offsets[s]; }
};

// One gated MLP's intermediates.
struct Model::MlpTape {
  std::vector<float> input, gate, up, act, out;  // input/out: gathered rows (MoE experts)
  std::vector<std::int64_t> rows;                // MoE: token rows routed here, ascending
  std::vector<std::int64_t> slots;               // MoE: which of the top-k choices it was
  std::vector<RowRange> ranges;
};

// Intermediate values of one layer's forward, kept for its backward.
struct Model::LayerTape {
  const float* x = nullptr;           // layer input [rows, hidden], owned by the caller
  std::vector<float> h1, rstd1;       // input_layernorm output and 1/rms
  std::vector<float> q_proj, k_proj;  // q/k projections before the per-head norm (Qwen3)
  std::vector<float> q_rstd, k_rstd;  // per (row, head)
  std::vector<float> q, k, v;         // what attention multiplied (normed, rotated)
  std::vector<float> v_proj, v_rstd;  // Gemma 4: V before its scale-free norm, and 1/rms
  std::vector<float> attn, lse;       // attention output [rows, H*D] and lse [H, T] per seq
  // Gated attention (facts §5): the sigmoid gate's input and attn * sigmoid(gate), o_proj's
  // input. Gated DeltaNet (§4.2): in_proj_z's output and the gated norm's output (out_proj's
  // input). On Gated DeltaNet layers q_proj/k_proj hold the conv's q and k before the L2 norm,
  // q/k/v what the delta rule multiplied and attn its output.
  std::vector<float> gate, gated;
  std::vector<float> mixed;            // Gated DeltaNet: in_proj_qkv's output, the conv input
  std::vector<float> decay_input;      // Gated DeltaNet: a + dt_bias [rows, Hv]
  std::vector<float> g, beta;          // Gated DeltaNet: log decay and sigmoid(b) [rows, Hv]
  std::vector<float> gated_norm_rstd;  // Gated DeltaNet: [rows * Hv]
  // MLA (facts §3): the normed query and kv latents (q_b_proj's and kv_b_proj's inputs),
  // kv_a_proj_with_mqa's output [rows, kv_lora_rank + rope] and the heads' values o_proj
  // multiplies [rows, H * v_head_dim]. q_proj / k_proj hold the latents before their norms and
  // q_rstd / k_rstd their 1/rms; q, k, v are [rows, H, qk_head_dim] (v zero past v_head_dim, as
  // HF pads it for flash attention, §3 point 8) and attn the attention output in that layout.
  std::vector<float> q_latent, kv_latent, compressed_kv, mla_values;
  std::vector<float> x2;         // residual stream after attention
  std::vector<float> h2, rstd2;  // post_attention_layernorm output and 1/rms
  using MlpTape = Model::MlpTape;
  MlpTape mlp;
  std::vector<MlpTape> experts;
  MlpTape shared_expert;                   // out: the shared expert's output rows
  std::vector<float> shared_expert_scale;  // sigmoid(shared_expert_gate x) [rows]
  std::vector<float> router_probs;         // [rows, E]
  std::vector<std::int32_t> chosen;        // [rows, k]
  std::vector<float> routing_weights;      // [rows, k]
  // Gemma 4: the renormalised top-k weights before per_expert_scale [rows, k].
  std::vector<float> renormalized_weights;
  // Gemma 4's layer (gemma4_layer_forward): o_proj's output, the dense MLP's output, the routed
  // experts' sum, the FFN's sum f, the experts' and the router's inputs, each with its 1/rms;
  // u is the residual stream before layer_scalar.
  struct NormedInput {
    std::vector<float> values, rstd;
  };
  NormedInput attn_out, dense_out, routed, ffn, experts_in, router_in;
  std::vector<float> u;
  // Inputs rewritten by the activation quantizer, per Linear.
  std::map<const Linear*, std::vector<float>> quantized_inputs;
};

namespace {

// What differs between the architectures the runtime runs, beyond the config's fields.
struct ArchitectureTraits {
  std::string_view name;
  // Prefix of embed_tokens, norm and layers.N: Qwen3.5/3.6 nest the text model under
  // "model.language_model." (facts §9).
  std::string_view text_prefix = "model.";
  // q_norm/k_norm (RMSNorm over head_dim) before RoPE: Qwen3Attention
  // (transformers models/qwen3/modeling_qwen3.py) and the hybrid families' attention (facts §5).
  bool qk_norm = false;
  // RMSNorms multiply by 1 + w (facts §3.1), except the Gated DeltaNet's gated norm.
  bool zero_centred_norms = false;
  // Sparse MoE blocks where the config has experts.
  bool moe = false;
  // The top-k routing weights are renormalised whatever norm_topk_prob says: Qwen3.5-MoE has no
  // such flag (facts §6.2 step 1).
  bool always_renormalize = false;
  // Body experts packed as mlp.experts.gate_up_proj [E, 2I, H] (gate rows first) and
  // mlp.experts.down_proj [E, H, I] (facts §6.3).
  bool packed_experts = false;
  // Gated DeltaNet projections fused as in_proj_qkvz and in_proj_ba (Qwen3-Next, facts §4.1).
  bool fused_gdn_projections = false;
  // q_norm/k_norm span a token's whole q (k) projection, all heads at once, instead of each
  // head (MiniMax-M2's "per_layer" norm, minimax_m2-architecture-facts.md §3).
  bool qk_norm_over_all_heads = false;
  // Router scores are sigmoid(logits); experts are chosen by score + e_score_correction_bias
  // and weighted by their unbiased scores, renormalised (MiniMax-M2, facts §4). Otherwise
  // softmax scores, chosen and weighted as they are.
  bool sigmoid_router = false;
  // The shared experts are DeepSeek-V3's "mlp.shared_experts", added ungated
  // (deepseek_v3-architecture-facts.md §4), instead of Qwen's "mlp.shared_expert" scaled by
  // sigmoid(shared_expert_gate x).
  bool ungated_shared_experts = false;
  // The router's selection bias under the MoE block (sigmoid routers).
  std::string_view selection_bias = "e_score_correction_bias";
  // The MoE block's module under the layer, and its experts' gate, up and down projections.
  std::string_view moe_block = "mlp.";
  std::array<std::string_view, 3> expert_projections = {"gate_proj", "up_proj", "down_proj"};
  std::string_view router = "gate";  // the router's module under moe_block
  // Gemma 4 (gemma4-architecture-facts.md): the decoder layer of gemma4_layer_forward, GeGLU,
  // embeddings scaled by sqrt(hidden), per-layer-type attention, the final logit soft-cap.
  bool gemma4 = false;
};

constexpr ArchitectureTraits kArchitectures[] = {
    {.name = "LlamaForCausalLM"},
    {.name = "MistralForCausalLM"},
    {.name = "Qwen2ForCausalLM"},
    {.name = "Qwen3ForCausalLM", .qk_norm = true},
    {.name = "Qwen3MoeForCausalLM", .qk_norm = true, .moe = true},
    {.name = "Qwen3NextForCausalLM",
     .qk_norm = true,
     .zero_centred_norms = true,
     .moe = true,
     .fused_gdn_projections = true},
    {.name = "Qwen3_5ForConditionalGeneration",
     .text_prefix = "model.language_model.",
     .qk_norm = true,
     .zero_centred_norms = true},
    {.name = "Qwen3_5MoeForConditionalGeneration",
     .text_prefix = "model.language_model.",
     .qk_norm = true,
     .zero_centred_norms = true,
     .moe = true,
     .always_renormalize = true,
     .packed_experts = true},
    // MiniMax-M2 / M2.5 / M2.7: block_sparse_moe with experts w1 = gate, w3 = up, w2 = down
    // (minimax_m2-architecture-facts.md §5), renormalised top-k (§4 step 5).
    {.name = "MiniMaxM2ForCausalLM",
     .qk_norm = true,
     .moe = true,
     .always_renormalize = true,
     .qk_norm_over_all_heads = true,
     .sigmoid_router = true,
     .moe_block = "block_sparse_moe.",
     .expert_projections = {"w1", "w3", "w2"}},
    // DeepSeek-V3 / V3.1 / R1: MLA (ModelConfig::mla), a sigmoid router with its selection bias
    // under mlp.gate and the group limit, ungated shared experts (deepseek_v3-architecture-facts.md
    // §3-§5).
    {.name = "DeepseekV3ForCausalLM",
     .moe = true,
     .sigmoid_router = true,
     .ungated_shared_experts = true,
     .selection_bias = "gate.e_score_correction_bias"},
    // Gemma 4 31B / 26B-A4B: text model under model.language_model (§9), experts packed as
    // experts.gate_up_proj / experts.down_proj beside the layer's MLP, router router.proj (§6),
    // top-k renormalised (§6 step 2).
    {.name = "Gemma4ForConditionalGeneration",
     .text_prefix = "model.language_model.",
     .qk_norm = true,
     .moe = true,
     .always_renormalize = true,
     .packed_experts = true,
     .moe_block = "",
     .router = "router.proj",
     .gemma4 = true},
};

const ArchitectureTraits* find_architecture(std::string_view arch) {
  for (const ArchitectureTraits& traits : kArchitectures) {
    if (traits.name == arch) return &traits;
  }
  return nullptr;
}

float logistic(float x) {
  return 1.0f / (1.0f + std::exp(-x));
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

// DeepSeek-V3's group limit (deepseek_v3-architecture-facts.md §5 steps 3-4): the experts form
// n_group contiguous groups, each scored by the sum of its two largest choice values; the
// experts outside the topk_group best groups get -inf (DeepSeek's and vLLM's fill) so that top-k
// never picks them. Equal group scores keep the lower group first.
void limit_to_best_groups(const model::ModelConfig& c, std::vector<float>& choice) {
  const std::int64_t size = static_cast<std::int64_t>(choice.size()) / c.n_group;
  std::vector<float> score(c.n_group);
  for (std::int64_t g = 0; g < c.n_group; ++g) {
    const auto begin = choice.begin() + g * size;
    std::vector<float> members(begin, begin + size);
    std::partial_sort(members.begin(), members.begin() + 2, members.end(), std::greater<>());
    score[g] = members[0] + members[1];
  }
  std::vector<std::int64_t> groups(c.n_group);
  std::iota(groups.begin(), groups.end(), 0);
  std::partial_sort(groups.begin(), groups.begin() + c.topk_group, groups.end(),
                    [&](std::int64_t a, std::int64_t b) {
                      return score[a] > score[b] || (score[a] == score[b] && a < b);
                    });
  for (std::int64_t i = c.topk_group; i < c.n_group; ++i) {
    std::fill_n(choice.begin() + groups[i] * size, size, -INFINITY);
  }
}

}  // namespace

void require_runtime_support(const model::ModelConfig& config) {
  const std::string& arch = config.architecture;
  if (find_architecture(arch) != nullptr) return;
  std::vector<std::string_view> supported;
  for (const ArchitectureTraits& traits : kArchitectures) supported.push_back(traits.name);
  fail("architecture {} is not supported by the runtime (supported: {})", quoted_json_string(arch),
       fmt::join(supported, ", "));
}

Model::Model(model::ModelConfig config, const WeightSource& weights, RuntimeOptions options)
    : config_(std::move(config)), weights_(weights), options_(options) {
  require_runtime_support(config_);
  const std::string& arch = config_.architecture;
  const ArchitectureTraits& traits = *find_architecture(arch);
  // Gemma 4's GeGLU uses the tanh-approximated GELU (§5); vLLM requires exactly that (V-G).
  const std::string_view activation = traits.gemma4 ? "gelu_pytorch_tanh" : "silu";
  PQ_CHECK(config_.hidden_act == activation, "{}: hidden_act {} is not supported (only {})", arch,
           quoted_json_string(config_.hidden_act), activation);
  PQ_CHECK(!traits.gemma4 || config_.gemma4.has_value(),
           "{}: text_config model_type must be gemma4_text", arch);
  PQ_CHECK(config_.num_experts == 0 || find_architecture(arch)->moe,
           "{}: num_experts is set but the architecture has no MoE support", arch);
  PQ_CHECK(options_.logits_block_rows > 0, "logits_block_rows must be positive");
  qk_norm_ = traits.qk_norm;
  gemma4_ = traits.gemma4;
  router_name_ = traits.router;
  if (gemma4_) logit_softcap_ = static_cast<float>(config_.gemma4->final_logit_softcapping);
  zero_centred_norms_ = traits.zero_centred_norms;
  packed_experts_ = traits.packed_experts;
  fused_gdn_projections_ = traits.fused_gdn_projections;
  renormalize_top_k_ = config_.norm_topk_prob || traits.always_renormalize;
  qk_norm_over_all_heads_ = traits.qk_norm_over_all_heads;
  sigmoid_router_ = traits.sigmoid_router;
  ungated_shared_experts_ = traits.ungated_shared_experts;
  selection_bias_ = traits.selection_bias;
  moe_block_ = traits.moe_block;
  expert_projections_ = traits.expert_projections;
  text_prefix_ = traits.text_prefix;
  PQ_CHECK(!config_.attn_output_gate || qk_norm_,
           "{}: attn_output_gate is set but the architecture has no gated attention", arch);

  const std::int64_t hidden = config_.hidden_size;
  check_matrix(embedding_name(), config_.vocab_size, hidden);
  final_norm_ = load_norm(text_prefix_ + "norm.weight", hidden);
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

std::vector<float> Model::load_norm(const std::string& name, std::int64_t size) const {
  std::vector<float> weight = load_vector(name, size);
  // y = x_hat * (1 + w), in float32 (facts §3.1): the same product as a plain norm by 1 + w.
  if (zero_centred_norms_) {
    for (float& w : weight) w += 1.0f;
  }
  return weight;
}

std::string Model::embedding_name() const {
  return text_prefix_ + "embed_tokens.weight";
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
  load_weight(linear, weight_name);
  // Biases are used exactly when the checkpoint has them: Qwen2 always has q/k/v biases,
  // Llama/Qwen3 have them when attention_bias / mlp_bias are set (transformers modeling_*.py).
  const std::string bias_name = name + ".bias";
  if (weights_.contains(bias_name)) {
    PQ_CHECK(bias_allowed, "{}: unexpected bias tensor", bias_name);
    linear.bias = load_vector(bias_name, out_features);
  }
}

void Model::load_packed_linear(Linear& linear, const std::string& name, const std::string& tensor,
                               std::int64_t index, std::int64_t first_row,
                               std::int64_t rows_per_matrix, std::int64_t out_features,
                               std::int64_t in_features) const {
  PQ_CHECK(weights_.contains(tensor), "checkpoint has no tensor {}", tensor);
  const auto shape = weights_.shape(tensor);
  const std::int64_t experts = config_.num_experts;
  PQ_CHECK(shape == std::vector<std::int64_t>({experts, rows_per_matrix, in_features}),
           "{}: shape [{}], expected [{}, {}, {}]", tensor, fmt::join(shape, ", "), experts,
           rows_per_matrix, in_features);
  PQ_CHECK(!weights_.contains(name + ".bias"), "{}.bias: unexpected bias tensor", name);
  std::vector<std::int64_t> rows(out_features);
  std::iota(rows.begin(), rows.end(), index * rows_per_matrix + first_row);
  linear.name = name;
  linear.out_features = out_features;
  linear.in_features = in_features;
  linear.weight = weights_.load_rows_f32(tensor, rows);
  prepare_linear(linear);
}

void Model::load_weight(Linear& linear, const std::string& tensor) const {
  if (options_.compute == ComputeType::kBF16 && options_.weight_transform == nullptr &&
      !linear.keep_f32) {
    // The bf16 operand straight from the source: no float32 copy of the weight is made (for a
    // BF16 checkpoint these are its stored bits, what rounding the float32 decode would give).
    linear.weight_bf16 = weights_.load_bf16(tensor);
    weights_.release(tensor);
  } else {
    linear.weight = fetch(tensor);
    prepare_linear(linear);
  }
}

void Model::prepare_linear(Linear& linear) const {
  if (options_.weight_transform != nullptr) {
    options_.weight_transform->apply(linear.name, linear.out_features, linear.in_features,
                                     linear.weight);
  }
  if (options_.compute == ComputeType::kBF16 && !linear.keep_f32) {
    linear.weight_bf16.resize(linear.weight.size());
    convert_f32_to_bf16(linear.weight, linear.weight_bf16);
    linear.weight = {};
  }
}

std::unique_ptr<Model::Layer> Model::load_layer(std::int64_t index) const {
  return load_decoder_layer(index, fmt::format("{}layers.{}.", text_prefix_, index),
                            packed_experts_);
}

std::unique_ptr<Model::Layer> Model::load_decoder_layer(std::int64_t index,
                                                        const std::string& prefix,
                                                        bool packed_experts) const {
  const model::ModelConfig& c = config_;
  auto layer = std::make_unique<Layer>();
  layer->index = index;
  const std::int64_t hidden = c.hidden_size;
  layer->head_dim = c.attention_head_dim(index);
  layer->kv_heads = c.attention_key_value_heads(index);
  layer->attention_scale = 1.0f / std::sqrt(static_cast<float>(layer->head_dim));
  const std::int64_t q_width = c.num_attention_heads * layer->head_dim;
  const std::int64_t kv_width = layer->kv_heads * layer->head_dim;

  if (gemma4_) {
    // Sliding layers attend to the query and the sliding_window - 1 keys before it, full layers
    // to all; scores are not scaled (q/k norms set the scale); full layers rotate by the
    // proportional RoPE (facts §4.2, §4.3). The MLP is sandwiched by its own norms (§2).
    const bool sliding = c.is_sliding_attention_layer(index);
    layer->sliding_window = sliding ? c.sliding_window.value_or(0) : 0;
    layer->attention_scale = 1.0f;
    layer->full_attention_rope = !sliding;
    layer->v_norm.assign(layer->head_dim, 1.0f);
    layer->values_from_keys = !c.has_v_proj(index);
    layer->pre_feedforward_norm = load_norm(prefix + "pre_feedforward_layernorm.weight", hidden);
    layer->post_feedforward_norm = load_norm(prefix + "post_feedforward_layernorm.weight", hidden);
    layer->layer_scalar = load_vector(prefix + "layer_scalar", 1)[0];
  } else if (c.sliding_window.has_value() && *c.sliding_window > 0) {
    // Qwen2/Qwen3 slide only from layer max_window_layers on (transformers
    // configuration_qwen2.py layer_types); Mistral slides on every layer.
    const bool qwen = c.architecture.rfind("Qwen", 0) == 0;
    const std::int64_t first = qwen ? c.max_window_layers.value_or(c.num_hidden_layers) : 0;
    if (index >= first) layer->sliding_window = *c.sliding_window;
  }

  layer->input_norm = load_norm(prefix + "input_layernorm.weight", hidden);
  layer->post_attention_norm = load_norm(prefix + "post_attention_layernorm.weight", hidden);
  if (c.is_linear_attention_layer(index)) {
    // Gated DeltaNet parameters (facts §4.1); A_log and the norm may be stored in fp32 (§9).
    const model::LinearAttentionConfig& la = *c.linear_attention;
    const std::int64_t key_dim = la.num_key_heads * la.key_head_dim;
    const std::int64_t value_dim = la.num_value_heads * la.value_head_dim;
    const std::int64_t channels = 2 * key_dim + value_dim;
    PQ_CHECK(la.num_key_heads > 0 && la.num_value_heads % la.num_key_heads == 0,
             "config.json: linear_num_value_heads {} is not a multiple of linear_num_key_heads {}",
             la.num_value_heads, la.num_key_heads);
    auto gdn = std::make_unique<Layer::GatedDeltaNet>();
    const std::string p = prefix + "linear_attn.";
    gdn->fused = fused_gdn_projections_;
    if (gdn->fused) {
      load_linear(gdn->in_proj_qkvz, p + "in_proj_qkvz", channels + value_dim, hidden, false);
      load_linear(gdn->in_proj_ba, p + "in_proj_ba", 2 * la.num_value_heads, hidden, false);
    } else {
      load_linear(gdn->in_proj_qkv, p + "in_proj_qkv", channels, hidden, false);
      load_linear(gdn->in_proj_z, p + "in_proj_z", value_dim, hidden, false);
      load_linear(gdn->in_proj_b, p + "in_proj_b", la.num_value_heads, hidden, false);
      load_linear(gdn->in_proj_a, p + "in_proj_a", la.num_value_heads, hidden, false);
    }
    load_linear(gdn->out_proj, p + "out_proj", hidden, value_dim, false);
    const std::string conv = p + "conv1d.weight";
    PQ_CHECK(weights_.contains(conv), "checkpoint has no tensor {}", conv);
    const auto conv_shape = weights_.shape(conv);
    PQ_CHECK(conv_shape == std::vector<std::int64_t>({channels, 1, la.conv_kernel_dim}),
             "{}: shape [{}], expected [{}, 1, {}]", conv, fmt::join(conv_shape, ", "), channels,
             la.conv_kernel_dim);
    gdn->conv_weight = fetch(conv);
    gdn->a_log = load_vector(p + "A_log", la.num_value_heads);
    gdn->dt_bias = load_vector(p + "dt_bias", la.num_value_heads);
    gdn->norm = load_vector(p + "norm.weight", la.value_head_dim);
    layer->linear_attention = std::move(gdn);
  } else if (c.mla) {
    // MLA (deepseek_v3-architecture-facts.md §3): no biases (attention_bias false, §2 point 5).
    const model::MlaConfig& mla = *c.mla;
    const std::string p = prefix + "self_attn.";
    const std::int64_t q_rows = c.num_attention_heads * mla.qk_head_dim();
    if (mla.q_lora_rank > 0) {
      load_linear(layer->q_a_proj, p + "q_a_proj", mla.q_lora_rank, hidden, false);
      layer->q_a_norm = load_norm(p + "q_a_layernorm.weight", mla.q_lora_rank);
      load_linear(layer->q_b_proj, p + "q_b_proj", q_rows, mla.q_lora_rank, false);
    } else {
      load_linear(layer->q_proj, p + "q_proj", q_rows, hidden, false);
    }
    load_linear(layer->kv_a_proj, p + "kv_a_proj_with_mqa", mla.kv_lora_rank + mla.qk_rope_head_dim,
                hidden, false);
    layer->kv_a_norm = load_norm(p + "kv_a_layernorm.weight", mla.kv_lora_rank);
    load_linear(layer->kv_b_proj, p + "kv_b_proj",
                c.num_attention_heads * (mla.qk_nope_head_dim + mla.v_head_dim), mla.kv_lora_rank,
                false);
    load_linear(layer->o_proj, p + "o_proj", hidden, c.num_attention_heads * mla.v_head_dim, false);
  } else {
    // With an output gate q_proj yields query and gate per head (facts §5 step 1).
    const std::int64_t q_rows = c.attn_output_gate ? 2 * q_width : q_width;
    load_linear(layer->q_proj, prefix + "self_attn.q_proj", q_rows, hidden, true);
    load_linear(layer->k_proj, prefix + "self_attn.k_proj", kv_width, hidden, true);
    if (!layer->values_from_keys) {
      load_linear(layer->v_proj, prefix + "self_attn.v_proj", kv_width, hidden, true);
    } else {
      PQ_CHECK(!weights_.contains(prefix + "self_attn.v_proj.weight"),
               "{}self_attn.v_proj.weight: unexpected on an attention_k_eq_v full layer", prefix);
    }
    load_linear(layer->o_proj, prefix + "self_attn.o_proj", hidden, q_width, true);
    if (qk_norm_) {
      layer->q_norm = load_norm(prefix + "self_attn.q_norm.weight",
                                qk_norm_over_all_heads_ ? q_width : layer->head_dim);
      layer->k_norm = load_norm(prefix + "self_attn.k_norm.weight",
                                qk_norm_over_all_heads_ ? kv_width : layer->head_dim);
    }
  }
  const auto load_named_mlp = [&](Mlp& mlp, const std::string& mlp_prefix,
                                  std::int64_t intermediate,
                                  const std::array<std::string_view, 3>& names) {
    load_linear(mlp.gate_proj, mlp_prefix + std::string(names[0]), intermediate, hidden, true);
    load_linear(mlp.up_proj, mlp_prefix + std::string(names[1]), intermediate, hidden, true);
    load_linear(mlp.down_proj, mlp_prefix + std::string(names[2]), hidden, intermediate, true);
  };
  const auto load_mlp = [&](Mlp& mlp, const std::string& mlp_prefix, std::int64_t intermediate) {
    load_named_mlp(mlp, mlp_prefix, intermediate, {"gate_proj", "up_proj", "down_proj"});
  };
  layer->moe = c.is_moe_layer(index);
  if (layer->moe) {
    const std::string moe = prefix + moe_block_;
    layer->router.keep_f32 = sigmoid_router_;
    load_linear(layer->router, moe + router_name_, c.num_experts, hidden, false);
    if (gemma4_) {
      // The router sees rms(h) * router.scale * hidden^-1/2, the experts
      // pre_feedforward_layernorm_2(h); their weights are scaled by per_expert_scale (§6).
      layer->router_input_norm = load_vector(prefix + "router.scale", hidden);
      const float inverse_root = 1.0f / std::sqrt(static_cast<float>(hidden));
      for (float& w : layer->router_input_norm) w *= inverse_root;
      layer->per_expert_scale = load_vector(prefix + "router.per_expert_scale", c.num_experts);
      layer->pre_feedforward_norm_2 =
          load_norm(prefix + "pre_feedforward_layernorm_2.weight", hidden);
      layer->post_feedforward_norm_1 =
          load_norm(prefix + "post_feedforward_layernorm_1.weight", hidden);
      layer->post_feedforward_norm_2 =
          load_norm(prefix + "post_feedforward_layernorm_2.weight", hidden);
    }
    if (sigmoid_router_) {
      layer->router_selection_bias = load_vector(moe + std::string(selection_bias_), c.num_experts);
    }
    layer->experts.resize(c.num_experts);
    const std::int64_t inter = c.moe_intermediate_size;
    const std::string gate_up = moe + "experts.gate_up_proj";
    const std::string down = moe + "experts.down_proj";
    // A source of a packed family may still name its experts one by one: an exported checkpoint
    // and the decoded weights that measure and validate run hold per-expert Linears.
    if (packed_experts && weights_.contains(gate_up)) {
      // Expert e's Linears are slices of matrix e: gate rows [0, I) and up rows [I, 2I) of
      // gate_up_proj, all of down_proj (facts §6.3); each slice is decoded on its own.
      for (std::int64_t e = 0; e < c.num_experts; ++e) {
        Mlp& mlp = layer->experts[e];
        const std::string name = fmt::format("{}experts.{}.", moe, e);
        load_packed_linear(mlp.gate_proj, name + "gate_proj", gate_up, e, 0, 2 * inter, inter,
                           hidden);
        load_packed_linear(mlp.up_proj, name + "up_proj", gate_up, e, inter, 2 * inter, inter,
                           hidden);
        load_packed_linear(mlp.down_proj, name + "down_proj", down, e, 0, hidden, hidden, inter);
      }
      weights_.release(gate_up);
      weights_.release(down);
    } else {
      for (std::int64_t e = 0; e < c.num_experts; ++e) {
        load_named_mlp(layer->experts[e], fmt::format("{}experts.{}.", moe, e), inter,
                       expert_projections_);
      }
    }
    if (c.shared_expert_intermediate_size > 0 && ungated_shared_experts_) {
      layer->has_shared_expert = true;
      load_mlp(layer->shared_expert, prefix + "mlp.shared_experts.",
               c.shared_expert_intermediate_size);
    } else if (c.shared_expert_intermediate_size > 0) {
      layer->has_shared_expert = true;
      load_mlp(layer->shared_expert, prefix + "mlp.shared_expert.",
               c.shared_expert_intermediate_size);
      load_linear(layer->shared_expert_gate, prefix + "mlp.shared_expert_gate", 1, hidden, false);
    }
  }
  if (!layer->moe || gemma4_) {
    // Gemma 4's MoE layers keep their dense MLP beside the experts (§6).
    PQ_CHECK(c.intermediate_size > 0, "config.json: intermediate_size is missing");
    load_mlp(layer->mlp, prefix + "mlp.", c.intermediate_size);
  }
  return layer;
}

const Model::Linear& Model::acquire_head() {
  if (lm_head_) return *lm_head_;
  lm_head_ = std::make_shared<Linear>();
  lm_head_->logit_softcap = logit_softcap_;
  if (tied_head_) {
    lm_head_->name = "lm_head";
    lm_head_->out_features = config_.vocab_size;
    lm_head_->in_features = config_.hidden_size;
    load_weight(*lm_head_, embedding_name());
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
  if (!linear.weight_bf16.empty()) {
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
  const std::int64_t kv_heads = layer.kv_heads;
  const std::int64_t d = layer.head_dim;
  const float eps = static_cast<float>(c.rms_norm_eps);
  // Rows each token's q (k) projection is normalised in: one per head, or one for all heads.
  const std::int64_t q_norm_groups = qk_norm_over_all_heads_ ? 1 : heads;
  const std::int64_t kv_norm_groups = qk_norm_over_all_heads_ ? 1 : kv_heads;

  t.q.resize(n * heads * d);
  t.k.resize(n * kv_heads * d);
  t.v.resize(n * kv_heads * d);
  if (qk_norm_) {
    t.q_proj.resize(t.q.size());
    t.k_proj.resize(t.k.size());
    t.q_rstd.resize(n * q_norm_groups);
    t.k_rstd.resize(n * kv_norm_groups);
    if (c.attn_output_gate) {
      // Per head, columns [0, D) of q_proj's output are the query and [D, 2D) the gate
      // (facts §5 step 1).
      std::vector<float> packed(n * 2 * heads * d);
      linear_forward(layer.q_proj, t.h1.data(), n, packed.data(), &t);
      t.gate.resize(n * heads * d);
      for (std::int64_t rh = 0; rh < n * heads; ++rh) {
        std::copy_n(packed.data() + 2 * rh * d, d, t.q_proj.data() + rh * d);
        std::copy_n(packed.data() + (2 * rh + 1) * d, d, t.gate.data() + rh * d);
      }
    } else {
      linear_forward(layer.q_proj, t.h1.data(), n, t.q_proj.data(), &t);
    }
    linear_forward(layer.k_proj, t.h1.data(), n, t.k_proj.data(), &t);
    rms_norm_forward(t.q_proj.data(), layer.q_norm.data(), n * q_norm_groups,
                     heads * d / q_norm_groups, eps, t.q.data(), t.q_rstd.data());
    rms_norm_forward(t.k_proj.data(), layer.k_norm.data(), n * kv_norm_groups,
                     kv_heads * d / kv_norm_groups, eps, t.k.data(), t.k_rstd.data());
  } else {
    linear_forward(layer.q_proj, t.h1.data(), n, t.q.data(), &t);
    linear_forward(layer.k_proj, t.h1.data(), n, t.k.data(), &t);
  }
  if (!layer.v_norm.empty()) {
    // Gemma 4: V is the scale-free RMSNorm of v_proj's output, or of k_proj's on k_eq_v layers
    // (the raw projection, before k_norm and RoPE; facts §4.2 steps 2-3).
    if (layer.values_from_keys) {
      t.v_proj = t.k_proj;
    } else {
      t.v_proj.resize(t.v.size());
      linear_forward(layer.v_proj, t.h1.data(), n, t.v_proj.data(), &t);
    }
    t.v_rstd.resize(n * kv_heads);
    rms_norm_forward(t.v_proj.data(), layer.v_norm.data(), n * kv_heads, d, eps, t.v.data(),
                     t.v_rstd.data());
  } else {
    linear_forward(layer.v_proj, t.h1.data(), n, t.v.data(), &t);
  }
  const RopeTable& rope = rope_of(layer, layout);
  for (std::int64_t s = 0; s < layout.sequences(); ++s) {
    const std::int64_t off = layout.offsets[s];
    const std::int64_t len = layout.length(s);
    rope.apply(t.q.data() + off * heads * d, len, heads, first_position);
    rope.apply(t.k.data() + off * kv_heads * d, len, kv_heads, first_position);
  }
}

const RopeTable& Model::rope_of(const Layer& layer, const Layout& layout) const {
  return layer.full_attention_rope ? *layout.full_attention_rope : *layout.rope;
}

std::vector<const Model::Linear*> Model::attention_projections(const Layer& layer) const {
  if (layer.values_from_keys) return {&layer.q_proj, &layer.k_proj};
  return {&layer.q_proj, &layer.k_proj, &layer.v_proj};
}

void Model::store_keys_values(const Layer& layer, const Layout& layout, LayerTape& t,
                              LinearObserver* observer) const {
  const std::int64_t width = layer.kv_heads * layer.head_dim;
  if (observer != nullptr) {
    observer->on_kv_cache({.layer = layer.index,
                           .rows = layout.rows,
                           .width = width,
                           .keys = t.k.data(),
                           .values = t.v.data()});
  }
  if (options_.kv_cache == nullptr) return;
  if (const KvCacheScales* scales = options_.kv_cache->scales(layer.index)) {
    Fp8KvCache::round_trip(t.k, scales->key);
    Fp8KvCache::round_trip(t.v, scales->value);
  }
}

void Model::attention_forward(const Layer& layer, const Layout& layout, LayerTape& t,
                              LinearObserver* observer) const {
  const model::ModelConfig& c = config_;
  const std::int64_t n = layout.rows;
  const std::int64_t heads = c.num_attention_heads;
  const std::int64_t kv_heads = layer.kv_heads;
  const std::int64_t d = layer.head_dim;
  project_qkv(layer, layout, t, 0);
  store_keys_values(layer, layout, t, observer);
  t.attn.resize(n * heads * d);
  t.lse.resize(n * heads);
  for (std::int64_t s = 0; s < layout.sequences(); ++s) {
    const std::int64_t off = layout.offsets[s];
    const std::int64_t len = layout.length(s);
    if (len == 0) continue;
    const AttentionShape shape{
        len, heads, kv_heads, d, layer.attention_scale, layer.sliding_window};
    causal_attention_forward(shape, t.q.data() + off * heads * d, t.k.data() + off * kv_heads * d,
                             t.v.data() + off * kv_heads * d, t.attn.data() + off * heads * d,
                             t.lse.data() + off * heads);
  }
}

namespace {

// Attention of n new tokens of one sequence (positions past .. past + n - 1) over the cached keys
// and values [past + n, kv_heads * d]: token i attends positions j <= past + i, inside the
// sliding window if there is one (the convention of causal_attention_forward). q and out are
// [n, heads * d].
void attend_cached(std::int64_t n, std::int64_t past, std::int64_t heads, std::int64_t kv_heads,
                   std::int64_t d, float scale, std::int64_t sliding_window, const float* queries,
                   const float* keys, const float* values, float* output) {
  const std::int64_t group = heads / kv_heads;
#pragma omp parallel for collapse(2) if (n * heads * (past + n) * d > kParallelElements)
  for (std::int64_t i = 0; i < n; ++i) {
    for (std::int64_t h = 0; h < heads; ++h) {
      const std::int64_t position = past + i;
      const std::int64_t first =
          sliding_window > 0 ? std::max<std::int64_t>(0, position - sliding_window + 1) : 0;
      const float* q = queries + (i * heads + h) * d;
      const std::int64_t kv = h / group;
      std::vector<float> scores(position + 1 - first);
      float max_score = -INFINITY;
      for (std::int64_t j = first; j <= position; ++j) {
        const float* k = keys + (j * kv_heads + kv) * d;
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
      float* out = output + (i * heads + h) * d;
      std::fill(out, out + d, 0.0f);
      for (std::int64_t j = first; j <= position; ++j) {
        const float p = static_cast<float>(scores[j - first] / sum);
        const float* v = values + (j * kv_heads + kv) * d;
        for (std::int64_t e = 0; e < d; ++e) out[e] += p * v[e];
      }
    }
  }
}

}  // namespace

void Model::attention_forward_cached(const Layer& layer, const Layout& layout, LayerTape& t,
                                     DecodeState& state) const {
  const model::ModelConfig& c = config_;
  const std::int64_t n = layout.rows;  // new tokens, one sequence
  const std::int64_t heads = c.num_attention_heads;
  const std::int64_t kv_heads = layer.kv_heads;
  const std::int64_t d = layer.head_dim;
  const std::int64_t past = state.length;
  project_qkv(layer, layout, t, past);
  store_keys_values(layer, layout, t, nullptr);
  std::vector<float>& keys = state.keys[layer.index];
  std::vector<float>& values = state.values[layer.index];
  keys.insert(keys.end(), t.k.begin(), t.k.end());
  values.insert(values.end(), t.v.begin(), t.v.end());
  t.attn.resize(n * heads * d);
  attend_cached(n, past, heads, kv_heads, d, layer.attention_scale, layer.sliding_window,
                t.q.data(), keys.data(), values.data(), t.attn.data());
}

void Model::attention_backward(const Layer& layer, const Layout& layout, LayerTape& t,
                               const float* dattn_out, float* dh1, LinearObserver& observer) const {
  const model::ModelConfig& c = config_;
  const std::int64_t n = layout.rows;
  const std::int64_t heads = c.num_attention_heads;
  const std::int64_t kv_heads = layer.kv_heads;
  const std::int64_t d = layer.head_dim;
  const std::int64_t hidden = c.hidden_size;

  // o_proj: dY = d(attention output of the layer), X = attention values (gated).
  report(&observer, layer.o_proj.name, layer.index, n, heads * d, hidden,
         linear_input(layer.o_proj, mixer_output_input(layer, t), t), dattn_out, layout.ranges);
  std::vector<float> dattn(n * heads * d);
  linear_backward_input(layer.o_proj, dattn_out, n, dattn.data(), false);
  std::vector<float> dgate;
  if (c.attn_output_gate) {
    // out = attn * s, s = sigmoid(gate): dattn = dout * s, dgate = dout * attn * s (1 - s).
    dgate.resize(dattn.size());
    for (std::size_t i = 0; i < dattn.size(); ++i) {
      const float s = logistic(t.gate[i]);
      dgate[i] = dattn[i] * t.attn[i] * s * (1.0f - s);
      dattn[i] *= s;
    }
  }

  std::vector<float> dq(t.q.size()), dk(t.k.size()), dv(t.v.size());
  for (std::int64_t s = 0; s < layout.sequences(); ++s) {
    const std::int64_t off = layout.offsets[s];
    const std::int64_t len = layout.length(s);
    if (len == 0) continue;
    const AttentionShape shape{
        len, heads, kv_heads, d, layer.attention_scale, layer.sliding_window};
    causal_attention_backward(shape, t.q.data() + off * heads * d, t.k.data() + off * kv_heads * d,
                              t.v.data() + off * kv_heads * d, t.attn.data() + off * heads * d,
                              t.lse.data() + off * heads, dattn.data() + off * heads * d,
                              dq.data() + off * heads * d, dk.data() + off * kv_heads * d,
                              dv.data() + off * kv_heads * d);
    rope_of(layer, layout).apply_backward(dq.data() + off * heads * d, len, heads, 0);
    rope_of(layer, layout).apply_backward(dk.data() + off * kv_heads * d, len, kv_heads, 0);
  }
  if (!layer.v_norm.empty()) {
    // Back through the scale-free v_norm to v_proj's output, or on k_eq_v layers into k_proj's
    // (added below, after k_norm's backward).
    std::vector<float> dv_proj(dv.size());
    rms_norm_backward(t.v_proj.data(), layer.v_norm.data(), t.v_rstd.data(), dv.data(),
                      n * kv_heads, d, dv_proj.data(), false);
    dv.swap(dv_proj);
  }
  if (qk_norm_) {
    // dq, dk now hold gradients of the normalized values; take them back through the norms.
    std::vector<float> dq_proj(dq.size()), dk_proj(dk.size());
    const std::int64_t q_norm_groups = qk_norm_over_all_heads_ ? 1 : heads;
    const std::int64_t kv_norm_groups = qk_norm_over_all_heads_ ? 1 : kv_heads;
    rms_norm_backward(t.q_proj.data(), layer.q_norm.data(), t.q_rstd.data(), dq.data(),
                      n * q_norm_groups, heads * d / q_norm_groups, dq_proj.data(), false);
    rms_norm_backward(t.k_proj.data(), layer.k_norm.data(), t.k_rstd.data(), dk.data(),
                      n * kv_norm_groups, kv_heads * d / kv_norm_groups, dk_proj.data(), false);
    dq.swap(dq_proj);
    dk.swap(dk_proj);
  }
  if (layer.values_from_keys)
    add_inplace(dk.data(), dv.data(), static_cast<std::int64_t>(dk.size()));
  if (c.attn_output_gate) {
    // q_proj's output gradient, query and gate interleaved per head as its rows are.
    std::vector<float> packed(2 * dq.size());
    for (std::int64_t rh = 0; rh < n * heads; ++rh) {
      std::copy_n(dq.data() + rh * d, d, packed.data() + 2 * rh * d);
      std::copy_n(dgate.data() + rh * d, d, packed.data() + (2 * rh + 1) * d);
    }
    dq.swap(packed);
  }
  const std::vector<const Linear*> projections = attention_projections(layer);
  const std::vector<float>* grads[] = {&dq, &dk, &dv};
  for (std::size_t i = 0; i < projections.size(); ++i) {
    const Linear& p = *projections[i];
    report(&observer, p.name, layer.index, n, hidden, p.out_features,
           linear_input(p, t.h1.data(), t), grads[i]->data(), layout.ranges);
    linear_backward_input(p, grads[i]->data(), n, dh1, i > 0);
  }
}

// ---- Multi-head latent attention ----------------------------------------------------------

namespace {

// 1/sqrt(qk_head_dim), times mscale^2 with mscale = 0.1 mscale_all_dim ln(factor) + 1 when the
// rope is scaled with a non-zero mscale_all_dim and factor > 1 (transformers'
// DeepseekV3Attention with yarn_get_mscale; vLLM and DeepSeek agree for V3:
// deepseek_v3-architecture-facts.md §3 point 6).
float mla_softmax_scale(const model::ModelConfig& c) {
  double scale = 1.0 / std::sqrt(static_cast<double>(c.mla->qk_head_dim()));
  const model::RopeScaling& s = c.rope_scaling;
  const double all_dim = s.mscale_all_dim.value_or(0.0);
  if (s.type != "default" && all_dim != 0.0 && s.factor > 1.0) {
    const double mscale = 0.1 * all_dim * std::log(s.factor) + 1.0;
    scale *= mscale * mscale;
  }
  return static_cast<float>(scale);
}

}  // namespace

void Model::mla_forward(const Layer& layer, const Layout& layout, LayerTape& t,
                        LinearObserver* observer, DecodeState* cache) const {
  const model::ModelConfig& c = config_;
  const model::MlaConfig& mla = *c.mla;
  const std::int64_t n = layout.rows;
  const std::int64_t hidden = c.hidden_size;
  const std::int64_t heads = c.num_attention_heads;
  const std::int64_t nope = mla.qk_nope_head_dim;
  const std::int64_t rope = mla.qk_rope_head_dim;
  const std::int64_t dv = mla.v_head_dim;
  const std::int64_t dqk = mla.qk_head_dim();
  const std::int64_t kv_rank = mla.kv_lora_rank;
  const float eps = static_cast<float>(c.rms_norm_eps);

  // q = q_b_proj(RMSNorm(q_a_proj(x))) or q_proj(x), [n, H, nope + rope] (§3 step 1).
  t.q.resize(n * heads * dqk);
  if (mla.q_lora_rank > 0) {
    const std::int64_t q_rank = mla.q_lora_rank;
    t.q_proj.resize(n * q_rank);
    t.q_latent.resize(n * q_rank);
    t.q_rstd.resize(n);
    linear_forward(layer.q_a_proj, t.h1.data(), n, t.q_proj.data(), &t);
    rms_norm_forward(t.q_proj.data(), layer.q_a_norm.data(), n, q_rank, eps, t.q_latent.data(),
                     t.q_rstd.data());
    linear_forward(layer.q_b_proj, t.q_latent.data(), n, t.q.data(), &t);
    report(observer, layer.q_a_proj.name, layer.index, n, hidden, q_rank,
           linear_input(layer.q_a_proj, t.h1.data(), t), nullptr, layout.ranges);
    report(observer, layer.q_b_proj.name, layer.index, n, q_rank, heads * dqk,
           linear_input(layer.q_b_proj, t.q_latent.data(), t), nullptr, layout.ranges);
  } else {
    linear_forward(layer.q_proj, t.h1.data(), n, t.q.data(), &t);
    report(observer, layer.q_proj.name, layer.index, n, hidden, heads * dqk,
           linear_input(layer.q_proj, t.h1.data(), t), nullptr, layout.ranges);
  }
  // [c_kv | k_pe] = kv_a_proj_with_mqa(x); kv = kv_b_proj(RMSNorm(c_kv)) per head [k_nope | v]
  // (steps 2-3).
  t.compressed_kv.resize(n * (kv_rank + rope));
  linear_forward(layer.kv_a_proj, t.h1.data(), n, t.compressed_kv.data(), &t);
  report(observer, layer.kv_a_proj.name, layer.index, n, hidden, kv_rank + rope,
         linear_input(layer.kv_a_proj, t.h1.data(), t), nullptr, layout.ranges);
  t.k_proj.resize(n * kv_rank);
  for (std::int64_t r = 0; r < n; ++r) {
    std::copy_n(t.compressed_kv.data() + r * (kv_rank + rope), kv_rank,
                t.k_proj.data() + r * kv_rank);
  }
  t.kv_latent.resize(n * kv_rank);
  t.k_rstd.resize(n);
  rms_norm_forward(t.k_proj.data(), layer.kv_a_norm.data(), n, kv_rank, eps, t.kv_latent.data(),
                   t.k_rstd.data());
  std::vector<float> kv(n * heads * (nope + dv));
  linear_forward(layer.kv_b_proj, t.kv_latent.data(), n, kv.data(), &t);
  report(observer, layer.kv_b_proj.name, layer.index, n, kv_rank, heads * (nope + dv),
         linear_input(layer.kv_b_proj, t.kv_latent.data(), t), nullptr, layout.ranges);

  // RoPE on the last `rope` dims of every q head and on the shared k_pe, interleaved pairs on the
  // stored layout (step 4, §3.1); k_pe joins every head's key (MQA).
  std::vector<float> k_pe(n * rope);
  for (std::int64_t r = 0; r < n; ++r) {
    std::copy_n(t.compressed_kv.data() + r * (kv_rank + rope) + kv_rank, rope,
                k_pe.data() + r * rope);
  }
  // When decoding (one sequence), the new tokens continue after the cached ones.
  const std::int64_t past = cache != nullptr ? cache->length : 0;
  for (std::int64_t s = 0; s < layout.sequences(); ++s) {
    const std::int64_t off = layout.offsets[s];
    const std::int64_t len = layout.length(s);
    layout.rope->apply_interleaved(t.q.data() + off * heads * dqk + nope, len, heads, dqk, past);
    layout.rope->apply_interleaved(k_pe.data() + off * rope, len, 1, rope, past);
  }
  t.k.assign(n * heads * dqk, 0.0f);
  t.v.assign(n * heads * dqk, 0.0f);
  for (std::int64_t rh = 0; rh < n * heads; ++rh) {
    const float* src = kv.data() + rh * (nope + dv);
    std::copy_n(src, nope, t.k.data() + rh * dqk);
    std::copy_n(k_pe.data() + (rh / heads) * rope, rope, t.k.data() + rh * dqk + nope);
    std::copy_n(src + nope, dv, t.v.data() + rh * dqk);
  }
  // Causal softmax attention with the YaRN-scaled softmax scale (steps 5-6).
  t.attn.resize(n * heads * dqk);
  t.lse.resize(n * heads);
  const float scale = mla_softmax_scale(c);
  if (cache != nullptr) {
    // The cache holds every head's full key and (padded) value per token; the absorbed form of
    // §3 point 7 would hold the latent instead, with the same result.
    std::vector<float>& keys = cache->keys[layer.index];
    std::vector<float>& values = cache->values[layer.index];
    keys.insert(keys.end(), t.k.begin(), t.k.end());
    values.insert(values.end(), t.v.begin(), t.v.end());
    attend_cached(n, past, heads, heads, dqk, scale, 0, t.q.data(), keys.data(), values.data(),
                  t.attn.data());
  }
  for (std::int64_t s = 0; s < layout.sequences() && cache == nullptr; ++s) {
    const std::int64_t off = layout.offsets[s];
    const std::int64_t len = layout.length(s);
    if (len == 0) continue;
    const AttentionShape shape{len, heads, heads, dqk, scale, 0};
    causal_attention_forward(shape, t.q.data() + off * heads * dqk, t.k.data() + off * heads * dqk,
                             t.v.data() + off * heads * dqk, t.attn.data() + off * heads * dqk,
                             t.lse.data() + off * heads);
  }
  t.mla_values.resize(n * heads * dv);
  for (std::int64_t rh = 0; rh < n * heads; ++rh) {
    std::copy_n(t.attn.data() + rh * dqk, dv, t.mla_values.data() + rh * dv);
  }
}

void Model::mla_backward(const Layer& layer, const Layout& layout, LayerTape& t,
                         const float* dvalues, float* dh1, LinearObserver& observer) const {
  const model::ModelConfig& c = config_;
  const model::MlaConfig& mla = *c.mla;
  const std::int64_t n = layout.rows;
  const std::int64_t hidden = c.hidden_size;
  const std::int64_t heads = c.num_attention_heads;
  const std::int64_t nope = mla.qk_nope_head_dim;
  const std::int64_t rope = mla.qk_rope_head_dim;
  const std::int64_t dv = mla.v_head_dim;
  const std::int64_t dqk = mla.qk_head_dim();
  const std::int64_t kv_rank = mla.kv_lora_rank;

  std::vector<float> dattn(n * heads * dqk, 0.0f);
  for (std::int64_t rh = 0; rh < n * heads; ++rh) {
    std::copy_n(dvalues + rh * dv, dv, dattn.data() + rh * dqk);
  }
  std::vector<float> dq(t.q.size()), dk(t.k.size()), dvv(t.v.size());
  const float scale = mla_softmax_scale(c);
  for (std::int64_t s = 0; s < layout.sequences(); ++s) {
    const std::int64_t off = layout.offsets[s];
    const std::int64_t len = layout.length(s);
    if (len == 0) continue;
    const AttentionShape shape{len, heads, heads, dqk, scale, 0};
    const std::int64_t base = off * heads * dqk;
    causal_attention_backward(shape, t.q.data() + base, t.k.data() + base, t.v.data() + base,
                              t.attn.data() + base, t.lse.data() + off * heads, dattn.data() + base,
                              dq.data() + base, dk.data() + base, dvv.data() + base);
  }
  // k_pe is shared by the heads: its gradient is the sum of theirs (§3.1); the rotations go back
  // by the negative angle.
  std::vector<float> dkv(n * heads * (nope + dv));
  std::vector<float> dcompressed(n * (kv_rank + rope), 0.0f);
  for (std::int64_t r = 0; r < n; ++r) {
    float* dk_pe = dcompressed.data() + r * (kv_rank + rope) + kv_rank;
    for (std::int64_t h = 0; h < heads; ++h) {
      const std::int64_t rh = r * heads + h;
      std::copy_n(dk.data() + rh * dqk, nope, dkv.data() + rh * (nope + dv));
      std::copy_n(dvv.data() + rh * dqk, dv, dkv.data() + rh * (nope + dv) + nope);
      add_inplace(dk_pe, dk.data() + rh * dqk + nope, rope);
    }
  }
  for (std::int64_t s = 0; s < layout.sequences(); ++s) {
    const std::int64_t off = layout.offsets[s];
    const std::int64_t len = layout.length(s);
    layout.rope->apply_interleaved_backward(dq.data() + off * heads * dqk + nope, len, heads, dqk,
                                            0);
    layout.rope->apply_interleaved_backward(dcompressed.data() + off * (kv_rank + rope) + kv_rank,
                                            len, 1, kv_rank + rope, 0);
  }
  report(&observer, layer.kv_b_proj.name, layer.index, n, kv_rank, heads * (nope + dv),
         linear_input(layer.kv_b_proj, t.kv_latent.data(), t), dkv.data(), layout.ranges);
  std::vector<float> dlatent(n * kv_rank), dc(n * kv_rank);
  linear_backward_input(layer.kv_b_proj, dkv.data(), n, dlatent.data(), false);
  rms_norm_backward(t.k_proj.data(), layer.kv_a_norm.data(), t.k_rstd.data(), dlatent.data(), n,
                    kv_rank, dc.data(), false);
  for (std::int64_t r = 0; r < n; ++r) {
    std::copy_n(dc.data() + r * kv_rank, kv_rank, dcompressed.data() + r * (kv_rank + rope));
  }
  report(&observer, layer.kv_a_proj.name, layer.index, n, hidden, kv_rank + rope,
         linear_input(layer.kv_a_proj, t.h1.data(), t), dcompressed.data(), layout.ranges);
  linear_backward_input(layer.kv_a_proj, dcompressed.data(), n, dh1, false);
  if (mla.q_lora_rank > 0) {
    const std::int64_t q_rank = mla.q_lora_rank;
    report(&observer, layer.q_b_proj.name, layer.index, n, q_rank, heads * dqk,
           linear_input(layer.q_b_proj, t.q_latent.data(), t), dq.data(), layout.ranges);
    std::vector<float> dq_latent(n * q_rank), dq_a(n * q_rank);
    linear_backward_input(layer.q_b_proj, dq.data(), n, dq_latent.data(), false);
    rms_norm_backward(t.q_proj.data(), layer.q_a_norm.data(), t.q_rstd.data(), dq_latent.data(), n,
                      q_rank, dq_a.data(), false);
    report(&observer, layer.q_a_proj.name, layer.index, n, hidden, q_rank,
           linear_input(layer.q_a_proj, t.h1.data(), t), dq_a.data(), layout.ranges);
    linear_backward_input(layer.q_a_proj, dq_a.data(), n, dh1, true);
  } else {
    report(&observer, layer.q_proj.name, layer.index, n, hidden, heads * dqk,
           linear_input(layer.q_proj, t.h1.data(), t), dq.data(), layout.ranges);
    linear_backward_input(layer.q_proj, dq.data(), n, dh1, true);
  }
}

// ---- Gated DeltaNet -----------------------------------------------------------------------

const Model::Linear& Model::mixer_output(const Layer& layer) const {
  return layer.linear_attention ? layer.linear_attention->out_proj : layer.o_proj;
}

const float* Model::mixer_output_input(const Layer& layer, const LayerTape& t) const {
  if (config_.mla) return t.mla_values.data();
  return layer.linear_attention || config_.attn_output_gate ? t.gated.data() : t.attn.data();
}

namespace {

// The L2 norm's eps inside the square root of the sum of squares (facts §3.3, §11 point 3).
constexpr float kL2NormEps = 1e-6f;

struct GatedDeltaDims {
  std::int64_t key_heads, value_heads, key_dim, value_dim, kernel;
  std::int64_t keys() const { return key_heads * key_dim; }
  std::int64_t values() const { return value_heads * value_dim; }
  std::int64_t channels() const { return 2 * keys() + values(); }
  float query_scale() const { return 1.0f / std::sqrt(static_cast<float>(key_dim)); }
  GatedDeltaShape shape(std::int64_t len) const {
    return {len, key_heads, value_heads, key_dim, value_dim};
  }
};

GatedDeltaDims gated_delta_dims(const model::ModelConfig& c) {
  const model::LinearAttentionConfig& la = *c.linear_attention;
  return {la.num_key_heads, la.num_value_heads, la.key_head_dim, la.value_head_dim,
          la.conv_kernel_dim};
}

// Qwen3-Next's fused outputs (facts §4.1): in_proj_qkvz rows [q_g | k_g | v_g | z_g] and
// in_proj_ba rows [b_g | a_g] per key-head group g, v_g, z_g, b_g and a_g covering the group's
// r value heads. Copies them into Qwen3.5's layout (mixed = [q | k | v], z, b, a), or with
// to_fused the other way (the backward's gradients).
void move_fused_projections(const GatedDeltaDims& dims, std::int64_t rows, float* qkvz, float* ba,
                            float* mixed, float* z, float* b, float* a, bool to_fused) {
  const std::int64_t r = dims.value_heads / dims.key_heads;
  const std::int64_t dk = dims.key_dim;
  const std::int64_t group_values = r * dims.value_dim;
  const auto move = [to_fused](float* fused, float* split, std::int64_t count) {
    if (to_fused) {
      std::copy_n(split, count, fused);
    } else {
      std::copy_n(fused, count, split);
    }
  };
  for (std::int64_t row = 0; row < rows; ++row) {
    float* f = qkvz + row * (dims.channels() + dims.values());
    float* m = mixed + row * dims.channels();
    float* fba = ba + row * 2 * dims.value_heads;
    for (std::int64_t g = 0; g < dims.key_heads; ++g) {
      float* group = f + g * (2 * dk + 2 * group_values);
      move(group, m + g * dk, dk);
      move(group + dk, m + dims.keys() + g * dk, dk);
      move(group + 2 * dk, m + 2 * dims.keys() + g * group_values, group_values);
      move(group + 2 * dk + group_values, z + row * dims.values() + g * group_values, group_values);
      move(fba + g * 2 * r, b + row * dims.value_heads + g * r, r);
      move(fba + g * 2 * r + r, a + row * dims.value_heads + g * r, r);
    }
  }
}

// softplus with torch's defaults (beta 1, threshold 20: x itself above 20; facts §3.4).
float softplus(float x) {
  return x > 20.0f ? x : std::log1p(std::exp(x));
}

}  // namespace

void Model::gated_delta_net_forward(const Layer& layer, const Layout& layout, LayerTape& t,
                                    LinearObserver* observer, DecodeState* cache) const {
  const Layer::GatedDeltaNet& gdn = *layer.linear_attention;
  const GatedDeltaDims dims = gated_delta_dims(config_);
  const std::int64_t n = layout.rows;
  const std::int64_t hidden = config_.hidden_size;
  const std::int64_t channels = dims.channels();
  const std::int64_t keys = dims.keys();
  const std::int64_t values = dims.values();
  const std::int64_t hv = dims.value_heads;

  // Projections of the normed input (facts §4.2 step 1).
  t.mixed.resize(n * channels);
  t.gate.resize(n * values);
  t.beta.resize(n * hv);
  t.decay_input.resize(n * hv);
  if (gdn.fused) {
    std::vector<float> qkvz(n * (channels + values)), ba(n * 2 * hv);
    linear_forward(gdn.in_proj_qkvz, t.h1.data(), n, qkvz.data(), &t);
    linear_forward(gdn.in_proj_ba, t.h1.data(), n, ba.data(), &t);
    move_fused_projections(dims, n, qkvz.data(), ba.data(), t.mixed.data(), t.gate.data(),
                           t.beta.data(), t.decay_input.data(), /*to_fused=*/false);
  } else {
    linear_forward(gdn.in_proj_qkv, t.h1.data(), n, t.mixed.data(), &t);
    linear_forward(gdn.in_proj_z, t.h1.data(), n, t.gate.data(), &t);
    linear_forward(gdn.in_proj_b, t.h1.data(), n, t.beta.data(), &t);
    linear_forward(gdn.in_proj_a, t.h1.data(), n, t.decay_input.data(), &t);
  }
  for (const Linear* p : gdn.input_projections()) {
    report(observer, p->name, layer.index, n, hidden, p->out_features,
           linear_input(*p, t.h1.data(), t), nullptr, layout.ranges);
  }

  // Causal conv + SiLU over q/k/v channels, per sequence (step 2), then the split (step 3).
  std::vector<float> conv(n * channels);
  if (cache != nullptr) {
    // The new tokens after the cached K - 1 inputs: the conv over both gives, in its last n
    // rows, what a pass over the whole sequence gives the new tokens.
    std::vector<float>& history = cache->conv_inputs[layer.index];
    const std::int64_t past = dims.kernel - 1;
    if (history.empty()) history.assign(past * channels, 0.0f);
    std::vector<float> inputs(history);
    inputs.insert(inputs.end(), t.mixed.begin(), t.mixed.end());
    std::vector<float> outputs(inputs.size());
    causal_conv1d_silu_forward(inputs.data(), gdn.conv_weight.data(), past + n, channels,
                               dims.kernel, outputs.data());
    std::copy(outputs.begin() + past * channels, outputs.end(), conv.begin());
    history.assign(inputs.end() - past * channels, inputs.end());
  } else {
    for (std::int64_t s = 0; s < layout.sequences(); ++s) {
      const std::int64_t off = layout.offsets[s];
      causal_conv1d_silu_forward(t.mixed.data() + off * channels, gdn.conv_weight.data(),
                                 layout.length(s), channels, dims.kernel,
                                 conv.data() + off * channels);
    }
  }
  t.q_proj.resize(n * keys);
  t.k_proj.resize(n * keys);
  t.v.resize(n * values);
  for (std::int64_t r = 0; r < n; ++r) {
    const float* row = conv.data() + r * channels;
    std::copy_n(row, keys, t.q_proj.data() + r * keys);
    std::copy_n(row + keys, keys, t.k_proj.data() + r * keys);
    std::copy_n(row + 2 * keys, values, t.v.data() + r * values);
  }
  // L2 norms, q scaled by dk^-1/2 after its norm (step 7).
  t.q.resize(n * keys);
  t.k.resize(n * keys);
  l2_normalize_forward(t.q_proj.data(), n * dims.key_heads, dims.key_dim, kL2NormEps,
                       dims.query_scale(), t.q.data());
  l2_normalize_forward(t.k_proj.data(), n * dims.key_heads, dims.key_dim, kL2NormEps, 1.0f,
                       t.k.data());
  // beta = sigmoid(b) (step 4); g = -exp(A_log) softplus(a + dt_bias), fp32 (step 5).
  t.g.resize(n * hv);
  for (std::int64_t r = 0; r < n; ++r) {
    for (std::int64_t h = 0; h < hv; ++h) {
      float& a = t.decay_input[r * hv + h];
      a += gdn.dt_bias[h];
      t.g[r * hv + h] = -std::exp(gdn.a_log[h]) * softplus(a);
      t.beta[r * hv + h] = logistic(t.beta[r * hv + h]);
    }
  }
  // The delta rule from a zero state for every sequence (step 8, §4.5), or from the cached
  // state when decoding.
  t.attn.resize(n * values);
  for (std::int64_t s = 0; s < layout.sequences(); ++s) {
    const std::int64_t off = layout.offsets[s];
    GatedDeltaInputs in{t.q.data() + off * keys, t.k.data() + off * keys, t.v.data() + off * values,
                        t.g.data() + off * hv, t.beta.data() + off * hv};
    if (cache == nullptr) {
      gated_delta_rule_forward(dims.shape(layout.length(s)), in, t.attn.data() + off * values,
                               nullptr);
      continue;
    }
    std::vector<float>& state = cache->recurrent_states[layer.index];
    std::vector<float> next(hv * dims.key_dim * dims.value_dim);
    if (!state.empty()) in.initial_state = state.data();
    gated_delta_rule_forward(dims.shape(layout.length(s)), in, t.attn.data() + off * values,
                             next.data());
    state.swap(next);
  }
  // Gated RMSNorm per value head, norm before gate (step 9, §3.2).
  t.gated.resize(n * values);
  t.gated_norm_rstd.resize(n * hv);
  gated_rms_norm_forward(t.attn.data(), t.gate.data(), gdn.norm.data(), n * hv, dims.value_dim,
                         static_cast<float>(config_.rms_norm_eps), t.gated.data(),
                         t.gated_norm_rstd.data());
}

void Model::gated_delta_net_backward(const Layer& layer, const Layout& layout, LayerTape& t,
                                     const float* dout, float* dh1,
                                     LinearObserver& observer) const {
  const Layer::GatedDeltaNet& gdn = *layer.linear_attention;
  const GatedDeltaDims dims = gated_delta_dims(config_);
  const std::int64_t n = layout.rows;
  const std::int64_t hidden = config_.hidden_size;
  const std::int64_t channels = dims.channels();
  const std::int64_t keys = dims.keys();
  const std::int64_t values = dims.values();
  const std::int64_t hv = dims.value_heads;

  report(&observer, gdn.out_proj.name, layer.index, n, values, hidden,
         linear_input(gdn.out_proj, t.gated.data(), t), dout, layout.ranges);
  std::vector<float> dnormed(n * values);
  linear_backward_input(gdn.out_proj, dout, n, dnormed.data(), false);
  std::vector<float> dcore(n * values), dz(n * values);
  gated_rms_norm_backward(t.attn.data(), t.gate.data(), gdn.norm.data(), t.gated_norm_rstd.data(),
                          dnormed.data(), n * hv, dims.value_dim, dcore.data(), dz.data());

  std::vector<float> dq(n * keys), dk(n * keys), dv(n * values), dg(n * hv), dbeta(n * hv);
  for (std::int64_t s = 0; s < layout.sequences(); ++s) {
    const std::int64_t off = layout.offsets[s];
    const GatedDeltaInputs in{t.q.data() + off * keys, t.k.data() + off * keys,
                              t.v.data() + off * values, t.g.data() + off * hv,
                              t.beta.data() + off * hv};
    const GatedDeltaGradients grads{dq.data() + off * keys, dk.data() + off * keys,
                                    dv.data() + off * values, dg.data() + off * hv,
                                    dbeta.data() + off * hv};
    gated_delta_rule_backward(dims.shape(layout.length(s)), in, dcore.data() + off * values,
                              nullptr, grads);
  }
  // Back through the L2 norms to the conv output, then through the conv (§4.6).
  std::vector<float> dq_conv(n * keys), dk_conv(n * keys);
  l2_normalize_backward(t.q_proj.data(), dq.data(), n * dims.key_heads, dims.key_dim, kL2NormEps,
                        dims.query_scale(), dq_conv.data());
  l2_normalize_backward(t.k_proj.data(), dk.data(), n * dims.key_heads, dims.key_dim, kL2NormEps,
                        1.0f, dk_conv.data());
  std::vector<float> dconv(n * channels);
  for (std::int64_t r = 0; r < n; ++r) {
    float* row = dconv.data() + r * channels;
    std::copy_n(dq_conv.data() + r * keys, keys, row);
    std::copy_n(dk_conv.data() + r * keys, keys, row + keys);
    std::copy_n(dv.data() + r * values, values, row + 2 * keys);
  }
  std::vector<float> dmixed(n * channels);
  for (std::int64_t s = 0; s < layout.sequences(); ++s) {
    const std::int64_t off = layout.offsets[s];
    causal_conv1d_silu_backward(t.mixed.data() + off * channels, gdn.conv_weight.data(),
                                dconv.data() + off * channels, layout.length(s), channels,
                                dims.kernel, dmixed.data() + off * channels);
  }
  // db = dbeta beta (1 - beta); da = dg (-exp(A_log)) softplus'(a + dt_bias), softplus' being
  // sigmoid below torch's threshold and 1 above it (§4.6).
  std::vector<float> db(n * hv), da(n * hv);
  for (std::int64_t r = 0; r < n; ++r) {
    for (std::int64_t h = 0; h < hv; ++h) {
      const std::int64_t i = r * hv + h;
      db[i] = dbeta[i] * t.beta[i] * (1.0f - t.beta[i]);
      const float x = t.decay_input[i];
      da[i] = dg[i] * -std::exp(gdn.a_log[h]) * (x > 20.0f ? 1.0f : logistic(x));
    }
  }
  std::vector<std::vector<float>> grads;
  if (gdn.fused) {
    // The fused projections' output gradients, interleaved as their rows are.
    grads.assign({std::vector<float>(n * (channels + values)), std::vector<float>(n * 2 * hv)});
    move_fused_projections(dims, n, grads[0].data(), grads[1].data(), dmixed.data(), dz.data(),
                           db.data(), da.data(), /*to_fused=*/true);
  } else {
    grads = {std::move(dmixed), std::move(dz), std::move(db), std::move(da)};
  }
  const std::vector<const Linear*> projections = gdn.input_projections();
  for (std::size_t i = 0; i < projections.size(); ++i) {
    const Linear& p = *projections[i];
    report(&observer, p.name, layer.index, n, hidden, p.out_features,
           linear_input(p, t.h1.data(), t), grads[i].data(), layout.ranges);
    linear_backward_input(p, grads[i].data(), n, dh1, i > 0);
  }
}

// ---- MLP and MoE --------------------------------------------------------------------------

void Model::gated_mlp_forward(const Layer& layer, const Mlp& mlp, LayerTape& t, MlpTape& m,
                              const float* input, std::int64_t rows, float* result,
                              std::span<const RowRange> ranges, LinearObserver* observer) const {
  const std::int64_t hidden = config_.hidden_size;
  const std::int64_t inter = mlp.gate_proj.out_features;
  m.gate.resize(rows * inter);
  m.up.resize(rows * inter);
  m.act.resize(rows * inter);
  linear_forward(mlp.gate_proj, input, rows, m.gate.data(), &t);
  linear_forward(mlp.up_proj, input, rows, m.up.data(), &t);
  if (gemma4_) {
    geglu_forward(m.gate.data(), m.up.data(), rows * inter, m.act.data());
  } else {
    swiglu_forward(m.gate.data(), m.up.data(), rows * inter, m.act.data());
  }
  linear_forward(mlp.down_proj, m.act.data(), rows, result, &t);
  report(observer, mlp.gate_proj.name, layer.index, rows, hidden, inter,
         linear_input(mlp.gate_proj, input, t), nullptr, ranges);
  report(observer, mlp.up_proj.name, layer.index, rows, hidden, inter,
         linear_input(mlp.up_proj, input, t), nullptr, ranges);
  report(observer, mlp.down_proj.name, layer.index, rows, inter, hidden,
         linear_input(mlp.down_proj, m.act.data(), t), nullptr, ranges);
}

void Model::gated_mlp_backward(const Layer& layer, const Mlp& mlp, LayerTape& t, MlpTape& m,
                               const float* input, std::int64_t rows, const float* dy,
                               float* dinput, bool accumulate, std::span<const RowRange> ranges,
                               LinearObserver& observer) const {
  const std::int64_t hidden = config_.hidden_size;
  const std::int64_t inter = mlp.gate_proj.out_features;
  report(&observer, mlp.down_proj.name, layer.index, rows, inter, hidden,
         linear_input(mlp.down_proj, m.act.data(), t), dy, ranges);
  std::vector<float> dact(rows * inter);
  linear_backward_input(mlp.down_proj, dy, rows, dact.data(), false);
  std::vector<float> dgate(rows * inter), dup(rows * inter);
  if (gemma4_) {
    geglu_backward(m.gate.data(), m.up.data(), dact.data(), rows * inter, dgate.data(), dup.data());
  } else {
    swiglu_backward(m.gate.data(), m.up.data(), dact.data(), rows * inter, dgate.data(),
                    dup.data());
  }
  report(&observer, mlp.gate_proj.name, layer.index, rows, hidden, inter,
         linear_input(mlp.gate_proj, input, t), dgate.data(), ranges);
  report(&observer, mlp.up_proj.name, layer.index, rows, hidden, inter,
         linear_input(mlp.up_proj, input, t), dup.data(), ranges);
  linear_backward_input(mlp.gate_proj, dgate.data(), rows, dinput, accumulate);
  linear_backward_input(mlp.up_proj, dup.data(), rows, dinput, true);
}

void Model::mlp_forward(const Layer& layer, const Layout& layout, LayerTape& t, float* out,
                        LinearObserver* observer, bool report_linears) const {
  if (!layer.moe) {
    gated_mlp_forward(layer, layer.mlp, t, t.mlp, t.h2.data(), layout.rows, out, layout.ranges,
                      report_linears ? observer : nullptr);
    return;
  }
  moe_forward(layer, layout, t, t.h2.data(), t.h2.data(), out, observer, report_linears);
}

void Model::moe_forward(const Layer& layer, const Layout& layout, LayerTape& t,
                        const float* router_input, const float* expert_input, float* out,
                        LinearObserver* observer, bool report_linears) const {
  const model::ModelConfig& c = config_;
  const std::int64_t n = layout.rows;
  const std::int64_t hidden = c.hidden_size;
  LinearObserver* linear_observer = report_linears ? observer : nullptr;
  const auto run_mlp = [&](const Mlp& mlp, MlpTape& m, const float* input, std::int64_t rows,
                           float* result, std::span<const RowRange> ranges) {
    gated_mlp_forward(layer, mlp, t, m, input, rows, result, ranges, linear_observer);
  };

  // Qwen3MoeSparseMoeBlock (transformers models/qwen3_moe/modeling_qwen3_moe.py): softmax of
  // the router logits in float32, top-k, optional renormalization of the k weights, then the
  // weighted sum of the chosen experts' SwiGLU outputs. MiniMax-M2 scores with a sigmoid and
  // chooses with a selection bias (minimax_m2-architecture-facts.md §4).
  const std::int64_t experts = c.num_experts;
  const std::int64_t top_k = c.num_experts_per_tok;
  t.router_probs.resize(n * experts);
  linear_forward(layer.router, router_input, n, t.router_probs.data(), &t);
  report(linear_observer, layer.router.name, layer.index, n, hidden, experts,
         linear_input(layer.router, router_input, t), nullptr, layout.ranges);
  t.chosen.resize(n * top_k);
  t.routing_weights.resize(n * top_k);
#pragma omp parallel for if (n * experts > kParallelElements)
  for (std::int64_t r = 0; r < n; ++r) {
    float* p = t.router_probs.data() + r * experts;
    // What the experts are chosen by: the scores, or (MiniMax-M2) the scores plus the selection
    // bias, which never enters the weights (facts §4 steps 3-5).
    std::vector<float> choice(experts);
    if (sigmoid_router_) {
      for (std::int64_t e = 0; e < experts; ++e) {
        p[e] = logistic(p[e]);
        choice[e] = p[e] + layer.router_selection_bias[e];
      }
    } else {
      const float max_logit = *std::max_element(p, p + experts);
      double sum = 0.0;
      for (std::int64_t e = 0; e < experts; ++e)
        sum += std::exp(static_cast<double>(p[e]) - max_logit);
      for (std::int64_t e = 0; e < experts; ++e) {
        p[e] = static_cast<float>(std::exp(static_cast<double>(p[e]) - max_logit) / sum);
        choice[e] = p[e];
      }
    }
    if (c.n_group > 1) limit_to_best_groups(c, choice);
    std::vector<std::int32_t> order(experts);
    std::iota(order.begin(), order.end(), 0);
    // Highest choice first; equal choices keep the lower expert index first.
    const float* q = choice.data();
    std::partial_sort(
        order.begin(), order.begin() + top_k, order.end(),
        [q](std::int32_t a, std::int32_t b) { return q[a] > q[b] || (q[a] == q[b] && a < b); });
    double chosen_sum = 0.0;
    for (std::int64_t j = 0; j < top_k; ++j) chosen_sum += p[order[j]];
    // DeepSeek-V3 scales the (renormalised) weights by routed_scaling_factor (facts §5 step 5);
    // 1 elsewhere.
    const double scale = c.routed_scaling_factor;
    for (std::int64_t j = 0; j < top_k; ++j) {
      t.chosen[r * top_k + j] = order[j];
      const double weight = renormalize_top_k_ ? p[order[j]] / chosen_sum : p[order[j]];
      t.routing_weights[r * top_k + j] = static_cast<float>(scale * weight);
    }
  }
  if (!layer.per_expert_scale.empty()) {
    // Gemma 4 scales each renormalised weight by its expert's per_expert_scale (facts §6 step 2).
    t.renormalized_weights = t.routing_weights;
    for (std::int64_t i = 0; i < n * top_k; ++i) {
      t.routing_weights[i] *= layer.per_expert_scale[t.chosen[i]];
    }
  }

  std::fill(out, out + n * hidden, 0.0f);
  t.experts.assign(experts, {});
  std::vector<std::int64_t> counts(experts, 0);
  for (std::int64_t r = 0; r < n; ++r) {
    for (std::int64_t j = 0; j < top_k; ++j) {
      MlpTape& m = t.experts[t.chosen[r * top_k + j]];
      m.rows.push_back(r);
      m.slots.push_back(j);
    }
  }
  for (std::int64_t e = 0; e < experts; ++e) {
    MlpTape& m = t.experts[e];
    const std::int64_t rows = static_cast<std::int64_t>(m.rows.size());
    counts[e] = rows;
    m.ranges = ranges_of_rows(m.rows, layout.sequence_of_row);
    m.input.resize(rows * hidden);
    for (std::int64_t i = 0; i < rows; ++i) {
      std::copy_n(expert_input + m.rows[i] * hidden, hidden, m.input.data() + i * hidden);
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
  if (layer.has_shared_expert && ungated_shared_experts_) {
    // out += SharedMLP(x) (deepseek_v3-architecture-facts.md §4).
    LayerTape::MlpTape& m = t.shared_expert;
    m.out.resize(n * hidden);
    run_mlp(layer.shared_expert, m, t.h2.data(), n, m.out.data(), layout.ranges);
    add_inplace(out, m.out.data(), n * hidden);
  } else if (layer.has_shared_expert) {
    // out += sigmoid(shared_expert_gate x) * SharedMLP(x), a scalar per token (facts §6.2).
    MlpTape& m = t.shared_expert;
    m.out.resize(n * hidden);
    run_mlp(layer.shared_expert, m, t.h2.data(), n, m.out.data(), layout.ranges);
    t.shared_expert_scale.resize(n);
    linear_forward(layer.shared_expert_gate, t.h2.data(), n, t.shared_expert_scale.data(), &t);
    report(linear_observer, layer.shared_expert_gate.name, layer.index, n, hidden, 1,
           linear_input(layer.shared_expert_gate, t.h2.data(), t), nullptr, layout.ranges);
    for (std::int64_t r = 0; r < n; ++r) {
      const float s = logistic(t.shared_expert_scale[r]);
      t.shared_expert_scale[r] = s;
      float* dst = out + r * hidden;
      const float* src = m.out.data() + r * hidden;
      for (std::int64_t h = 0; h < hidden; ++h) dst[h] += s * src[h];
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
  if (!layer.moe) {
    gated_mlp_backward(layer, layer.mlp, t, t.mlp, t.h2.data(), layout.rows, dout, dh2, false,
                       layout.ranges, observer);
    return;
  }
  moe_backward(layer, layout, t, t.h2.data(), dout, dh2, dh2, observer);
}

void Model::moe_backward(const Layer& layer, const Layout& layout, LayerTape& t,
                         const float* router_input, const float* dout, float* drouter_input,
                         float* dexpert_input, LinearObserver& observer) const {
  const model::ModelConfig& c = config_;
  const std::int64_t n = layout.rows;
  const std::int64_t hidden = c.hidden_size;
  // Backward of one gated MLP on `rows` rows: dy [rows, hidden] -> d(input), written or added.
  const auto run_mlp_backward = [&](const Mlp& mlp, MlpTape& m, const float* input,
                                    std::int64_t rows, const float* dy, float* dinput,
                                    bool accumulate, std::span<const RowRange> ranges) {
    gated_mlp_backward(layer, mlp, t, m, input, rows, dy, dinput, accumulate, ranges, observer);
  };
  float* dh2 = dexpert_input;

  const std::int64_t experts = c.num_experts;
  const std::int64_t top_k = c.num_experts_per_tok;
  std::fill(dh2, dh2 + n * hidden, 0.0f);
  std::vector<float> dweights(n * top_k, 0.0f);  // dLoss / d(routing weight)
  for (std::int64_t e = 0; e < experts; ++e) {
    MlpTape& m = t.experts[e];
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

  // Through the (optionally renormalized) top-k selection and the softmax (or sigmoid) to the
  // router logits.
  // With S = sum of the chosen probabilities and w_j = rho p_j / S (rho = routed_scaling_factor,
  // 1 but for DeepSeek-V3): dL/dp_j = (rho g_j - sum_i g_i w_i) / S for chosen j, 0 otherwise
  // (rho g_j unnormalised); then dL/dlogit = p * (dL/dp - sum(p * dL/dp)). The group limit only
  // selects and carries no gradient (facts §5).
  // Gemma 4: w = w_renormalised * per_expert_scale, so dL/dw_renormalised = dL/dw * scale.
  const double scale = c.routed_scaling_factor;
  const bool scaled = !layer.per_expert_scale.empty();
  if (scaled) {
    for (std::int64_t i = 0; i < n * top_k; ++i) {
      dweights[i] *= layer.per_expert_scale[t.chosen[i]];
    }
  }
  const std::vector<float>& renormalized = scaled ? t.renormalized_weights : t.routing_weights;
  std::vector<float> dlogits(n * experts);
#pragma omp parallel for if (n * experts > kParallelElements)
  for (std::int64_t r = 0; r < n; ++r) {
    const float* p = t.router_probs.data() + r * experts;
    std::vector<double> dp(experts, 0.0);
    double chosen_sum = 0.0, gw = 0.0;
    for (std::int64_t j = 0; j < top_k; ++j) {
      chosen_sum += p[t.chosen[r * top_k + j]];
      gw += static_cast<double>(dweights[r * top_k + j]) * renormalized[r * top_k + j];
    }
    for (std::int64_t j = 0; j < top_k; ++j) {
      const double g = dweights[r * top_k + j];
      dp[t.chosen[r * top_k + j]] = renormalize_top_k_ ? (scale * g - gw) / chosen_sum : scale * g;
    }
    if (sigmoid_router_) {
      // p = sigmoid(logit) element by element; the selection bias carries no gradient (facts §4).
      for (std::int64_t e = 0; e < experts; ++e) {
        dlogits[r * experts + e] = static_cast<float>(dp[e] * p[e] * (1.0 - p[e]));
      }
      continue;
    }
    double dot = 0.0;
    for (std::int64_t e = 0; e < experts; ++e) dot += p[e] * dp[e];
    for (std::int64_t e = 0; e < experts; ++e) {
      dlogits[r * experts + e] = static_cast<float>(p[e] * (dp[e] - dot));
    }
  }
  report(&observer, layer.router.name, layer.index, n, hidden, experts,
         linear_input(layer.router, router_input, t), dlogits.data(), layout.ranges);
  linear_backward_input(layer.router, dlogits.data(), n, drouter_input,
                        /*accumulate=*/drouter_input == dexpert_input);

  if (layer.has_shared_expert && ungated_shared_experts_) {
    run_mlp_backward(layer.shared_expert, t.shared_expert, t.h2.data(), n, dout, dh2, true,
                     layout.ranges);
  } else if (layer.has_shared_expert) {
    // out += s * y with s = sigmoid(gate logit): dy = s dout, dlogit = <dout, y> s (1 - s).
    MlpTape& m = t.shared_expert;
    std::vector<float> dy(n * hidden), dlogit(n);
    for (std::int64_t r = 0; r < n; ++r) {
      const float s = t.shared_expert_scale[r];
      double dot = 0.0;
      for (std::int64_t h = 0; h < hidden; ++h) {
        dy[r * hidden + h] = s * dout[r * hidden + h];
        dot += static_cast<double>(dout[r * hidden + h]) * m.out[r * hidden + h];
      }
      dlogit[r] = static_cast<float>(dot) * s * (1.0f - s);
    }
    run_mlp_backward(layer.shared_expert, m, t.h2.data(), n, dy.data(), dh2, true, layout.ranges);
    report(&observer, layer.shared_expert_gate.name, layer.index, n, hidden, 1,
           linear_input(layer.shared_expert_gate, t.h2.data(), t), dlogit.data(), layout.ranges);
    linear_backward_input(layer.shared_expert_gate, dlogit.data(), n, dh2, true);
  }
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
  if (gemma4_) {
    gemma4_layer_forward(layer, layout, x, out, t, observer, report_linears, cache);
    return;
  }

  t.x = x;
  t.h1.resize(n * hidden);
  t.rstd1.resize(n);
  rms_norm_forward(x, layer.input_norm.data(), n, hidden, eps, t.h1.data(), t.rstd1.data());
  if (layer.linear_attention) {
    gated_delta_net_forward(layer, layout, t, linear_observer, cache);
  } else if (c.mla) {
    mla_forward(layer, layout, t, linear_observer, cache);
  } else {
    if (cache != nullptr) {
      attention_forward_cached(layer, layout, t, *cache);
    } else {
      attention_forward(layer, layout, t, observer);
    }
    if (config_.attn_output_gate) {
      // out = attn * sigmoid(gate) over the whole q-head width, before o_proj (facts §5 step 5).
      t.gated.resize(t.attn.size());
      for (std::size_t i = 0; i < t.attn.size(); ++i) t.gated[i] = t.attn[i] * logistic(t.gate[i]);
    }
    for (const Linear* p : attention_projections(layer)) {
      report(linear_observer, p->name, layer.index, n, hidden, p->out_features,
             linear_input(*p, t.h1.data(), t), nullptr, layout.ranges);
    }
  }
  const Linear& output_proj = mixer_output(layer);
  const float* mixed_values = mixer_output_input(layer, t);
  t.x2.resize(n * hidden);
  linear_forward(output_proj, mixed_values, n, t.x2.data(), &t);
  report(linear_observer, output_proj.name, layer.index, n, output_proj.in_features, hidden,
         linear_input(output_proj, mixed_values, t), nullptr, layout.ranges);
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
  if (gemma4_) {
    gemma4_layer_backward(layer, layout, t, dx, observer);
    return;
  }
  const std::int64_t n = layout.rows;
  const std::int64_t hidden = config_.hidden_size;
  // out = x2 + mlp(norm(x2)): dx2 = dout + norm_backward(mlp_backward(dout)).
  std::vector<float> dh(n * hidden);
  mlp_backward(layer, layout, t, dx, dh.data(), observer);
  rms_norm_backward(t.x2.data(), layer.post_attention_norm.data(), t.rstd2.data(), dh.data(), n,
                    hidden, dx, /*accumulate=*/true);
  // x2 = x + o_proj(attn(norm(x))): dx = dx2 + norm_backward(attention_backward(dx2)).
  if (layer.linear_attention) {
    gated_delta_net_backward(layer, layout, t, dx, dh.data(), observer);
  } else if (config_.mla) {
    const std::int64_t width = layer.o_proj.in_features;
    report(&observer, layer.o_proj.name, layer.index, n, width, hidden,
           linear_input(layer.o_proj, t.mla_values.data(), t), dx, layout.ranges);
    std::vector<float> dvalues(n * width);
    linear_backward_input(layer.o_proj, dx, n, dvalues.data(), false);
    mla_backward(layer, layout, t, dvalues.data(), dh.data(), observer);
  } else {
    attention_backward(layer, layout, t, dx, dh.data(), observer);
  }
  rms_norm_backward(t.x, layer.input_norm.data(), t.rstd1.data(), dh.data(), n, hidden, dx,
                    /*accumulate=*/true);
}

// ---- Gemma 4 decoder layer ---------------------------------------------------------------

// Gemma4TextDecoderLayer (gemma4-architecture-facts.md §2 step 3, §6):
//   h = x + post_attention_norm(o_proj(attention(input_norm(x))))
//   f = mlp(pre_feedforward_norm(h))                                         (dense)
//   f = post_ffn_norm_1(mlp(pre_ffn_norm(h))) + post_ffn_norm_2(experts(pre_ffn_norm_2(h);
//       router(rms(h) * router.scale * hidden^-1/2)))                        (MoE)
//   out = layer_scalar * (h + post_feedforward_norm(f))
void Model::gemma4_layer_forward(const Layer& layer, const Layout& layout, const float* x,
                                 float* out, LayerTape& t, LinearObserver* observer,
                                 bool report_linears, DecodeState* cache) const {
  const std::int64_t n = layout.rows;
  const std::int64_t hidden = config_.hidden_size;
  const float eps = static_cast<float>(config_.rms_norm_eps);
  LinearObserver* linear_observer = report_linears ? observer : nullptr;
  std::vector<float> y(n * hidden);
  // y = rms_w(x), keeping x and 1/rms for the backward.
  const auto normed = [&](const float* in, const std::vector<float>& weight, std::int64_t rows,
                          std::int64_t width, float epsilon, LayerTape::NormedInput& saved,
                          float* result) {
    saved.values.assign(in, in + rows * width);
    saved.rstd.resize(rows);
    rms_norm_forward(in, weight.data(), rows, width, epsilon, result, saved.rstd.data());
  };

  t.x = x;
  t.h1.resize(n * hidden);
  t.rstd1.resize(n);
  rms_norm_forward(x, layer.input_norm.data(), n, hidden, eps, t.h1.data(), t.rstd1.data());
  if (cache != nullptr) {
    attention_forward_cached(layer, layout, t, *cache);
  } else {
    attention_forward(layer, layout, t, observer);
  }
  for (const Linear* p : attention_projections(layer)) {
    report(linear_observer, p->name, layer.index, n, hidden, p->out_features,
           linear_input(*p, t.h1.data(), t), nullptr, layout.ranges);
  }
  std::vector<float> attn_out(n * hidden);
  linear_forward(layer.o_proj, t.attn.data(), n, attn_out.data(), &t);
  report(linear_observer, layer.o_proj.name, layer.index, n, layer.o_proj.in_features, hidden,
         linear_input(layer.o_proj, t.attn.data(), t), nullptr, layout.ranges);
  t.x2.resize(n * hidden);
  normed(attn_out.data(), layer.post_attention_norm, n, hidden, eps, t.attn_out, t.x2.data());
  add_inplace(t.x2.data(), x, n * hidden);

  t.h2.resize(n * hidden);
  t.rstd2.resize(n);
  rms_norm_forward(t.x2.data(), layer.pre_feedforward_norm.data(), n, hidden, eps, t.h2.data(),
                   t.rstd2.data());
  std::vector<float> dense(n * hidden), ffn(n * hidden);
  gated_mlp_forward(layer, layer.mlp, t, t.mlp, t.h2.data(), n, dense.data(), layout.ranges,
                    linear_observer);
  if (layer.moe) {
    normed(dense.data(), layer.post_feedforward_norm_1, n, hidden, eps, t.dense_out, ffn.data());
    std::vector<float> experts_in(n * hidden), router_in(n * hidden), routed(n * hidden);
    normed(t.x2.data(), layer.pre_feedforward_norm_2, n, hidden, eps, t.experts_in,
           experts_in.data());
    normed(t.x2.data(), layer.router_input_norm, n, hidden, eps, t.router_in, router_in.data());
    // The normed inputs themselves are what the router and the experts multiply.
    t.experts_in.values = std::move(experts_in);
    t.router_in.values = std::move(router_in);
    moe_forward(layer, layout, t, t.router_in.values.data(), t.experts_in.values.data(),
                routed.data(), observer, report_linears);
    normed(routed.data(), layer.post_feedforward_norm_2, n, hidden, eps, t.routed, y.data());
    add_inplace(ffn.data(), y.data(), n * hidden);
  } else {
    ffn.swap(dense);
  }
  normed(ffn.data(), layer.post_feedforward_norm, n, hidden, eps, t.ffn, y.data());
  t.u = t.x2;
  add_inplace(t.u.data(), y.data(), n * hidden);
  for (std::int64_t i = 0; i < n * hidden; ++i) out[i] = layer.layer_scalar * t.u[i];
}

void Model::gemma4_layer_backward(const Layer& layer, const Layout& layout, LayerTape& t, float* dx,
                                  LinearObserver& observer) const {
  const std::int64_t n = layout.rows;
  const std::int64_t hidden = config_.hidden_size;
  // dx2 gathers dL/dh from the residual path and every norm that reads h.
  std::vector<float> dx2(n * hidden), dffn(n * hidden);
  for (std::int64_t i = 0; i < n * hidden; ++i) dx2[i] = layer.layer_scalar * dx[i];
  rms_norm_backward(t.ffn.values.data(), layer.post_feedforward_norm.data(), t.ffn.rstd.data(),
                    dx2.data(), n, hidden, dffn.data(), false);
  std::vector<float> ddense(n * hidden);
  if (layer.moe) {
    rms_norm_backward(t.dense_out.values.data(), layer.post_feedforward_norm_1.data(),
                      t.dense_out.rstd.data(), dffn.data(), n, hidden, ddense.data(), false);
    std::vector<float> drouted(n * hidden), drouter_in(n * hidden), dexperts_in(n * hidden);
    rms_norm_backward(t.routed.values.data(), layer.post_feedforward_norm_2.data(),
                      t.routed.rstd.data(), dffn.data(), n, hidden, drouted.data(), false);
    moe_backward(layer, layout, t, t.router_in.values.data(), drouted.data(), drouter_in.data(),
                 dexperts_in.data(), observer);
    rms_norm_backward(t.x2.data(), layer.router_input_norm.data(), t.router_in.rstd.data(),
                      drouter_in.data(), n, hidden, dx2.data(), true);
    rms_norm_backward(t.x2.data(), layer.pre_feedforward_norm_2.data(), t.experts_in.rstd.data(),
                      dexperts_in.data(), n, hidden, dx2.data(), true);
  } else {
    ddense.swap(dffn);
  }
  std::vector<float> dh(n * hidden);
  gated_mlp_backward(layer, layer.mlp, t, t.mlp, t.h2.data(), n, ddense.data(), dh.data(), false,
                     layout.ranges, observer);
  rms_norm_backward(t.x2.data(), layer.pre_feedforward_norm.data(), t.rstd2.data(), dh.data(), n,
                    hidden, dx2.data(), true);
  std::vector<float> dattn_out(n * hidden);
  rms_norm_backward(t.attn_out.values.data(), layer.post_attention_norm.data(),
                    t.attn_out.rstd.data(), dx2.data(), n, hidden, dattn_out.data(), false);
  attention_backward(layer, layout, t, dattn_out.data(), dh.data(), observer);
  std::copy(dx2.begin(), dx2.end(), dx);
  rms_norm_backward(t.x, layer.input_norm.data(), t.rstd1.data(), dh.data(), n, hidden, dx, true);
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

// The multi-token-prediction head's parameters (facts §7), loaded for an MTP pass.
struct Model::Mtp {
  Linear fc;  // [hidden, 2 hidden]: columns [0, H) take the embedding, [H, 2H) the hidden state
  std::vector<float> embedding_norm, hidden_norm, norm;  // zero-centred, as multiplied
  std::unique_ptr<Layer> layer;
  // DeepSeek-V3's MTP layer stores its own copies of the embedding and of lm_head
  // (model.layers.N.embed_tokens, shared_head.head), which vLLM loads and runs
  // (deepseek_v3-architecture-facts.md §6); Qwen3.5's head reads the body's.
  std::string embedding;
  std::unique_ptr<Linear> head;  // null: lm_head
};

// One MTP pass: the batch it scores (each sequence without its first token: row t's embedding
// is token t + 1's and its next-token target token t + 2), the fc input and the layer's input and
// output [rows, hidden].
struct Model::MtpRun {
  std::vector<Sequence> batch;
  std::shared_ptr<const Pass> pass;
  std::vector<float> fc_input;  // [rows, 2 hidden]
  LayerTape fc_tape;            // fc's input after any activation quantizer
  std::vector<float> input, output;
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
    layout.full_attention_rope = whole.full_attention_rope;
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

void Model::embed_tokens(std::span<const Sequence> batch, const Layout& layout,
                         const std::string& name, float* x) const {
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
  const std::vector<float> rows = weights_.load_rows_f32(name, unique);
  weights_.release(name);
  for (std::size_t r = 0; r < ids.size(); ++r) {
    const auto at = std::lower_bound(unique.begin(), unique.end(), ids[r]) - unique.begin();
    std::copy_n(rows.data() + at * hidden, hidden, x + static_cast<std::int64_t>(r) * hidden);
  }
  if (gemma4_) {
    // Gemma 4 scales the embedding by sqrt(hidden) rounded to the weights' dtype, bf16, as both
    // transformers and vLLM's "normalizer" buffer do (gemma4-architecture-facts.md §2 step 1,
    // §12 point 7: 73.5 for the 31B's sqrt(5376)).
    const float root = std::sqrt(static_cast<float>(hidden));
    std::uint16_t bits = 0;
    convert_f32_to_bf16({&root, 1}, {&bits, 1});
    const float scale = io::bf16_bits_to_f32(bits);
    for (std::size_t i = 0; i < ids.size() * hidden; ++i) x[i] *= scale;
  }
}

void Model::embed(const Pass& pass, float* x) const {
  embed_tokens(pass.batch, pass.whole, embedding_name(), x);
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

std::vector<float> Model::final_hidden(const Pass& pass, LinearObserver* observer,
                                       const ForwardCheckpoint* resume) {
  const std::int64_t n = pass.whole.rows;
  const std::int64_t hidden = config_.hidden_size;
  const std::int64_t layers = config_.num_hidden_layers;
  std::vector<float> x(n * hidden), next(n * hidden);
  const std::int64_t first = resume != nullptr ? resume->restore(layers, x) : 0;
  if (first == 0) embed(pass, x.data());
  for (std::int64_t l = first; l < layers; ++l) {
    forward_layer(l, pass, x.data(), next.data(), observer);
    x.swap(next);
    if (resume != nullptr) resume->save(l + 1, x);
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
  add_full_attention_rope(layout, std::max<std::int64_t>(layout.max_length, 1));
  return layout;
}

void Model::add_full_attention_rope(Layout& layout, std::int64_t positions) const {
  if (!gemma4_) return;
  layout.full_attention_rope = std::make_shared<RopeTable>(
      config_.gemma4->global_head_dim, gemma4_full_attention_inv_freq(config_), positions);
}

void Model::head_logits(const Linear& head, const float* x, std::int64_t rows, float* logits) {
  multiply(head, x, rows, logits);
  soft_cap(head, {logits, static_cast<std::size_t>(rows * head.out_features)});
}

void Model::soft_cap(const Linear& head, std::span<float> logits) {
  const float cap = head.logit_softcap;
  if (cap <= 0.0f) return;
  for (float& v : logits) v = cap * std::tanh(v / cap);
}

void Model::for_each_logits_block(
    const Pass& pass, const float* x, const float* norm, const Linear* own_head,
    LinearObserver* observer,
    const std::function<void(std::int64_t first, std::int64_t last, const float* input,
                             const float* rstd, float* logits)>& block) {
  const Layout& layout = pass.whole;
  const std::int64_t hidden = config_.hidden_size;
  const std::int64_t vocab = config_.vocab_size;
  const Linear& head = own_head != nullptr ? *own_head : acquire_head();
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
    rms_norm_forward(x + begin * hidden, norm, rows, hidden,
                     static_cast<float>(config_.rms_norm_eps), h.data(), rstd.data());
    LayerTape tape;
    linear_forward(head, h.data(), rows, logits.data(), &tape);
    io::require_finite(logits, "lm_head's output (the logits)");
    soft_cap(head, logits);
    const std::vector<RowRange> ranges = block_ranges(layout.ranges, first, last);
    const float* input = linear_input(head, h.data(), tape);
    report(observer, head.name, -1, rows, hidden, vocab, input, nullptr, ranges);
    block(first, last, input, rstd.data(), logits.data());
  }
  if (own_head == nullptr) release_head();
}

void Model::forward(std::span<const Sequence> batch, const LogitsConsumer& consume,
                    LinearObserver* observer, std::int64_t sequences_per_micro_batch,
                    const ForwardCheckpoint* resume) {
  const auto pass = begin_pass(batch, sequences_per_micro_batch);
  const std::vector<float> x = final_hidden(*pass, observer, resume);
  head_forward(*pass, x.data(), consume, observer);
}

void Model::head_forward(const Pass& pass, const float* x, const LogitsConsumer& consume,
                         LinearObserver* observer) {
  const Layout& layout = pass.whole;
  const std::int64_t vocab = config_.vocab_size;
  for_each_logits_block(
      pass, x, final_norm_.data(), nullptr, observer,
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
    state.conv_inputs.resize(layers);
    state.recurrent_states.resize(layers);
  }
  PQ_CHECK(static_cast<std::int64_t>(state.keys.size()) == layers &&
               state.values.size() == state.keys.size() &&
               state.conv_inputs.size() == state.keys.size() &&
               state.recurrent_states.size() == state.keys.size(),
           "extend: the decode state belongs to a model with {} layers, not {}", state.keys.size(),
           layers);
  const Sequence sequence{{tokens.begin(), tokens.end()}, {}};
  Layout layout = make_layout({&sequence, 1});
  const std::int64_t n = layout.rows;
  layout.rope = std::make_shared<RopeTable>(config_, state.length + n);
  add_full_attention_rope(layout, state.length + n);
  const std::int64_t hidden = config_.hidden_size;
  std::vector<float> x(n * hidden), next(n * hidden);
  embed_tokens({&sequence, 1}, layout, embedding_name(), x.data());
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
  const Linear& head = acquire_head();
  linear_forward(head, h.data(), n, logits.data(), nullptr);
  io::require_finite(logits, "lm_head's output (the logits)");
  soft_cap(head, logits);
  release_head();
  return logits;
}

double Model::head_backward(const Pass& pass, const float* x, float* dx, LinearObserver* observer,
                            const LossWeighting& weighting) {
  return score_logits(pass, x, final_norm_, nullptr, dx, observer, weighting);
}

double Model::head_backward_logits(const Pass& pass, const float* x, float* dx,
                                   LinearObserver* observer, const LogitGradient& gradient) {
  return backprop_sequence_logits(pass, x, final_norm_, nullptr, dx, observer, gradient);
}

double Model::backprop_sequence_logits(const Pass& pass, const float* x,
                                       const std::vector<float>& norm, const Linear* own_head,
                                       float* dx, LinearObserver* observer,
                                       const LogitGradient& gradient) {
  const Layout& layout = pass.whole;
  const std::int64_t vocab = config_.vocab_size;
  return backprop_logits(pass, x, norm, own_head, dx, observer,
                         [&](std::int64_t first, std::int64_t last, float* logits) {
                           double loss = 0.0;
                           const std::int64_t begin = layout.offsets[first];
                           for (std::int64_t s = first; s < last; ++s) {
                             loss += gradient(s, logits + (layout.offsets[s] - begin) * vocab,
                                              layout.length(s));
                           }
                           return loss;
                         });
}

double Model::score_logits(const Pass& pass, const float* x, const std::vector<float>& norm,
                           const Linear* own_head, float* dx, LinearObserver* observer,
                           const LossWeighting& weighting) {
  const Layout& layout = pass.whole;
  const std::int64_t vocab = config_.vocab_size;
  return backprop_logits(
      pass, x, norm, own_head, dx, observer,
      [&](std::int64_t first, std::int64_t last, float* logits) {
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
        return cross_entropy_forward_backward(logits, targets.data(), weights.data(), rows, vocab);
      });
}

double Model::backprop_logits(
    const Pass& pass, const float* x, const std::vector<float>& norm, const Linear* own_head,
    float* dx, LinearObserver* observer,
    const std::function<double(std::int64_t first, std::int64_t last, float* logits)>& loss_of) {
  const Layout& layout = pass.whole;
  const std::int64_t hidden = config_.hidden_size;
  const std::int64_t vocab = config_.vocab_size;
  double loss = 0.0;
  for_each_logits_block(
      pass, x, norm.data(), own_head, nullptr,
      [&](std::int64_t first, std::int64_t last, const float* input, const float* rstd,
          float* logits) {
        const std::int64_t begin = layout.offsets[first];
        const std::int64_t rows = layout.offsets[last] - begin;
        // The soft-capped logits c tanh(raw / c) are what the loss scores (Gemma 4's lm_head;
        // no other head, DeepSeek-V3's MTP shared_head.head included, has a cap).
        const Linear& head = own_head != nullptr ? *own_head : *lm_head_;
        const float cap = head.logit_softcap;
        std::vector<float> capped;
        if (cap > 0.0f) capped.assign(logits, logits + rows * vocab);
        loss += loss_of(first, last, logits);
        if (dx == nullptr) return;
        // d raw = d capped (1 - tanh^2(raw / c)), tanh(raw / c) = capped / c (facts §8).
        for (std::size_t i = 0; i < capped.size(); ++i) {
          const float tanh = capped[i] / cap;
          logits[i] *= 1.0f - tanh * tanh;
        }
        const std::vector<RowRange> ranges = block_ranges(layout.ranges, first, last);
        report(observer, head.name, -1, rows, hidden, vocab, input, logits, ranges);
        std::vector<float> dh(rows * hidden);
        linear_backward_input(head, logits, rows, dh.data(), false);
        rms_norm_backward(x + begin * hidden, norm.data(), rstd, dh.data(), rows, hidden,
                          dx + begin * hidden, /*accumulate=*/false);
      });
  return loss;
}

// ---- Multi-token prediction ------------------------------------------------------------------

const Model::Mtp& Model::acquire_mtp() {
  PQ_CHECK(has_mtp(), "{} has no multi-token-prediction head (mtp_num_hidden_layers is 0)",
           config_.architecture);
  throw_if_interrupted();
  if (mtp_) return *mtp_;
  const std::int64_t hidden = config_.hidden_size;
  auto mtp = std::make_unique<Mtp>();
  if (config_.mla) {
    // DeepSeek-V3: model.layers.<num_hidden_layers> holds eh_proj, enorm, hnorm, a decoder layer
    // built like a body layer of that index, shared_head.norm / head and the embedding copy (§6).
    const std::string p = fmt::format("{}layers.{}.", text_prefix_, config_.num_hidden_layers);
    load_linear(mtp->fc, p + "eh_proj", hidden, 2 * hidden, false);
    mtp->embedding_norm = load_norm(p + "enorm.weight", hidden);
    mtp->hidden_norm = load_norm(p + "hnorm.weight", hidden);
    mtp->norm = load_norm(p + "shared_head.norm.weight", hidden);
    mtp->layer = load_decoder_layer(config_.num_hidden_layers, p, false);
    mtp->embedding = p + "embed_tokens.weight";
    check_matrix(mtp->embedding, config_.vocab_size, hidden);
    mtp->head = std::make_unique<Linear>();
    load_linear(*mtp->head, p + "shared_head.head", config_.vocab_size, hidden, false);
  } else {
    load_linear(mtp->fc, "mtp.fc", hidden, 2 * hidden, false);
    mtp->embedding_norm = load_norm("mtp.pre_fc_norm_embedding.weight", hidden);
    mtp->hidden_norm = load_norm("mtp.pre_fc_norm_hidden.weight", hidden);
    mtp->norm = load_norm("mtp.norm.weight", hidden);
    mtp->layer = load_decoder_layer(config_.num_hidden_layers, "mtp.layers.0.", false);
    mtp->embedding = embedding_name();
  }
  PQ_CHECK(!mtp->layer->linear_attention, "mtp.layers.0 must be a full-attention layer");
  mtp_ = std::move(mtp);
  return *mtp_;
}

void Model::release_mtp() {
  if (!options_.keep_layers_resident) mtp_.reset();
}

void Model::mtp_prepare(const Pass& pass, const float* x, LinearObserver* observer, MtpRun& run) {
  const std::int64_t hidden = config_.hidden_size;
  const float eps = static_cast<float>(config_.rms_norm_eps);
  const Layout& body = pass.whole;
  for (const Sequence& sequence : pass.batch) {
    Sequence shifted;
    if (!sequence.tokens.empty()) {
      shifted.tokens.assign(sequence.tokens.begin() + 1, sequence.tokens.end());
    }
    // Row t's target t + 2 is the body's prediction t + 1's target: it keeps that weight.
    if (sequence.loss_weights.size() > 1) {
      shifted.loss_weights.assign(sequence.loss_weights.begin() + 1, sequence.loss_weights.end());
    }
    run.batch.push_back(std::move(shifted));
  }
  run.pass = begin_pass(run.batch);
  const Layout& layout = run.pass->whole;
  const std::int64_t n = layout.rows;
  const Mtp& mtp = acquire_mtp();

  // h_t: the final norm of the body's rows 0 .. T - 2 of each sequence.
  std::vector<float> h(n * hidden), normed(n * hidden), rstd(n), e(n * hidden);
  for (std::int64_t s = 0; s < layout.sequences(); ++s) {
    std::copy_n(x + body.offsets[s] * hidden, layout.length(s) * hidden,
                h.data() + layout.offsets[s] * hidden);
  }
  rms_norm_forward(h.data(), final_norm_.data(), n, hidden, eps, normed.data(), rstd.data());
  embed_tokens(run.pass->batch, run.pass->whole, mtp.embedding, e.data());
  // fc input [pre_fc_norm_embedding(e) | pre_fc_norm_hidden(h)], embedding first (§7).
  std::vector<float> e_normed(n * hidden), h_normed(n * hidden);
  rms_norm_forward(e.data(), mtp.embedding_norm.data(), n, hidden, eps, e_normed.data(),
                   rstd.data());
  rms_norm_forward(normed.data(), mtp.hidden_norm.data(), n, hidden, eps, h_normed.data(),
                   rstd.data());
  run.fc_input.resize(n * 2 * hidden);
  for (std::int64_t r = 0; r < n; ++r) {
    std::copy_n(e_normed.data() + r * hidden, hidden, run.fc_input.data() + r * 2 * hidden);
    std::copy_n(h_normed.data() + r * hidden, hidden,
                run.fc_input.data() + r * 2 * hidden + hidden);
  }
  run.input.resize(n * hidden);
  linear_forward(mtp.fc, run.fc_input.data(), n, run.input.data(), &run.fc_tape);
  report(observer, mtp.fc.name, mtp.layer->index, n, 2 * hidden, hidden,
         linear_input(mtp.fc, run.fc_input.data(), run.fc_tape), nullptr, layout.ranges);
  run.output.resize(n * hidden);
  for (const Pass::Micro& m : run.pass->micro) {
    const std::int64_t base = layout.offsets[m.first] * hidden;
    LayerTape tape;
    layer_forward(*mtp.layer, m.layout, run.input.data() + base, run.output.data() + base, tape,
                  observer, /*report_linears=*/true);
  }
  require_finite_activations(mtp.layer->index, "output", run.output.data(), n * hidden);
}

void Model::mtp_forward(const Pass& pass, const float* x, const LogitsConsumer& consume,
                        LinearObserver* observer) {
  MtpRun run;
  mtp_prepare(pass, x, observer, run);
  const Layout& layout = run.pass->whole;
  const std::int64_t vocab = config_.vocab_size;
  for_each_logits_block(
      *run.pass, run.output.data(), mtp_->norm.data(), mtp_->head.get(), nullptr,
      [&](std::int64_t first, std::int64_t last, const float*, const float*, float* logits) {
        const std::int64_t begin = layout.offsets[first];
        for (std::int64_t s = first; s < last; ++s) {
          consume(s, logits + (layout.offsets[s] - begin) * vocab, layout.length(s));
        }
      });
  release_mtp();
}

double Model::mtp_backward(const Pass& pass, const float* x, LinearObserver& observer,
                           const LossWeighting& weighting) {
  return mtp_backprop(pass, x, observer, [&](const MtpRun& run, float* dx) {
    return score_logits(*run.pass, run.output.data(), mtp_->norm, mtp_->head.get(), dx, nullptr,
                        weighting);
  });
}

double Model::mtp_backward_logits(const Pass& pass, const float* x, LinearObserver& observer,
                                  const LogitGradient& gradient) {
  return mtp_backprop(pass, x, observer, [&](const MtpRun& run, float* dx) {
    return backprop_sequence_logits(*run.pass, run.output.data(), mtp_->norm, mtp_->head.get(), dx,
                                    nullptr, gradient);
  });
}

double Model::mtp_backprop(const Pass& pass, const float* x, LinearObserver& observer,
                           const std::function<double(const MtpRun&, float* dx)>& head) {
  MtpRun run;
  mtp_prepare(pass, x, nullptr, run);
  const Layout& layout = run.pass->whole;
  const std::int64_t hidden = config_.hidden_size;
  const std::int64_t n = layout.rows;
  const Mtp& mtp = *mtp_;
  std::vector<float> dx(n * hidden);
  const double loss = head(run, dx.data());
  for (const Pass::Micro& m : run.pass->micro) {
    const std::int64_t base = layout.offsets[m.first] * hidden;
    LayerTape tape;
    std::vector<float> out(m.layout.rows * hidden);
    // Recompute the layer from its saved input; routing decisions are reported here.
    layer_forward(*mtp.layer, m.layout, run.input.data() + base, out.data(), tape, &observer,
                  /*report_linears=*/false);
    layer_backward(*mtp.layer, m.layout, tape, dx.data() + base, observer);
  }
  require_finite_activations(mtp.layer->index, "input gradient", dx.data(), n * hidden);
  report(&observer, mtp.fc.name, mtp.layer->index, n, 2 * hidden, hidden,
         linear_input(mtp.fc, run.fc_input.data(), run.fc_tape), dx.data(), layout.ranges);
  release_mtp();
  return loss;
}

double Model::mtp_loss_backward(std::span<const Sequence> batch, LinearObserver& observer) {
  const auto pass = begin_pass(batch);
  const std::vector<float> x = final_hidden(*pass, nullptr);
  return mtp_backward(*pass, x.data(), observer);
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
