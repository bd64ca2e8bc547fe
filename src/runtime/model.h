#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "model/config.h"
#include "runtime/forward_checkpoint.h"
#include "runtime/kv_cache.h"
#include "runtime/observer.h"
#include "runtime/weights.h"

namespace pq::runtime {

class RopeTable;

// What the GEMMs multiply: float32, or bfloat16 inputs (weights and activations rounded to
// nearest even) with float32 accumulation and output. Norms, softmax, RoPE and attention always
// run in float32.
enum class ComputeType { kF32, kBF16 };

// "f32" / "bf16", as options and artifacts spell them; parse_compute_type throws pq::Error for
// any other name.
std::string_view compute_type_name(ComputeType compute);
ComputeType parse_compute_type(std::string_view name);

struct RuntimeOptions {
  ComputeType compute = ComputeType::kF32;
  const WeightTransform* weight_transform = nullptr;          // optional, not owned
  const ActivationQuantizer* activation_quantizer = nullptr;  // optional, not owned
  // vLLM's FP8 KV cache, simulated on the layers it has scales for (optional, not owned). Off by
  // default: keys and values stay as computed, as in vLLM's default bf16 cache.
  const Fp8KvCache* kv_cache = nullptr;
  // Keep decoded layers between passes instead of reloading them (small models, generation).
  // Off by default: each pass streams layers from the weight source one at a time.
  bool keep_layers_resident = false;
  // Rows of logits materialized at once when scoring (a block always holds whole sequences,
  // so a single longer sequence still gets a block of its own).
  std::int64_t logits_block_rows = 1024;
  // Passes are layer-major: a layer is loaded once per pass and the batch's sequences go through
  // it in micro-batches of whole sequences of at most this many rows (a longer sequence alone),
  // so one micro-batch's intermediates, not the whole batch's, are what a layer's tape costs.
  std::int64_t micro_batch_rows = 4096;
  // Peak memory a pass may use, in bytes; 0: 80% of the machine's available memory. begin_pass
  // refuses a pass whose estimate (runtime::estimate_pass_memory) exceeds it, with the figures,
  // before any layer is loaded, instead of being killed part-way.
  std::int64_t max_memory = 0;
};

// Per-prediction loss weights of one sequence computed from its own logits [rows = its length,
// vocab] (importance weighting): rows - 1 weights, as Sequence::loss_weights.
using LossWeighting = std::function<std::vector<float>(std::int64_t sequence, const float* logits,
                                                       std::int64_t rows)>;

// A loss of one sequence's logits [rows = its length, vocab] (soft-capped where the head caps
// them): replaces the logits in place by the loss's gradient with respect to them and returns the
// loss (the KL-Fisher probes, cost/kl_fisher.h).
using LogitGradient =
    std::function<double(std::int64_t sequence, float* logits, std::int64_t rows)>;

// One token sequence of a batch. Position ids restart at 0 for every sequence.
struct Sequence {
  std::vector<std::int32_t> tokens;
  // Weight of each next-token prediction (tokens.size() - 1 of them: position t predicts t+1);
  // empty means every prediction has weight 1.
  std::vector<float> loss_weights;
};

// What decoding one more token needs of the tokens decoded so far, per layer: on attention
// layers the keys and values (after RoPE), [length, num_key_value_heads * head_dim]; on Gated
// DeltaNet layers (facts §4.4) the last conv_kernel_dim - 1 conv inputs (in_proj_qkv outputs,
// [K - 1, channels], zeros before the first token) and the recurrent state [Hv, dk, dv] in fp32.
struct DecodeState {
  std::vector<std::vector<float>> keys, values;
  std::vector<std::vector<float>> conv_inputs, recurrent_states;
  std::int64_t length = 0;
};

// pq::Error unless Model can run `config`'s architecture (one of those below): the stages that
// compute call this before any other work.
void require_runtime_support(const model::ModelConfig& config);

// A decoder-only causal LM in Hugging Face layout: LlamaForCausalLM, MistralForCausalLM,
// Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM, MiniMaxM2ForCausalLM,
// DeepseekV3ForCausalLM, Qwen3NextForCausalLM, and the text model of
// Qwen3_5ForConditionalGeneration and Qwen3_5MoeForConditionalGeneration (the hybrid families:
// Gated DeltaNet and gated attention layers, docs/runtime.md). Decoder layers and lm_head are
// loaded from the weight source when a pass reaches them and dropped afterwards (unless
// keep_layers_resident); the embedding is read row by row for the tokens a batch holds, so
// resident memory is about one layer whatever the model size. Passes are single-threaded at this
// level; GEMMs and row loops use OpenMP inside.
class Model {
 public:
  // A batch laid out for a layer-major pass: each sequence's rows in the concatenated
  // [rows, hidden] activations, the micro-batches, the RoPE table. Refers to the batch it was
  // made from, which must outlive it.
  class Pass;
  // Throws pq::Error for an unsupported architecture or a missing/misshapen tensor.
  Model(model::ModelConfig config, const WeightSource& weights, RuntimeOptions options = {});
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const model::ModelConfig& config() const { return config_; }
  const RuntimeOptions& options() const { return options_; }

  // One loaded Linear: its weight after the weight transform, bf16-rounded in bf16 compute mode.
  // Opaque outside the runtime.
  struct Linear;
  // lm_head as passes multiply it, loaded now unless a pass holds it. The holder keeps the weight
  // alive after the model lets it go (and after the model is gone), so a caller that reruns
  // lm_head on recorded inputs (ReferenceLogits) shares the model's one copy instead of loading
  // and preparing its own by the same rules.
  std::shared_ptr<const Linear> share_head();
  // y [rows, out] = x [rows, in] W^T (+ bias): the GEMM a pass makes for `linear` once its input
  // is quantized (the observer reports that input), bit for bit.
  static void multiply(const Linear& linear, const float* x, std::int64_t rows, float* y);
  // The logits [rows, vocab] lm_head gives for its input rows x, as a pass scores them: the GEMM
  // and, for Gemma 4, the final logit soft-cap.
  static void head_logits(const Linear& head, const float* x, std::int64_t rows, float* logits);
  static std::uint64_t weight_bytes(const Linear& linear);

  // Called with each sequence's logits [rows = its length, vocab]; the pointer is valid only
  // during the call.
  using LogitsConsumer =
      std::function<void(std::int64_t sequence, const float* logits, std::int64_t rows)>;

  // Forward pass over the batch. The observer (optional) sees every Linear's input rows, with
  // output_grad == nullptr, and every MoE routing decision. sequences_per_micro_batch > 0 makes
  // the micro-batches exactly that many consecutive sequences (see begin_pass). With `resume`, the
  // pass records each layer's output there and starts after the layers a killed run finished
  // (ForwardCheckpoint); the observer then sees only the layers this run computes.
  void forward(std::span<const Sequence> batch, const LogitsConsumer& consume,
               LinearObserver* observer = nullptr, std::int64_t sequences_per_micro_batch = 0,
               const ForwardCheckpoint* resume = nullptr);

  // Logits [tokens.size(), vocab] of one sequence.
  std::vector<float> logits(std::span<const std::int32_t> tokens);

  // Incremental decoding of one sequence: runs `tokens` after the ones already in `state`
  // (positions continue), caching their keys and values, and returns their logits
  // [tokens.size(), vocab]. Start with an empty DecodeState.
  std::vector<float> extend(DecodeState& state, std::span<const std::int32_t> tokens);

  // Summed (weighted) next-token cross-entropy of the batch, forward only.
  double loss(std::span<const Sequence> batch);

  // Forward and backward of the summed next-token cross-entropy; returns the loss. The observer
  // receives, for every Linear (router and lm_head included), its inputs X and output gradients
  // dY, and every routing decision. Layers are recomputed from their saved inputs in reverse
  // order, so only layer-boundary hidden states are kept across the pass.
  double backward(std::span<const Sequence> batch, LinearObserver& observer);

  // ---- Layer-major building blocks (forward, loss and backward are made of them) ----
  // A caller that keeps the layer-boundary activations elsewhere (the probe spills them to disk
  // and resumes between layers) drives a pass with these. Activations are [rows(pass), hidden]
  // float32, the batch's sequences concatenated.
  // Micro-batches hold whole sequences, at most RuntimeOptions::micro_batch_rows rows, or with
  // sequences_per_micro_batch > 0 exactly that many sequences (the last one fewer): a pass over
  // many sequences then does the arithmetic of one pass per group, reading the model once.
  // lm_head's logits blocks never span two micro-batches.
  std::shared_ptr<const Pass> begin_pass(std::span<const Sequence> batch,
                                         std::int64_t sequences_per_micro_batch = 0) const;
  static std::int64_t rows(const Pass& pass);
  // The embedding rows of the batch's tokens; pq::Error for a token outside the vocabulary.
  void embed(const Pass& pass, float* x) const;
  // out = layer(x); the observer (optional) sees every Linear's input and every routing decision.
  void forward_layer(std::int64_t layer, const Pass& pass, const float* x, float* out,
                     LinearObserver* observer);
  // Each sequence's logits from the last layer's output x (final norm, lm_head), as forward()
  // gives them; the observer (optional) sees lm_head's input rows.
  void head_forward(const Pass& pass, const float* x, const LogitsConsumer& consume,
                    LinearObserver* observer = nullptr);
  // The summed weighted next-token cross-entropy from the last layer's output x (final norm,
  // lm_head); writes dx = dLoss/dx and reports lm_head to the observer. With `weighting`, each
  // sequence's loss weights come from its logits instead of Sequence::loss_weights.
  double head_backward(const Pass& pass, const float* x, float* dx, LinearObserver* observer,
                       const LossWeighting& weighting = {});
  // The same with any loss of the logits: `gradient` replaces one sequence's logits by the
  // gradient of its loss with respect to them and returns the loss.
  double head_backward_logits(const Pass& pass, const float* x, float* dx, LinearObserver* observer,
                              const LogitGradient& gradient);
  // Recomputes the layer from its input x, reports its Linears' inputs and output gradients and
  // its routing to the observer, and turns dx from dLoss/d(output) into dLoss/d(input).
  void backward_layer(std::int64_t layer, const Pass& pass, const float* x, float* dx,
                      LinearObserver& observer);

  // ---- Multi-token prediction head (Qwen3.5/3.6 "mtp.*", facts §7; DeepSeek-V3's
  // model.layers.<num_hidden_layers> with eh_proj, enorm / hnorm and its own embedding and
  // shared_head copies, deepseek_v3-architecture-facts.md §6) ----
  // Row t of a sequence takes the body's final hidden state h_t (the final norm of the last
  // layer's output) and the embedding of token t + 1, runs fc over [norm(embedding) | norm(h_t)],
  // the head's full-attention decoder layer at position t (causal over the sequence's MTP rows)
  // and its norm, and scores lm_head's logits against token t + 2. A sequence of length T has
  // T - 1 MTP rows. The head reuses the body's pass: `x` is the last layer's output for `pass`
  // ([rows(pass), hidden], what forward_layer of the last layer wrote), so a caller runs the body
  // once for both losses. Only the first MTP layer is run (mtp_num_hidden_layers is 1 in every
  // known checkpoint; vLLM cycles the layers over speculative steps).
  bool has_mtp() const { return config_.mtp_num_hidden_layers > 0; }
  // The MTP logits of each sequence [length - 1, vocab] (row t predicts token t + 2). The
  // observer (optional) sees mtp.fc and the head layer's Linears (reported as decoder layer
  // num_hidden_layers) and its routing; lm_head is not reported.
  void mtp_forward(const Pass& pass, const float* x, const LogitsConsumer& consume,
                   LinearObserver* observer = nullptr);
  // The summed weighted MTP cross-entropy (row t against token t + 2 with weight
  // Sequence::loss_weights[t + 1], the weight of that token in the next-token loss; with
  // `weighting`, the weights it computes from each sequence's MTP logits [length - 1, vocab]) and
  // its backward through the head: the observer receives mtp.fc and the head layer's Linears with
  // their inputs and output gradients, and the head's routing. The gradient stops at the head's
  // inputs: the body's Linears take their Fisher from the next-token loss (backward,
  // head_backward), the MTP head's from this one; lm_head, shared by both, is reported only by
  // the next-token loss.
  double mtp_backward(const Pass& pass, const float* x, LinearObserver& observer,
                      const LossWeighting& weighting = {});
  // The same with any loss of the MTP logits (head_backward_logits' `gradient`, called per
  // sequence with its length - 1 MTP rows; row t predicts token t + 2, so the last predicts
  // nothing).
  double mtp_backward_logits(const Pass& pass, const float* x, LinearObserver& observer,
                             const LogitGradient& gradient);
  // Runs the body forward over the batch, then mtp_backward; returns the MTP loss.
  double mtp_loss_backward(std::span<const Sequence> batch, LinearObserver& observer);

 private:
  struct Layer;
  struct Layout;
  struct LayerTape;
  struct Mlp;
  struct MlpTape;
  struct Mtp;
  struct MtpRun;

  Layout make_layout(std::span<const Sequence> batch) const;
  // The rows of embedding tensor `name` for the batch's tokens.
  void embed_tokens(std::span<const Sequence> batch, const Layout& layout, const std::string& name,
                    float* x) const;
  std::unique_ptr<Layer> load_layer(std::int64_t index) const;
  // A decoder layer whose tensors are named `prefix`*: a body layer, or the MTP head's
  // ("mtp.layers.0.", always full attention, experts stored one tensor each: facts §6.3, §7).
  std::unique_ptr<Layer> load_decoder_layer(std::int64_t index, const std::string& prefix,
                                            bool packed_experts) const;
  const Layer& acquire_layer(std::int64_t index);
  void release_layer(std::int64_t index);
  // pq::Error unless the checkpoint holds `name` with shape [rows, columns].
  void check_matrix(const std::string& name, std::int64_t rows, std::int64_t columns) const;
  // pq::Error naming the layer when one of `count` values of its `what` is NaN or infinite.
  void require_finite_activations(std::int64_t layer, std::string_view what, const float* values,
                                  std::int64_t count) const;
  void load_linear(Linear& linear, const std::string& name, std::int64_t out_features,
                   std::int64_t in_features, bool bias_allowed) const;
  // Rows [first_row, first_row + out_features) of matrix `index` of the packed 3-D tensor
  // [num_experts, rows_per_matrix, in_features], as the Linear `name`.
  void load_packed_linear(Linear& linear, const std::string& name, const std::string& tensor,
                          std::int64_t index, std::int64_t first_row, std::int64_t rows_per_matrix,
                          std::int64_t out_features, std::int64_t in_features) const;
  // The Linear's weight from `tensor`: in bf16 mode without a weight transform its bf16 bits
  // directly (WeightSource::load_bf16), otherwise fetched and prepared (prepare_linear).
  void load_weight(Linear& linear, const std::string& tensor) const;
  // Applies the weight transform and, in bf16 mode, swaps the values for their bf16 rounding.
  void prepare_linear(Linear& linear) const;
  std::vector<float> fetch(const std::string& name) const;
  std::vector<float> load_vector(const std::string& name, std::int64_t size) const;
  // An RMSNorm weight as multiplied: 1 + w where the architecture's norms are zero-centred.
  std::vector<float> load_norm(const std::string& name, std::int64_t size) const;
  std::string embedding_name() const;

  void linear_forward(const Linear& linear, const float* x, std::int64_t rows, float* y,
                      LayerTape* tape) const;
  void linear_backward_input(const Linear& linear, const float* dy, std::int64_t rows, float* dx,
                             bool accumulate) const;
  const float* linear_input(const Linear& linear, const float* x, const LayerTape& tape) const;

  void layer_forward(const Layer& layer, const Layout& layout, const float* x, float* out,
                     LayerTape& tape, LinearObserver* observer, bool report_linears,
                     DecodeState* cache = nullptr) const;
  void layer_backward(const Layer& layer, const Layout& layout, LayerTape& tape, float* dx,
                      LinearObserver& observer) const;
  // q/k/v projections, Qwen3 q/k norms and RoPE (positions from first_position on).
  void project_qkv(const Layer& layer, const Layout& layout, LayerTape& tape,
                   std::int64_t first_position) const;
  // The observer (optional) sees the keys and values the layer caches (on_kv_cache).
  void attention_forward(const Layer& layer, const Layout& layout, LayerTape& tape,
                         LinearObserver* observer) const;
  // What the KV cache holds of tape.k / tape.v: reports them to the observer (optional), then
  // replaces them by their FP8 round trip when RuntimeOptions::kv_cache quantizes the layer.
  void store_keys_values(const Layer& layer, const Layout& layout, LayerTape& tape,
                         LinearObserver* observer) const;
  void attention_forward_cached(const Layer& layer, const Layout& layout, LayerTape& tape,
                                DecodeState& state) const;
  void attention_backward(const Layer& layer, const Layout& layout, LayerTape& tape,
                          const float* dattn_out, float* dh1, LinearObserver& observer) const;
  // Multi-head latent attention (DeepSeek-V3, deepseek_v3-architecture-facts.md §3) from tape.h1
  // to tape.mla_values (o_proj's input), and its backward from d(mla_values) to dh1
  // (overwritten). With `cache` (one sequence, extend) it continues after the cached keys and
  // values and appends the new ones.
  void mla_forward(const Layer& layer, const Layout& layout, LayerTape& tape,
                   LinearObserver* observer, DecodeState* cache = nullptr) const;
  void mla_backward(const Layer& layer, const Layout& layout, LayerTape& tape, const float* dvalues,
                    float* dh1, LinearObserver& observer) const;
  // The token mixer's output projection (o_proj or linear_attn.out_proj) and what it multiplies.
  const Linear& mixer_output(const Layer& layer) const;
  const float* mixer_output_input(const Layer& layer, const LayerTape& tape) const;
  // Gated DeltaNet of a linear_attention layer (facts §4.2), from tape.h1 to tape.gated, and its
  // backward from d(out_proj output) to dh1 (overwritten).
  // With `cache` (one sequence, extend) it continues from and updates the cached conv inputs
  // and recurrent state.
  void gated_delta_net_forward(const Layer& layer, const Layout& layout, LayerTape& tape,
                               LinearObserver* observer, DecodeState* cache = nullptr) const;
  void gated_delta_net_backward(const Layer& layer, const Layout& layout, LayerTape& tape,
                                const float* dout, float* dh1, LinearObserver& observer) const;
  void mlp_forward(const Layer& layer, const Layout& layout, LayerTape& tape, float* out,
                   LinearObserver* observer, bool report_linears) const;
  void mlp_backward(const Layer& layer, const Layout& layout, LayerTape& tape, const float* dout,
                    float* dh2, LinearObserver& observer) const;
  // One gated MLP (SwiGLU, or GeGLU for Gemma 4) on `rows` rows of `input`, writing
  // [rows, hidden] to `result`; the observer (optional) sees its Linears. Its backward turns dy
  // into d(input), written or added.
  void gated_mlp_forward(const Layer& layer, const Mlp& mlp, LayerTape& tape, MlpTape& m,
                         const float* input, std::int64_t rows, float* result,
                         std::span<const RowRange> ranges, LinearObserver* observer) const;
  void gated_mlp_backward(const Layer& layer, const Mlp& mlp, LayerTape& tape, MlpTape& m,
                          const float* input, std::int64_t rows, const float* dy, float* dinput,
                          bool accumulate, std::span<const RowRange> ranges,
                          LinearObserver& observer) const;
  // The sparse MoE block: the router multiplies router_input, the experts expert_input (the
  // same rows except in Gemma 4, §6). Its backward writes d(expert_input) and adds the router's
  // input gradient to d(router_input), or writes it there when the two are different buffers.
  void moe_forward(const Layer& layer, const Layout& layout, LayerTape& tape,
                   const float* router_input, const float* expert_input, float* out,
                   LinearObserver* observer, bool report_linears) const;
  void moe_backward(const Layer& layer, const Layout& layout, LayerTape& tape,
                    const float* router_input, const float* dout, float* drouter_input,
                    float* dexpert_input, LinearObserver& observer) const;
  // Gemma 4's decoder layer (gemma4-architecture-facts.md §2 step 3) and its backward.
  void gemma4_layer_forward(const Layer& layer, const Layout& layout, const float* x, float* out,
                            LayerTape& tape, LinearObserver* observer, bool report_linears,
                            DecodeState* cache) const;
  void gemma4_layer_backward(const Layer& layer, const Layout& layout, LayerTape& tape, float* dx,
                             LinearObserver& observer) const;
  // The RoPE table a layer rotates by, and its q/k/v projections (without a v_proj on Gemma 4's
  // k_eq_v layers).
  const RopeTable& rope_of(const Layer& layer, const Layout& layout) const;
  std::vector<const Linear*> attention_projections(const Layer& layer) const;
  // Gemma 4: the full-attention layers' RoPE table for `positions` positions; nothing otherwise.
  void add_full_attention_rope(Layout& layout, std::int64_t positions) const;
  // Gemma 4's final logit soft-cap of lm_head's outputs, in place; nothing for other families.
  static void soft_cap(const Linear& head, std::span<float> logits);
  const Mtp& acquire_mtp();
  void release_mtp();
  // The MTP head's forward up to its layer's output (run.output), over the pass of `pass`'s
  // sequences without their first token.
  void mtp_prepare(const Pass& pass, const float* x, LinearObserver* observer, MtpRun& run);
  // mtp_prepare, then `head` (the head's loss: it writes dLoss/d(run.output) to dx and returns
  // the loss), then the backward through the MTP layer and fc, reported to the observer.
  double mtp_backprop(const Pass& pass, const float* x, LinearObserver& observer,
                      const std::function<double(const MtpRun& run, float* dx)>& head);
  const Linear& acquire_head();
  void release_head();
  // head_backward with the norm `norm` before lm_head (the final norm, or the MTP head's), or
  // before `own_head` when not null (DeepSeek-V3's MTP shared_head.head).
  double score_logits(const Pass& pass, const float* x, const std::vector<float>& norm,
                      const Linear* own_head, float* dx, LinearObserver* observer,
                      const LossWeighting& weighting);
  // The norm and head of score_logits, with `loss_of` turning the logits of sequences
  // [first, last) in place into the gradient of its loss with respect to them (soft-capped
  // logits, where the head caps them) and returning that loss; then back to dx.
  double backprop_logits(
      const Pass& pass, const float* x, const std::vector<float>& norm, const Linear* own_head,
      float* dx, LinearObserver* observer,
      const std::function<double(std::int64_t first, std::int64_t last, float* logits)>& loss_of);
  // backprop_logits with a loss given per sequence (head_backward_logits' `gradient`).
  double backprop_sequence_logits(const Pass& pass, const float* x, const std::vector<float>& norm,
                                  const Linear* own_head, float* dx, LinearObserver* observer,
                                  const LogitGradient& gradient);
  // Final norm and lm_head over blocks of whole sequences (logits_block_rows): calls `block`
  // with the block's first sequence, its sequences' end, lm_head's input rows (normed, after any
  // activation quantizer), the rows' 1/rms and the logits; reports lm_head to the observer.
  // `own_head`, when not null, replaces lm_head.
  void for_each_logits_block(
      const Pass& pass, const float* x, const float* norm, const Linear* own_head,
      LinearObserver* observer,
      const std::function<void(std::int64_t first, std::int64_t last, const float* input,
                               const float* rstd, float* logits)>& block);
  // x = the last layer's output for the batch (every layer run forward, each loaded once; with
  // `resume`, after the layers it holds).
  std::vector<float> final_hidden(const Pass& pass, LinearObserver* observer,
                                  const ForwardCheckpoint* resume = nullptr);

  model::ModelConfig config_;
  const WeightSource& weights_;
  RuntimeOptions options_;
  bool qk_norm_ = false;
  bool zero_centred_norms_ = false;
  bool packed_experts_ = false;
  bool fused_gdn_projections_ = false;
  bool renormalize_top_k_ = false;  // norm_topk_prob, or always (Qwen3.5-MoE)
  // MiniMax-M2 (minimax_m2-architecture-facts.md §3-§5): one q/k norm over all heads, a sigmoid
  // router whose selection bias picks the experts but not their weights, the MoE block and its
  // experts named block_sparse_moe / w1, w3, w2.
  bool qk_norm_over_all_heads_ = false;
  bool sigmoid_router_ = false;
  // DeepSeek-V3 (deepseek_v3-architecture-facts.md §4, §5): ungated "mlp.shared_experts" and the
  // selection bias under mlp.gate.
  bool ungated_shared_experts_ = false;
  std::string_view selection_bias_;
  std::string moe_block_;                               // "mlp." or "block_sparse_moe."
  std::array<std::string_view, 3> expert_projections_;  // gate, up, down
  std::string text_prefix_;                             // "model." or "model.language_model."
  std::string router_name_;                             // "gate" or "router.proj"
  bool gemma4_ = false;
  float logit_softcap_ = 0.0f;  // 0: none
  std::vector<float> final_norm_;
  bool tied_head_ = false;           // lm_head's weight is the embedding's
  std::shared_ptr<Linear> lm_head_;  // while a pass uses it (or resident)
  std::vector<std::unique_ptr<Layer>> resident_;
  std::unique_ptr<Mtp> mtp_;  // while an MTP pass uses it (or resident)
};

}  // namespace pq::runtime
