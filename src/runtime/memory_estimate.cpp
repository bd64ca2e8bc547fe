#include "runtime/memory_estimate.h"

#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <fstream>
#include <limits>
#include <sstream>

#include "common/error.h"

namespace pq::runtime {

namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

double gib(std::int64_t bytes) {
  return static_cast<double>(bytes) / kGiB;
}

}  // namespace

std::int64_t PassMemory::peak() const {
  const std::int64_t decoder = layer_weights + tape + activations + statistics;
  const std::int64_t head_step = head + logits + activations + statistics;
  return std::max(decoder, head_step);
}

std::string PassMemory::describe() const {
  return fmt::format(
      "{:.2f} GiB (decoder step: layer {:.2f}, tape {:.2f}, activations {:.2f}, statistics "
      "{:.2f}; head step: lm_head {:.2f}, logits {:.2f})",
      gib(peak()), gib(layer_weights), gib(tape), gib(activations), gib(statistics), gib(head),
      gib(logits));
}

PassMemory estimate_pass_memory(const model::ModelConfig& c, std::int64_t rows,
                                std::int64_t micro_batch_rows, std::int64_t logits_block_rows,
                                std::int64_t boundaries, ComputeType compute) {
  const std::int64_t hidden = c.hidden_size;
  // MLA (deepseek_v3-architecture-facts.md §3) multiplies q, k and v of qk_head_dim per head (v
  // padded) in every head; Gemma 4's full layers have their own head_dim and KV heads, so the
  // widest layer's attention counts there.
  std::int64_t q_width = c.num_attention_heads * (c.mla ? c.mla->qk_head_dim() : c.head_dim);
  std::int64_t kv_width = c.mla ? q_width : c.num_key_value_heads * c.head_dim;
  if (c.gemma4) {
    for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) {
      q_width = std::max(q_width, c.num_attention_heads * c.attention_head_dim(l));
      kv_width = std::max(kv_width, c.attention_key_value_heads(l) * c.attention_head_dim(l));
    }
  }
  const std::int64_t weight_bytes = compute == ComputeType::kBF16 ? 2 : 4;
  const bool moe = c.num_experts > 0;
  // The MLP's widths per token: a dense layer's intermediate, or the routed experts' (top-k
  // rows each, with their gathered input and output rows).
  // A shared expert (facts §6.2) adds its intermediate, output row and gate per token.
  const std::int64_t shared = c.shared_expert_intermediate_size;
  std::int64_t mlp_width = moe ? c.num_experts_per_tok * (c.moe_intermediate_size + 2 * hidden) +
                                     c.num_experts + (shared > 0 ? shared + hidden + 1 : 0)
                               : c.intermediate_size;
  std::int64_t mlp_params = moe ? c.num_experts * 3 * c.moe_intermediate_size * hidden +
                                      c.num_experts * hidden +
                                      (shared > 0 ? 3 * shared * hidden + hidden : 0)
                                : 3 * c.intermediate_size * hidden;
  // Gemma 4's MoE layers keep their dense MLP beside the experts, and its layer keeps about ten
  // normed [rows, hidden] inputs and outputs for the backward (G4 §2, §6).
  if (c.gemma4) {
    mlp_width += (moe ? c.intermediate_size : 0) + 10 * hidden;
    if (moe) mlp_params += 3 * c.intermediate_size * hidden;
  }
  // With an output gate q_proj has twice the rows (query and gate per head).
  const std::int64_t q_rows = c.attn_output_gate ? 2 * q_width : q_width;
  std::int64_t mixer_params = (q_rows + q_width + 2 * kv_width) * hidden;
  if (c.mla) {
    // q_a/q_b (or q_proj), kv_a_proj_with_mqa, kv_b_proj and o_proj.
    const model::MlaConfig& m = *c.mla;
    const std::int64_t heads = c.num_attention_heads;
    mixer_params = (m.q_lora_rank > 0 ? m.q_lora_rank * (hidden + q_width) : q_width * hidden) +
                   (m.kv_lora_rank + m.qk_rope_head_dim) * hidden +
                   m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim) +
                   hidden * heads * m.v_head_dim;
  }
  // While a Linear is decoded its float32 values exist beside the layer's stored copy.
  std::int64_t largest_linear =
      moe ? c.moe_intermediate_size * hidden : std::max(c.intermediate_size, q_width) * hidden;
  if (c.attn_output_gate) largest_linear = std::max(largest_linear, q_rows * hidden);
  // Per row of a micro-batch, forward tape and backward temporaries (LayerTape, layer_backward):
  // q/k/v before and after norm and RoPE and their gradients, the attention output, the output
  // gate's input, gated value and gradient and q_proj's packed output.
  std::int64_t mixer_tape_floats =
      4 * q_width + 6 * kv_width + c.num_attention_heads + (c.attn_output_gate ? 4 * q_width : 0);
  if (c.mla) {
    // The latents before and after their norms and their gradients, kv_b_proj's output and
    // gradient, o_proj's input and gradient.
    const model::MlaConfig& m = *c.mla;
    const std::int64_t heads = c.num_attention_heads;
    mixer_tape_floats += 4 * (m.q_lora_rank + m.kv_lora_rank + m.qk_rope_head_dim) +
                         2 * heads * (m.qk_nope_head_dim + m.v_head_dim) + 2 * heads * m.v_head_dim;
  }
  // Scratch of the delta rule's backward for one micro-batch (gated_delta_rule.h), per thread.
  std::int64_t gdn_scratch_floats = 0;
  std::int64_t gdn_tape_floats = 0;
  if (c.linear_attention.has_value()) {
    // Gated DeltaNet layers (facts §4): their projections, and per row the conv input and output,
    // q/k before and after the L2 norm, v, z, the core's and the gated norm's outputs, decay
    // terms, and the backward's gradients of each.
    const model::LinearAttentionConfig& la = *c.linear_attention;
    const std::int64_t keys = la.num_key_heads * la.key_head_dim;
    const std::int64_t values = la.num_value_heads * la.value_head_dim;
    const std::int64_t channels = 2 * keys + values;
    mixer_params =
        std::max(mixer_params, (channels + 2 * values + 2 * la.num_value_heads) * hidden +
                                   channels * la.conv_kernel_dim);
    largest_linear = std::max(largest_linear, (channels + values) * hidden);  // in_proj_qkvz
    // Qwen3-Next adds its fused projections' outputs and their gradients.
    gdn_tape_floats = 4 * channels + 8 * keys + 8 * values + 8 * la.num_value_heads +
                      2 * (channels + values + 2 * la.num_value_heads);
    const std::int64_t threads = std::min<std::int64_t>(omp_get_max_threads(), la.num_value_heads);
    const std::int64_t rows_per_micro_batch =
        std::min(rows, std::max<std::int64_t>(micro_batch_rows, 1));
    gdn_scratch_floats =
        threads * ((rows_per_micro_batch / 64 + 1) * la.key_head_dim * la.value_head_dim +
                   rows_per_micro_batch * (la.key_head_dim + la.value_head_dim + 256));
  }
  mixer_tape_floats = std::max(mixer_tape_floats, gdn_tape_floats);

  PassMemory m;
  m.layer_weights = (mixer_params + mlp_params) * weight_bytes + largest_linear * 4;
  m.head = c.vocab_size * hidden * weight_bytes + c.vocab_size * hidden * 4;
  // Plus norms and residuals (about 8 hidden-wide rows) and 7 MLP-wide rows (gate, up, act and
  // gradients).
  const std::int64_t tape_floats = 8 * hidden + mixer_tape_floats + 7 * mlp_width;
  m.tape = std::min(rows, std::max<std::int64_t>(micro_batch_rows, 1)) * tape_floats * 4 +
           gdn_scratch_floats * 4;
  m.activations = boundaries * rows * hidden * 4;
  const std::int64_t block = std::min(rows, logits_block_rows);
  m.logits = block * c.vocab_size * 4 + 2 * block * hidden * 4;
  return m;
}

std::int64_t available_memory_bytes() {
  std::ifstream meminfo("/proc/meminfo");
  std::string line;
  while (std::getline(meminfo, line)) {
    std::istringstream fields(line);
    std::string key;
    std::int64_t kib = 0;
    if (fields >> key >> kib && key == "MemAvailable:") return kib * 1024;
  }
  return 0;
}

std::int64_t memory_limit(std::int64_t max_memory) {
  if (max_memory > 0) return max_memory;
  const std::int64_t available = available_memory_bytes();
  return available > 0 ? available / 5 * 4 : std::numeric_limits<std::int64_t>::max();
}

void require_memory(const std::string& what, const PassMemory& estimate, std::int64_t limit) {
  PQ_CHECK(estimate.peak() <= limit,
           "{} needs about {} but the memory limit is {:.2f} GiB (--max-memory; a smaller "
           "--batch-size shrinks the tape)",
           what, estimate.describe(), gib(limit));
}

}  // namespace pq::runtime
