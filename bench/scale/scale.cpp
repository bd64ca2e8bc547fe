// pq_scale: the scaling harness of docs/scaling.md. `synth` writes a random-weight checkpoint with
// the real shapes of a Qwen3 model; `run` runs prismaquant's stages on it as child processes and
// reports per stage wall time, CPU time, peak memory, disk reads and the ratio to the stage's FLOP
// floor (its FLOP count over the bf16 GEMM rate measured in the same run).
#include <fcntl.h>
#include <omp.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/error.h"
#include "data/splitmix64.h"
#include "formats/element.h"
#include "formats/weight_format.h"
#include "io/fp8_block.h"
#include "io/safetensors_writer.h"
#include "runtime/kernels/gemm.h"
#include "tokenizer/tokenizer.h"

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// The shapes of the released checkpoints' config.json (huggingface.co/Qwen/<name>/config.json).
// The synthetic checkpoints keep them, except for the token ids: the tokenizer is
// qwen3-dense-tiny's (32000 ids), whose ids all fall inside the real 151936-entry embedding.
struct Shape {
  std::string name;
  std::int64_t layers, hidden, heads, kv_heads, head_dim, intermediate;
  bool tied;
  std::int64_t experts = 0, experts_per_token = 0, moe_intermediate = 0;
  std::int64_t vocab = 151936;
  // Qwen3.5/3.6 hybrids (qwen3_5-architecture-facts.md; FLOP model only, `synth` writes Qwen3
  // checkpoints): every full_attention_interval-th layer is full attention with an output gate
  // (q_proj twice as wide), the others Gated DeltaNet with linear_key_heads x 128 keys and
  // linear_value_heads x 128 values; a MoE adds a shared expert of this width.
  std::int64_t full_attention_interval = 1;
  std::int64_t linear_key_heads = 0, linear_value_heads = 0;
  std::int64_t shared_expert_intermediate = 0;

  bool hybrid() const { return full_attention_interval > 1; }
  // Layer `layer` is Gated DeltaNet (layer_types "linear_attention").
  bool linear_attention(std::int64_t layer) const {
    return hybrid() && (layer + 1) % full_attention_interval != 0;
  }
};

const std::vector<Shape>& shapes() {
  static const std::vector<Shape> kShapes = {
      {"qwen3-0.6b", 28, 1024, 16, 8, 128, 3072, true},
      {"qwen3-1.7b", 28, 2048, 16, 8, 128, 6144, true},
      {"qwen3-8b", 36, 4096, 32, 8, 128, 12288, false},
      {"qwen3-30b-a3b", 48, 2048, 32, 4, 128, 6144, false, 128, 8, 768},
      // Not a released model: two small layers with the real vocabulary, to try the harness.
      {"qwen3-smoke", 2, 256, 4, 2, 64, 768, true},
      // The same with 30B-A3B's MoE layout scaled down: 16 experts, top 4, width 128.
      {"qwen3-moe-smoke", 2, 256, 4, 2, 64, 768, false, 16, 4, 128},
      // Qwen3.6-27B and Qwen3.6-35B-A3B (qwen3_5-architecture-facts.md §2, sources R27 and C36;
      // vision tower and MTP head not counted): for `estimate` only.
      {"qwen3.6-27b", 64, 5120, 24, 4, 256, 17408, false, 0, 0, 0, 248320, 4, 16, 48},
      {"qwen3.6-35b-a3b", 40, 2048, 16, 2, 256, 0, false, 256, 8, 512, 248320, 4, 16, 32, 512},
  };
  return kShapes;
}

const Shape& shape_by_name(const std::string& name) {
  for (const Shape& s : shapes()) {
    if (s.name == name) return s;
  }
  std::string known;
  for (const Shape& s : shapes()) known += (known.empty() ? "" : ", ") + s.name;
  pq::fail("unknown shape {} (known: {})", name, known);
}

// ---- Synthesis ----------------------------------------------------------------------------

json config_json(const Shape& s) {
  // Field names as in ../shared/models/qwen3-{dense,moe}-tiny/config.json (transformers 4.51).
  json c = {{"architectures", {s.experts > 0 ? "Qwen3MoeForCausalLM" : "Qwen3ForCausalLM"}},
            {"model_type", s.experts > 0 ? "qwen3_moe" : "qwen3"},
            {"attention_bias", false},
            {"attention_dropout", 0.0},
            {"bos_token_id", 1},
            {"eos_token_id", 2},
            {"head_dim", s.head_dim},
            {"hidden_act", "silu"},
            {"hidden_size", s.hidden},
            {"initializer_range", 0.02},
            {"intermediate_size", s.intermediate},
            {"max_position_embeddings", 40960},
            {"max_window_layers", s.layers},
            {"num_attention_heads", s.heads},
            {"num_hidden_layers", s.layers},
            {"num_key_value_heads", s.kv_heads},
            {"rms_norm_eps", 1e-6},
            {"rope_scaling", nullptr},
            {"rope_theta", 1000000.0},
            {"sliding_window", nullptr},
            {"tie_word_embeddings", s.tied},
            {"torch_dtype", "bfloat16"},
            {"transformers_version", "4.51.0"},
            {"use_cache", true},
            {"use_sliding_window", false},
            {"vocab_size", s.vocab}};
  if (s.experts > 0) {
    c["decoder_sparse_step"] = 1;
    c["mlp_only_layers"] = json::array();
    c["moe_intermediate_size"] = s.moe_intermediate;
    c["norm_topk_prob"] = true;
    c["num_experts"] = s.experts;
    c["num_experts_per_tok"] = s.experts_per_token;
    c["output_router_logits"] = false;
    c["router_aux_loss_coef"] = 0.001;
  }
  return c;
}

std::uint16_t bf16_bits(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return static_cast<std::uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// Values of one tensor: N(0, std^2) approximated by the sum of four 16-bit uniforms (Irwin-Hall,
// variance 4/12), or the constant 1 for norm weights (std 0). Chunks draw from their own seeded
// generator, so the values depend only on (seed, tensor index) and threads fill them in parallel.
std::vector<std::uint16_t> random_bf16(std::int64_t count, float std, std::uint64_t seed) {
  std::vector<std::uint16_t> values(static_cast<std::size_t>(count));
  if (std == 0.0f) {
    std::fill(values.begin(), values.end(), bf16_bits(1.0f));
    return values;
  }
  constexpr std::int64_t kChunk = 1 << 16;
  const float scale = std / (65536.0f * std::sqrt(4.0f / 12.0f));
  const std::int64_t chunks = (count + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (std::int64_t c = 0; c < chunks; ++c) {
    pq::data::SplitMix64 rng(seed * 0x9E3779B97F4A7C15ULL + static_cast<std::uint64_t>(c));
    const std::int64_t end = std::min(count, (c + 1) * kChunk);
    for (std::int64_t i = c * kChunk; i < end; ++i) {
      const std::uint64_t r = rng.next();
      const std::int64_t sum = static_cast<std::int64_t>(r & 0xFFFF) + ((r >> 16) & 0xFFFF) +
                               ((r >> 32) & 0xFFFF) + (r >> 48);
      // The sum's mean is 4 x 65535 / 2.
      values[i] = bf16_bits((static_cast<float>(sum) - 131070.0f) * scale);
    }
  }
  return values;
}

struct TensorPlan {
  std::string name;
  std::vector<std::int64_t> shape;
  bool norm = false;
  bool vocab_rows = false;  // embedding or head: one row per token id
  bool router = false;      // a MoE layer's mlp.gate
};

// The weight block of DeepSeek-V3-style FP8 checkpoints (io::kFp8BlockSize): Qwen's FP8 releases
// (Qwen/Qwen3-30B-A3B-FP8 and the Qwen3.5/3.6 ones) store every decoder Linear but the router as
// F8_E4M3 with a "<weight>_scale_inv" of one BF16 multiplier per 128 x 128 block, and keep the
// embedding, lm_head, norms and routers in BF16 ("modules_to_not_convert"; quantization_config
// quant_method "fp8", fmt "e4m3", activation_scheme "dynamic", weight_block_size [128, 128]).
constexpr std::int64_t kFp8Block = pq::io::kFp8BlockSize;

// `values` (a bf16 [rows, cols] weight) as E4M3 codes and BF16 block scales: each block's
// multiplier is its amax / 448 rounded to bf16, and the codes round w / multiplier to nearest.
struct Fp8Weight {
  std::vector<std::uint8_t> codes;
  std::vector<std::uint16_t> scales;  // [ceil(rows / 128), ceil(cols / 128)]
};
Fp8Weight fp8_block_weight(const std::vector<std::uint16_t>& values, std::int64_t rows,
                           std::int64_t cols) {
  const std::int64_t block_rows = (rows + kFp8Block - 1) / kFp8Block;
  const std::int64_t block_cols = (cols + kFp8Block - 1) / kFp8Block;
  Fp8Weight w;
  w.codes.resize(values.size());
  w.scales.resize(static_cast<std::size_t>(block_rows * block_cols));
  const auto value = [&](std::int64_t i, std::int64_t j) {
    const std::uint32_t bits = static_cast<std::uint32_t>(values[i * cols + j]) << 16;
    float v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
  };
#pragma omp parallel for schedule(static)
  for (std::int64_t b = 0; b < block_rows * block_cols; ++b) {
    const std::int64_t i0 = (b / block_cols) * kFp8Block, j0 = (b % block_cols) * kFp8Block;
    const std::int64_t i1 = std::min(rows, i0 + kFp8Block), j1 = std::min(cols, j0 + kFp8Block);
    float amax = 0.0f;
    for (std::int64_t i = i0; i < i1; ++i) {
      for (std::int64_t j = j0; j < j1; ++j) amax = std::max(amax, std::abs(value(i, j)));
    }
    w.scales[b] = bf16_bits(amax > 0.0f ? amax / 448.0f : 1.0f);
    const std::uint32_t scale_bits = static_cast<std::uint32_t>(w.scales[b]) << 16;
    float scale;
    std::memcpy(&scale, &scale_bits, sizeof scale);
    for (std::int64_t i = i0; i < i1; ++i) {
      for (std::int64_t j = j0; j < j1; ++j) {
        w.codes[i * cols + j] = static_cast<std::uint8_t>(
            pq::formats::encode_element(pq::formats::ElementType::E4M3, value(i, j) / scale));
      }
    }
  }
  return w;
}

// Every tensor of the checkpoint, in the order transformers' save_pretrained writes a Qwen3 model.
std::vector<TensorPlan> tensor_plan(const Shape& s) {
  std::vector<TensorPlan> plan;
  const std::int64_t q = s.heads * s.head_dim, kv = s.kv_heads * s.head_dim;
  plan.push_back({"model.embed_tokens.weight", {s.vocab, s.hidden}, false, true});
  for (std::int64_t l = 0; l < s.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    plan.push_back({p + "input_layernorm.weight", {s.hidden}, true});
    plan.push_back({p + "self_attn.q_proj.weight", {q, s.hidden}});
    plan.push_back({p + "self_attn.k_proj.weight", {kv, s.hidden}});
    plan.push_back({p + "self_attn.v_proj.weight", {kv, s.hidden}});
    plan.push_back({p + "self_attn.o_proj.weight", {s.hidden, q}});
    plan.push_back({p + "self_attn.q_norm.weight", {s.head_dim}, true});
    plan.push_back({p + "self_attn.k_norm.weight", {s.head_dim}, true});
    plan.push_back({p + "post_attention_layernorm.weight", {s.hidden}, true});
    const auto mlp = [&](const std::string& prefix, std::int64_t inter) {
      plan.push_back({prefix + "gate_proj.weight", {inter, s.hidden}});
      plan.push_back({prefix + "up_proj.weight", {inter, s.hidden}});
      plan.push_back({prefix + "down_proj.weight", {s.hidden, inter}});
    };
    if (s.experts > 0) {
      plan.push_back({p + "mlp.gate.weight", {s.experts, s.hidden}, false, false, true});
      for (std::int64_t e = 0; e < s.experts; ++e) {
        mlp(p + "mlp.experts." + std::to_string(e) + ".", s.moe_intermediate);
      }
    } else {
      mlp(p + "mlp.", s.intermediate);
    }
  }
  plan.push_back({"model.norm.weight", {s.hidden}, true});
  if (!s.tied) plan.push_back({"lm_head.weight", {s.vocab, s.hidden}, false, true});
  return plan;
}

void synthesize(const Shape& s, const fs::path& out, const fs::path& tokenizer_dir,
                std::uint64_t seed, bool fp8) {
  PQ_CHECK(!s.hybrid(), "{} is a shape for `estimate`: synth writes Qwen3 checkpoints only",
           s.name);
  fs::create_directories(out);
  {
    json c = config_json(s);
    if (fp8) {
      c["quantization_config"] = {{"activation_scheme", "dynamic"},
                                  {"fmt", "e4m3"},
                                  {"quant_method", "fp8"},
                                  {"weight_block_size", {kFp8Block, kFp8Block}}};
    }
    std::ofstream config(out / "config.json");
    config << c.dump(2) << "\n";
  }
  for (const char* file : {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}) {
    fs::copy_file(tokenizer_dir / file, out / file, fs::copy_options::overwrite_existing);
  }
  for (const fs::path& file : fs::directory_iterator(out)) {
    fs::permissions(file, fs::perms::owner_write, fs::perm_options::add);
  }
  // Rows of ids the tokenizer does not have are zero, like the untrained padding rows of real
  // checkpoints (Qwen3: 151936 rows for 151669 tokens), so that a greedy sample's arg-max stays
  // among the ids the tokenizer can decode.
  const std::int64_t token_ids =
      pq::tokenizer::Tokenizer::load(out / "tokenizer.json").vocab_size();
  pq::io::ShardedCheckpointWriter writer(out);
  const std::vector<TensorPlan> plan = tensor_plan(s);
  std::uint64_t bytes = 0;
  std::size_t tensors = plan.size();
  for (std::size_t t = 0; t < plan.size(); ++t) {
    std::int64_t count = 1;
    for (const std::int64_t d : plan[t].shape) count *= d;
    // Weights ~ N(0, 0.02^2), Qwen3's initializer_range; norms 1 (their initial value).
    std::vector<std::uint16_t> values =
        random_bf16(count, plan[t].norm ? 0.0f : 0.02f, seed ^ (t + 1));
    if (plan[t].vocab_rows) {
      std::fill(values.begin() + std::min(count, token_ids * s.hidden), values.end(), 0);
    }
    if (fp8 && !plan[t].norm && !plan[t].vocab_rows && !plan[t].router) {
      const std::int64_t rows = plan[t].shape[0], cols = plan[t].shape[1];
      const Fp8Weight w = fp8_block_weight(values, rows, cols);
      writer.add(plan[t].name, pq::io::DType::F8_E4M3, plan[t].shape,
                 {w.codes.data(), w.codes.size()});
      writer.add(pq::io::fp8_block_scale_name(plan[t].name), pq::io::DType::BF16,
                 std::vector<std::int64_t>{(rows + kFp8Block - 1) / kFp8Block,
                                           (cols + kFp8Block - 1) / kFp8Block},
                 {reinterpret_cast<const std::uint8_t*>(w.scales.data()), w.scales.size() * 2});
      bytes += w.codes.size() + w.scales.size() * 2;
      ++tensors;
      continue;
    }
    writer.add(plan[t].name, pq::io::DType::BF16, plan[t].shape,
               {reinterpret_cast<const std::uint8_t*>(values.data()), values.size() * 2});
    bytes += values.size() * 2;
  }
  const std::vector<std::string> files = writer.commit();
  std::printf("wrote %s: %zu tensors, %.2f GB in %zu files\n", out.c_str(), tensors,
              static_cast<double>(bytes) / 1e9, files.size());
}

// ---- FLOP model (docs/scaling.md) -----------------------------------------------------------

struct LinearShape {
  std::int64_t out, in;
  double per_token;            // fraction of tokens it sees: 1, or top_k / experts for an expert
  bool shares_previous_input;  // k/v share q's input, up shares gate's (one Hessian each)
};

// The quantizable Linears of decoder layer `layer` (lm_head excluded, as prismaquant's default).
std::vector<LinearShape> layer_linears(const Shape& s, std::int64_t layer) {
  const std::int64_t q = s.heads * s.head_dim, kv = s.kv_heads * s.head_dim;
  std::vector<LinearShape> l;
  if (s.linear_attention(layer)) {
    // Gated DeltaNet: in_proj_qkv, in_proj_z, in_proj_b, in_proj_a read the hidden state,
    // out_proj the gated values (facts §4; head dims 128).
    const std::int64_t keys = s.linear_key_heads * 128, values = s.linear_value_heads * 128;
    l = {{2 * keys + values, s.hidden, 1, false},
         {values, s.hidden, 1, true},
         {s.linear_value_heads, s.hidden, 1, true},
         {s.linear_value_heads, s.hidden, 1, true},
         {s.hidden, values, 1, false}};
  } else {
    l = {{s.hybrid() ? 2 * q : q, s.hidden, 1, false},
         {kv, s.hidden, 1, true},
         {kv, s.hidden, 1, true},
         {s.hidden, q, 1, false}};
  }
  if (s.shared_expert_intermediate > 0) {
    l.push_back({s.shared_expert_intermediate, s.hidden, 1, false});
    l.push_back({s.shared_expert_intermediate, s.hidden, 1, true});
    l.push_back({s.hidden, s.shared_expert_intermediate, 1, false});
  }
  if (s.experts > 0) {
    l.push_back({s.experts, s.hidden, 1, false});
    const double share = static_cast<double>(s.experts_per_token) / static_cast<double>(s.experts);
    for (std::int64_t e = 0; e < s.experts; ++e) {
      l.push_back({s.moe_intermediate, s.hidden, share, false});
      l.push_back({s.moe_intermediate, s.hidden, share, true});
      l.push_back({s.hidden, s.moe_intermediate, share, false});
    }
  } else {
    l.push_back({s.intermediate, s.hidden, 1, false});
    l.push_back({s.intermediate, s.hidden, 1, true});
    l.push_back({s.hidden, s.intermediate, 1, false});
  }
  return l;
}

struct FlopModel {
  double active_params = 0;  // Linear weights (lm_head included) that one token multiplies
  double head_params = 0;
  double hessian_per_token = 0;  // sum over distinct inputs of in^2 (X^T X's one triangle)
  double weight_cubic = 0;       // sum over Linears of 2 out in^2 (dW H, GPTQ updates)
  double inverse_cubic = 0;      // sum over distinct inputs of in^3 (Cholesky + inverse)
  double attention_per_token_context = 0;  // 4 H D per layer: QK^T and AV per (token, key)
  double all_params = 0;                   // every decoder Linear's weights, every expert's
  std::int64_t widest_input = 0;           // the largest Hessian's order

  // Gated DeltaNet's recurrence (about 6 Hv dk dv per token) and causal convolution are not
  // counted: below 1% of the projections' 2 P per token at the Qwen3.6 shapes.
  explicit FlopModel(const Shape& s) {
    head_params = static_cast<double>(s.vocab) * s.hidden;
    active_params = head_params;
    for (std::int64_t layer = 0; layer < s.layers; ++layer) {
      for (const LinearShape& l : layer_linears(s, layer)) {
        const double w = static_cast<double>(l.out) * l.in;
        const double in = static_cast<double>(l.in);
        active_params += w * l.per_token;
        all_params += w;
        weight_cubic += 2.0 * w * in;
        if (!l.shares_previous_input) {
          hessian_per_token += in * in * l.per_token;
          inverse_cubic += in * in * in;
          widest_input = std::max(widest_input, l.in);
        }
      }
      if (!s.linear_attention(layer)) attention_per_token_context += 4.0 * s.heads * s.head_dim;
    }
  }
  // One forward over sequences of `length` tokens (causal: a token sees length/2 keys on average).
  double forward(double tokens, double length) const {
    return 2.0 * active_params * tokens + attention_per_token_context * tokens * length / 2;
  }
};

struct RunOptions {
  std::int64_t nsamples = 4, seqlen = 256, eval_windows = 4, eval_seqlen = 256;
  std::int64_t sample_tokens = 32, prompt_tokens = 16;
  std::size_t formats = 3;
  std::size_t grouped_formats = 1;      // formats of the menu GPTQ renders (those with groups)
  std::size_t activation_formats = 2;   // formats of the menu that quantize activations too
  std::string compute;                  // the stages' --compute; empty: their default
  std::string objective = "kl-fisher";  // the cost's, quantize's default
  std::int64_t kl_probes = 1;
  // Whether WORK/probe holds the Hessians (a probe without --no-hessians): the kl-fisher cost
  // sums them itself otherwise. Read from probe.json before the cost runs.
  bool probe_hessians = false;
};

// Whether the probe in `probe_dir` stored its Hessians (probe.json "calibration": "hessians").
bool probe_stored_hessians(const std::filesystem::path& probe_dir) {
  std::ifstream in(probe_dir / "probe.json");
  if (!in) return false;
  const json doc = json::parse(in, nullptr, /*allow_exceptions=*/false);
  return doc.is_object() && doc.contains("calibration") &&
         doc["calibration"].value("hessians", true);
}

// The FLOPs a stage cannot avoid (docs/scaling.md), 0 for allocate (no tensor arithmetic).
double stage_flops(const std::string& stage, const FlopModel& f, const RunOptions& o) {
  const double t = static_cast<double>(o.nsamples * o.seqlen);
  if (stage == "probe") {
    // forward + backward (3 forwards) + per-sequence dY^T X (1 forward) + X^T X per input; before
    // a kl-fisher cost (--no-fisher --no-hessians, as quantize runs it) the forward alone.
    if (o.objective == "kl-fisher") return f.forward(t, static_cast<double>(o.seqlen));
    return 4.0 * f.forward(t, static_cast<double>(o.seqlen)) + f.hessian_per_token * t;
  }
  if (stage == "cost") {
    // The error columns: dW H per Linear and format.
    double flops = static_cast<double>(o.formats) * f.weight_cubic;
    if (o.objective == "kl-fisher") {
      // The KL-Fisher pass: the body's forward; per probe the head's logits and their backward
      // (4 V h per token), the body's input gradients (a forward's worth) and every Linear's
      // per-sequence dY^T X (2 out in per token), and dY^T dX again for each format that
      // quantizes activations; every grouped format's GPTQ render of every Linear (export then
      // reads them). Layer recomputation is not counted, as in the probe.
      const double k = static_cast<double>(o.kl_probes);
      const double head = 2.0 * f.head_params * t;
      const double body = f.forward(t, static_cast<double>(o.seqlen)) - head;
      const double folds = 1.0 + static_cast<double>(o.activation_formats);
      flops += body +
               k * (2.0 * head + body + folds * 2.0 * (f.active_params - f.head_params) * t) +
               static_cast<double>(o.grouped_formats) * (f.weight_cubic + f.inverse_cubic);
      // The Hessians a probe with --no-hessians left to the pass's forward.
      if (!o.probe_hessians) flops += f.hessian_per_token * t;
    }
    return flops;
  }
  if (stage == "export") {
    // After a kl-fisher cost, export reads the renders the cost made (WORK/render): no GPTQ.
    return o.objective == "kl-fisher" ? 0.0 : f.weight_cubic + f.inverse_cubic;
  }
  if (stage == "validate") {
    const double e = static_cast<double>(o.eval_windows * o.eval_seqlen);
    const double sampled = static_cast<double>(o.prompt_tokens + o.sample_tokens);
    return 2.0 * f.forward(e, static_cast<double>(o.eval_seqlen)) +
           2.0 * f.forward(sampled, sampled);
  }
  return 0.0;
}

// ---- GEMM rate ------------------------------------------------------------------------------

// FLOP/s of gemm_bf16 on an n x n x n product with `threads` OpenMP threads: the best of three
// after a warm-up call (which builds the cached oneDNN primitive).
double gemm_bf16_rate(std::int64_t n, int threads) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(threads);
  const std::vector<std::uint16_t> a = random_bf16(n * n, 1.0f, 1), b = random_bf16(n * n, 1.0f, 2);
  std::vector<float> c(static_cast<std::size_t>(n * n));
  const auto run = [&] {
    pq::runtime::gemm_bf16(pq::runtime::Transpose::kNo, pq::runtime::Transpose::kYes, n, n, n, 1.0f,
                           a.data(), n, b.data(), n, 0.0f, c.data(), n);
  };
  run();
  double best = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    run();
    best = std::min(
        best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  omp_set_num_threads(saved);
  return 2.0 * static_cast<double>(n) * n * n / best;
}

// The menu's counts that the FLOP model needs: formats, those GPTQ renders, those that quantize
// activations.
void count_formats(const std::string& formats, const Shape& shape, RunOptions& o) {
  o.formats = 0;
  o.grouped_formats = 0;
  o.activation_formats = 0;
  std::stringstream menu(formats);
  for (std::string name; std::getline(menu, name, ',');) {
    ++o.formats;
    const pq::formats::WeightFormat& format = pq::formats::format_by_name(name);
    if (format.group_layout({shape.hidden, shape.hidden})) ++o.grouped_formats;
    // Any global scale will do: the count asks only whether the format quantizes activations.
    pq::formats::QuantizeOptions options;
    options.input_global_scale = 1.0f;
    if (format.activation_quantizer(options)) ++o.activation_formats;
  }
}

// `estimate`: the default job's stages by the FLOP model (docs/scaling.md), with the floors at
// `rate` FLOP/s, and what the model's size puts on memory and disk.
void print_estimate(const Shape& shape, const RunOptions& o, double rate) {
  const FlopModel f(shape);
  const double tokens = static_cast<double>(o.nsamples * o.seqlen);
  const double renders =
      static_cast<double>(o.grouped_formats) * (f.weight_cubic + f.inverse_cubic);
  std::printf(
      "%s: %.2f B decoder Linear parameters (%.2f B active per token with lm_head), %lld x %lld "
      "calibration tokens, %lld x %lld held out, floors at %.1f GFLOP/s\n",
      shape.name.c_str(), f.all_params / 1e9, f.active_params / 1e9,
      static_cast<long long>(o.nsamples), static_cast<long long>(o.seqlen),
      static_cast<long long>(o.eval_windows), static_cast<long long>(o.eval_seqlen), rate / 1e9);
  std::printf("\n| stage | GFLOP | floor s |\n|---|---|---|\n");
  for (const char* stage : {"probe", "cost", "export", "validate"}) {
    const double flops = stage_flops(stage, f, o);
    std::printf("| %s | %.0f | %.0f |\n", stage, flops / 1e9, flops / rate);
  }
  std::printf("| (of the cost: GPTQ renders, in f64) | %.0f | %.0f |\n", renders / 1e9,
              renders / rate);
  const double widest = static_cast<double>(f.widest_input);
  std::printf(
      "\nKL-Fisher pass boundaries on disk: %.1f GB (%lld layers x %.0f tokens x %lld x 4 "
      "bytes); the widest Hessian (%lld inputs): %.2f GB in f32, its GPTQ factor and damped "
      "copy %.2f GB in f64\n",
      static_cast<double>(shape.layers) * tokens * static_cast<double>(shape.hidden) * 4 / 1e9,
      static_cast<long long>(shape.layers), tokens, static_cast<long long>(shape.hidden),
      static_cast<long long>(f.widest_input), widest * widest * 4 / 1e9,
      2.0 * widest * widest * 8 / 1e9);
}

// ---- Child processes ----------------------------------------------------------------------

struct StageFigures {
  std::string stage;
  int exit_status = 0;
  double wall_s = 0, cpu_s = 0;
  std::int64_t peak_rss_kib = 0, peak_anon_kib = 0;
  std::uint64_t read_bytes = 0;
  double flops = 0;
};

std::int64_t status_field_kib(pid_t pid, const std::string& field) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::stoll(line.substr(field.size() + 1));
  }
  return 0;
}

// Runs argv with stdout and stderr into `log`. Peak anonymous RSS is sampled from
// /proc/PID/status every 50 ms; CPU time, peak RSS and disk reads come from wait4's rusage
// (ru_inblock counts 512-byte units of storage reads: task_io_get_inblock in the kernel's
// include/linux/task_io_accounting_ops.h returns read_bytes >> 9).
StageFigures run_stage(const std::string& stage, const std::vector<std::string>& argv,
                       const fs::path& log) {
  StageFigures f;
  f.stage = stage;
  std::printf("[%s] %s\n", stage.c_str(),
              [&] {
                std::string line;
                for (const std::string& a : argv) line += a + " ";
                return line;
              }()
                  .c_str());
  std::fflush(stdout);
  const auto start = std::chrono::steady_clock::now();
  const pid_t pid = fork();
  PQ_CHECK(pid >= 0, "fork failed");
  if (pid == 0) {
    const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  for (;;) {
    siginfo_t info{};
    PQ_CHECK(waitid(P_PID, pid, &info, WEXITED | WNOHANG | WNOWAIT) == 0, "waitid failed");
    if (info.si_pid == pid) break;
    f.peak_anon_kib = std::max(f.peak_anon_kib, status_field_kib(pid, "RssAnon"));
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  int status = 0;
  rusage usage{};
  PQ_CHECK(wait4(pid, &status, 0, &usage) == pid, "wait4 failed");
  f.wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const auto seconds = [](const timeval& t) { return t.tv_sec + t.tv_usec * 1e-6; };
  f.cpu_s = seconds(usage.ru_utime) + seconds(usage.ru_stime);
  f.peak_rss_kib = usage.ru_maxrss;
  f.read_bytes = static_cast<std::uint64_t>(usage.ru_inblock) * 512;
  f.exit_status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return f;
}

std::vector<std::string> stage_command(const std::string& stage, const std::string& cli,
                                       const fs::path& model, const fs::path& data,
                                       const fs::path& work, const RunOptions& o,
                                       const std::string& formats, const std::string& target_bits) {
  const std::string m = model.string(), w = work.string(), d = data.string();
  const auto with_compute = [&](std::vector<std::string> args) {
    if (!o.compute.empty()) {
      args.push_back("--compute");
      args.push_back(o.compute);
    }
    return args;
  };
  if (stage == "probe") {
    std::vector<std::string> args = {cli,
                                     "probe",
                                     m,
                                     "--data",
                                     d,
                                     "--out",
                                     w + "/probe",
                                     "--nsamples",
                                     std::to_string(o.nsamples),
                                     "--seqlen",
                                     std::to_string(o.seqlen)};
    // The kl-fisher cost reads no Fisher traces and sums the Hessians itself; quantize skips both.
    if (o.objective == "kl-fisher") {
      args.push_back("--no-fisher");
      args.push_back("--no-hessians");
    }
    return with_compute(std::move(args));
  }
  if (stage == "cost") {
    std::vector<std::string> args = {cli,          "cost",        m,          "--probe",
                                     w + "/probe", "--formats",   formats,    "--out",
                                     w + "/cost",  "--objective", o.objective};
    if (o.objective == "kl-fisher") {
      // The pass runs on the probe's calibration sample.
      for (const std::string& arg :
           {std::string("--data"), d, std::string("--nsamples"), std::to_string(o.nsamples),
            std::string("--seqlen"), std::to_string(o.seqlen), std::string("--kl-probes"),
            std::to_string(o.kl_probes)}) {
        args.push_back(arg);
      }
      return with_compute(std::move(args));
    }
    return args;
  }
  if (stage == "allocate") {
    return {cli,     "allocate",   "--cost",        w + "/cost",
            "--out", w + "/alloc", "--target-bits", target_bits};
  }
  if (stage == "export") {
    return {cli,     "export",          m,         "--assignment", w + "/alloc/assignment.json",
            "--out", w + "/checkpoint", "--force", "--probe",      w + "/probe"};
  }
  if (stage == "validate") {
    return {cli,
            "validate",
            w + "/checkpoint",
            "--reference",
            m,
            "--data",
            d,
            "--seqlen",
            std::to_string(o.eval_seqlen),
            "--max-seqs",
            std::to_string(o.eval_windows),
            "--json",
            w + "/validate.json",
            "--work",
            w + "/validate"};
  }
  pq::fail("unknown stage {} (known: probe, cost, allocate, export, validate)", stage);
}

std::string gib(std::int64_t kib) {
  return fmt::format("{:.2f}", static_cast<double>(kib) / (1 << 20));
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Scaling harness: synthetic Qwen3-shaped checkpoints and per-stage figures"};
  app.require_subcommand(1);
  std::string shape_name = "qwen3-0.6b";
  fs::path model_dir, work,
      tokenizer_dir = fs::path(PQ_SCALE_SHARED_DIR) / "models/qwen3-dense-tiny";
  std::uint64_t seed = 1;

  CLI::App* synth = app.add_subcommand("synth", "Write a random-weight checkpoint of --shape");
  synth
      ->add_option("--shape", shape_name,
                   "qwen3-0.6b, qwen3-1.7b, qwen3-8b, qwen3-30b-a3b, qwen3-smoke, qwen3-moe-smoke")
      ->capture_default_str();
  synth->add_option("--out", model_dir, "checkpoint directory to create")->required();
  synth->add_option("--seed", seed)->capture_default_str();
  synth->add_option("--tokenizer-from", tokenizer_dir, "copy tokenizer files from here")
      ->capture_default_str();
  bool fp8 = false;
  synth->add_flag("--fp8", fp8,
                  "store the decoder Linears but the routers as block-scaled FP8, as Qwen's FP8 "
                  "releases do (half the disk)");

  RunOptions o;
  std::string stages = "probe,cost,allocate,export,validate", formats = "NVFP4,FP8_E4M3,BF16",
              target_bits = "4.75", cli = PQ_SCALE_CLI, json_path;
  fs::path data = fs::path(PQ_SCALE_SHARED_DIR) / "data/wikitext-2-test.txt";
  CLI::App* run = app.add_subcommand("run", "Run prismaquant's stages on --model and report");
  run->add_option("--shape", shape_name, "the shape --model was synthesized with (FLOP model)")
      ->capture_default_str();
  run->add_option("--model", model_dir, "checkpoint directory")->required();
  run->add_option("--work", work, "directory for the stage outputs and logs")->required();
  run->add_option("--stages", stages)->capture_default_str();
  run->add_option("--nsamples", o.nsamples, "calibration sequences")->capture_default_str();
  run->add_option("--seqlen", o.seqlen, "tokens per calibration sequence")->capture_default_str();
  run->add_option("--eval-windows", o.eval_windows, "validate --max-seqs")->capture_default_str();
  run->add_option("--eval-seqlen", o.eval_seqlen, "validate --seqlen")->capture_default_str();
  run->add_option("--formats", formats, "the menu (default: quantize's)")->capture_default_str();
  run->add_option("--objective", o.objective, "the cost's (default: quantize's)")
      ->capture_default_str();
  run->add_option("--kl-probes", o.kl_probes, "kl-fisher: the cost's random probes")
      ->capture_default_str();
  run->add_option("--compute", o.compute, "f32 or bf16, passed to the probe (default: its own)");
  run->add_option("--target-bits", target_bits)->capture_default_str();
  run->add_option("--data", data)->capture_default_str();
  run->add_option("--prismaquant", cli)->capture_default_str();
  run->add_option("--json", json_path, "also write the figures as JSON here");
  CLI::App* estimate = app.add_subcommand(
      "estimate", "Print the FLOP model's figures for --shape without running anything");
  double rate_gflops = 0;
  estimate->add_option("--shape", shape_name)->capture_default_str();
  estimate->add_option("--nsamples", o.nsamples)->capture_default_str();
  estimate->add_option("--seqlen", o.seqlen)->capture_default_str();
  estimate->add_option("--eval-windows", o.eval_windows)->capture_default_str();
  estimate->add_option("--eval-seqlen", o.eval_seqlen)->capture_default_str();
  estimate->add_option("--formats", formats)->capture_default_str();
  estimate->add_option("--rate", rate_gflops,
                       "GFLOP/s the floors are taken at (default: gemm_bf16 on all threads, "
                       "measured now)");
  CLI11_PARSE(app, argc, argv);

  try {
    const Shape& shape = shape_by_name(shape_name);
    if (synth->parsed()) {
      synthesize(shape, model_dir, tokenizer_dir, seed, fp8);
      return 0;
    }
    count_formats(formats, shape, o);
    if (estimate->parsed()) {
      print_estimate(
          shape, o,
          rate_gflops > 0 ? rate_gflops * 1e9 : gemm_bf16_rate(4096, omp_get_max_threads()));
      return 0;
    }
    PQ_CHECK(!shape.hybrid(), "{} is a shape for `estimate` only", shape.name);
    fs::create_directories(work / "logs");
    const double rate_all = gemm_bf16_rate(4096, omp_get_max_threads());
    const double rate_core = gemm_bf16_rate(4096, 1);
    std::printf("gemm_bf16 4096^3: %.1f GFLOP/s on %d threads, %.1f GFLOP/s on one\n",
                rate_all / 1e9, omp_get_max_threads(), rate_core / 1e9);
    const FlopModel flops(shape);
    std::vector<StageFigures> figures;
    std::stringstream list(stages);
    for (std::string stage; std::getline(list, stage, ',');) {
      StageFigures f = run_stage(
          stage, stage_command(stage, cli, model_dir, data, work, o, formats, target_bits),
          work / "logs" / (stage + ".log"));
      if (stage == "probe" || stage == "cost")
        o.probe_hessians = probe_stored_hessians(work / "probe");
      f.flops = stage_flops(stage, flops, o);
      figures.push_back(f);
      if (f.exit_status != 0) {
        std::printf("[%s] exited with %d (log: %s)\n", stage.c_str(), f.exit_status,
                    (work / "logs" / (stage + ".log")).c_str());
        if (stage != "validate") break;
      }
    }

    json report = {{"shape", shape.name},
                   {"nsamples", o.nsamples},
                   {"seqlen", o.seqlen},
                   {"eval_windows", o.eval_windows},
                   {"eval_seqlen", o.eval_seqlen},
                   {"threads", omp_get_max_threads()},
                   {"gemm_bf16_flops_all_threads", rate_all},
                   {"gemm_bf16_flops_one_core", rate_core},
                   {"stages", json::array()}};
    std::printf(
        "\n| stage | exit | wall s | CPU s | peak RSS GiB | peak anon GiB | read GB | "
        "GFLOP | wall / floor | CPU / floor |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for (const StageFigures& f : figures) {
      // Floors: the FLOPs at the all-thread rate (wall) and at the one-core rate (CPU time).
      const double wall_ratio = f.flops > 0 ? f.wall_s / (f.flops / rate_all) : 0.0;
      const double cpu_ratio = f.flops > 0 ? f.cpu_s / (f.flops / rate_core) : 0.0;
      const auto ratio = [&](double r) { return f.flops > 0 ? fmt::format("{:.1f}", r) : "-"; };
      std::printf("| %s | %d | %.1f | %.1f | %s | %s | %.2f | %.0f | %s | %s |\n", f.stage.c_str(),
                  f.exit_status, f.wall_s, f.cpu_s, gib(f.peak_rss_kib).c_str(),
                  gib(f.peak_anon_kib).c_str(), static_cast<double>(f.read_bytes) / 1e9,
                  f.flops / 1e9, ratio(wall_ratio).c_str(), ratio(cpu_ratio).c_str());
      report["stages"].push_back({{"stage", f.stage},
                                  {"exit_status", f.exit_status},
                                  {"wall_s", f.wall_s},
                                  {"cpu_s", f.cpu_s},
                                  {"peak_rss_bytes", f.peak_rss_kib * 1024},
                                  {"peak_anon_rss_bytes", f.peak_anon_kib * 1024},
                                  {"read_bytes", f.read_bytes},
                                  {"flops", f.flops},
                                  {"wall_over_floor", wall_ratio},
                                  {"cpu_over_floor", cpu_ratio}});
    }
    if (!json_path.empty()) std::ofstream(json_path) << report.dump(2) << "\n";
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pq_scale: %s\n", e.what());
    return 1;
  }
}
