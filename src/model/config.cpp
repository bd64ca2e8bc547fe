#include "model/config.h"

#include <algorithm>
#include <cmath>
#include <iterator>
#include <map>

#include "common/error.h"
#include "common/file_util.h"
#include "common/json_reader.h"

namespace pq::model {

using nlohmann::json;

namespace {

// Bounds of the integer fields, generous beside the largest released models (hidden 16,384 and
// 262,144 vocabulary entries, a few hundred layers, 512 experts), so that every shape product
// fits in 64 bits and a hostile value is refused before anything is sized by it.
constexpr std::int64_t kMaxDimension = std::int64_t{1} << 20;   // widths, head_dim
constexpr std::int64_t kMaxCount = std::int64_t{1} << 14;       // layers, heads, experts
constexpr std::int64_t kMaxVocabulary = std::int64_t{1} << 24;  // as tokenizer ids
constexpr std::int64_t kMaxPositions = std::int64_t{1} << 30;

// An integer field: a JSON integer (256.5 and 1e30 are refused, not truncated or wrapped) in
// [lo, hi]. `name` is the key as messages show it.
std::int64_t checked_integer(const json& value, const std::string& name, const std::string& label,
                             std::int64_t lo, std::int64_t hi) {
  PQ_CHECK(value.is_number_integer(), "{}: field \"{}\" must be an integer, got {}", label, name,
           value.dump());
  bool in_range = false;
  if (value.is_number_unsigned()) {
    const auto u = value.get<std::uint64_t>();
    in_range = u <= static_cast<std::uint64_t>(hi) && static_cast<std::int64_t>(u) >= lo;
  } else {
    const auto v = value.get<std::int64_t>();
    in_range = v >= lo && v <= hi;
  }
  PQ_CHECK(in_range, "{}: field \"{}\" is {}, outside [{}, {}]", label, name, value.dump(), lo, hi);
  return value.get<std::int64_t>();
}

// One JSON object of config.json and the path messages name its keys by: "" at the top level,
// "text_config." for the text model of a multimodal config, "rope_scaling." inside it.
class Fields {
 public:
  Fields(const json& object, std::string path, const std::string& label)
      : object_(object), path_(std::move(path)), label_(label) {}

  const json& object() const { return object_; }
  const std::string& label() const { return label_; }
  // The key as messages show it, e.g. "text_config.hidden_size".
  std::string name(std::string_view key) const { return path_ + std::string(key); }
  // This object's own name, e.g. "rope_scaling".
  std::string own_name() const { return path_.substr(0, path_.empty() ? 0 : path_.size() - 1); }

  bool has(const char* key) const { return object_.contains(key) && !object_[key].is_null(); }

  // The object under `key`, which must be present.
  Fields child(const char* key) const {
    PQ_CHECK(has(key), "{}: missing required field \"{}\"", label_, name(key));
    PQ_CHECK(object_[key].is_object(), "{}: field \"{}\" is not an object", label_, name(key));
    return Fields(object_[key], name(key) + ".", label_);
  }

  template <typename T>
  std::optional<T> optional(const char* key) const {
    if (!has(key)) return std::nullopt;
    try {
      return object_[key].get<T>();
    } catch (const json::exception&) {
      fail("{}: field \"{}\" has the wrong type", label_, name(key));
    }
  }

  std::optional<std::int64_t> optional_integer(const char* key, std::int64_t lo,
                                               std::int64_t hi) const {
    if (!has(key)) return std::nullopt;
    return checked_integer(object_[key], name(key), label_, lo, hi);
  }

  std::int64_t required_integer(const char* key, std::int64_t lo, std::int64_t hi) const {
    const auto value = optional_integer(key, lo, hi);
    PQ_CHECK(value.has_value(), "{}: missing required field \"{}\"", label_, name(key));
    return *value;
  }

  std::vector<std::int64_t> integer_list(const char* key, std::int64_t lo, std::int64_t hi) const {
    PQ_CHECK(object_[key].is_array(), "{}: field \"{}\" is not a list", label_, name(key));
    std::vector<std::int64_t> out;
    for (const json& v : object_[key]) out.push_back(checked_integer(v, name(key), label_, lo, hi));
    return out;
  }

 private:
  const json& object_;
  std::string path_;
  const std::string& label_;
};

// rope_scaling, or transformers v5's rope_parameters (which also holds rope_theta and
// partial_rotary_factor, read by the caller). Qwen3.5's mrope_section and mrope_interleaved are
// not read: for text, whose three position rows are equal, M-RoPE is plain RoPE
// (qwen3_5-architecture-facts.md §5), and transformers skips them when validating.
RopeScaling parse_rope_scaling(const Fields& s) {
  const std::string& label = s.label();
  const std::string what = s.own_name();
  RopeScaling r;
  // transformers accepts both "rope_type" and the older "type".
  if (auto t = s.optional<std::string>("rope_type")) {
    r.type = *t;
  } else if (auto t2 = s.optional<std::string>("type")) {
    r.type = *t2;
  }
  r.factor = s.optional<double>("factor").value_or(1.0);
  r.low_freq_factor = s.optional<double>("low_freq_factor").value_or(1.0);
  r.high_freq_factor = s.optional<double>("high_freq_factor").value_or(4.0);
  r.original_max_position_embeddings =
      s.optional_integer("original_max_position_embeddings", 0, kMaxPositions).value_or(0);
  r.beta_fast = s.optional<double>("beta_fast").value_or(32.0);
  r.beta_slow = s.optional<double>("beta_slow").value_or(1.0);
  r.attention_factor = s.optional<double>("attention_factor");
  r.mscale = s.optional<double>("mscale");
  r.mscale_all_dim = s.optional<double>("mscale_all_dim");
  r.truncate = s.optional<bool>("truncate").value_or(true);
  static const std::vector<std::string> kKnown = {"default", "linear", "dynamic", "llama3", "yarn"};
  PQ_CHECK(std::find(kKnown.begin(), kKnown.end(), r.type) != kKnown.end(),
           "{}: unsupported {} type {}", label, what, quoted_json_string(r.type));
  // The frequencies are divided by factor, and the llama3 and yarn ramps divide by
  // low_freq_factor and take logarithms of the beta rotation counts (transformers
  // modeling_rope_utils.py); zero or negative values make them infinite or NaN.
  if (r.type != "default") {
    PQ_CHECK(r.factor > 0.0, "{}: {} factor {} is not positive", label, what, r.factor);
  }
  PQ_CHECK(r.type != "llama3" || r.low_freq_factor > 0.0,
           "{}: {} low_freq_factor {} is not positive", label, what, r.low_freq_factor);
  PQ_CHECK(r.type != "yarn" || (r.beta_fast > 0.0 && r.beta_slow > 0.0),
           "{}: {} beta_fast {} and beta_slow {} must be positive", label, what, r.beta_fast,
           r.beta_slow);
  return r;
}

// A value rope_parameters and the text config may both give (transformers v5 moves
// partial_rotary_factor into rope_parameters and some files keep both): they must agree.
std::optional<double> rope_value(const Fields& text, const Fields& rope, const char* key) {
  const auto outer = text.optional<double>(key);
  const auto inner = rope.optional<double>(key);
  PQ_CHECK(!outer || !inner || *outer == *inner, "{}: field \"{}\" is {} but \"{}\" is {}",
           text.label(), text.name(key), *outer, rope.name(key), *inner);
  return inner ? inner : outer;
}

// Text config classes with hybrid Gated DeltaNet / gated attention layers, whose defaults
// (layer_types from full_attention_interval, the linear_* fields, a gated q_proj, head_dim 256,
// partial_rotary_factor 0.25, renormalised top-k routing) differ from the Llama-style ones
// (transformers configuration_qwen3_next.py, configuration_qwen3_5.py and _moe.py;
// qwen3_5-architecture-facts.md §1, §6.2).
bool is_hybrid_model_type(std::string_view model_type) {
  return model_type == "qwen3_next" || model_type == "qwen3_5_text" ||
         model_type == "qwen3_5_moe_text";
}

LayerType layer_type(const json& value, const Fields& text, std::size_t index) {
  static const std::map<std::string, LayerType, std::less<>> kTypes = {
      {"full_attention", LayerType::kFullAttention},
      {"sliding_attention", LayerType::kSlidingAttention},
      {"linear_attention", LayerType::kLinearAttention}};
  const auto it = value.is_string() ? kTypes.find(value.get<std::string>()) : kTypes.end();
  PQ_CHECK(it != kTypes.end(),
           "{}: field \"{}\" has {} at index {}; known: full_attention, sliding_attention, "
           "linear_attention",
           text.label(), text.name("layer_types"), value.dump(), index);
  return it->second;
}

std::vector<LayerType> parse_layer_types(const Fields& text, std::int64_t layers, bool hybrid) {
  std::vector<LayerType> types;
  if (text.has("layer_types")) {
    const json& list = text.object()["layer_types"];
    PQ_CHECK(list.is_array(), "{}: field \"{}\" is not a list", text.label(),
             text.name("layer_types"));
    PQ_CHECK(std::ssize(list) == layers, "{}: field \"{}\" has {} entries for {} layers",
             text.label(), text.name("layer_types"), list.size(), layers);
    for (std::size_t i = 0; i < list.size(); ++i) types.push_back(layer_type(list[i], text, i));
  } else if (hybrid) {
    const std::int64_t interval =
        text.optional_integer("full_attention_interval", 1, kMaxCount).value_or(4);
    for (std::int64_t i = 0; i < layers; ++i) {
      types.push_back((i + 1) % interval == 0 ? LayerType::kFullAttention
                                              : LayerType::kLinearAttention);
    }
  }
  return types;
}

LinearAttentionConfig parse_linear_attention(const Fields& text) {
  LinearAttentionConfig a;
  a.conv_kernel_dim =
      text.optional_integer("linear_conv_kernel_dim", 1, kMaxCount).value_or(a.conv_kernel_dim);
  a.key_head_dim =
      text.optional_integer("linear_key_head_dim", 1, kMaxDimension).value_or(a.key_head_dim);
  a.value_head_dim =
      text.optional_integer("linear_value_head_dim", 1, kMaxDimension).value_or(a.value_head_dim);
  a.num_key_heads =
      text.optional_integer("linear_num_key_heads", 1, kMaxCount).value_or(a.num_key_heads);
  a.num_value_heads =
      text.optional_integer("linear_num_value_heads", 1, kMaxCount).value_or(a.num_value_heads);
  // Value head h reads q/k head h / (num_value_heads / num_key_heads) (facts §4.2).
  PQ_CHECK(a.num_value_heads % a.num_key_heads == 0, "{}: {} {} is not a multiple of {} {}",
           text.label(), text.name("linear_num_value_heads"), a.num_value_heads,
           text.name("linear_num_key_heads"), a.num_key_heads);
  return a;
}

VisionConfig parse_vision(const Fields& v) {
  VisionConfig c;
  c.depth = v.required_integer("depth", 1, kMaxCount);
  c.hidden_size = v.required_integer("hidden_size", 1, kMaxDimension);
  c.intermediate_size = v.required_integer("intermediate_size", 1, kMaxDimension);
  c.out_hidden_size = v.required_integer("out_hidden_size", 1, kMaxDimension);
  c.in_channels = v.required_integer("in_channels", 1, kMaxCount);
  c.patch_size = v.required_integer("patch_size", 1, kMaxCount);
  c.temporal_patch_size = v.required_integer("temporal_patch_size", 1, kMaxCount);
  c.spatial_merge_size = v.required_integer("spatial_merge_size", 1, kMaxCount);
  c.num_position_embeddings = v.required_integer("num_position_embeddings", 1, kMaxPositions);
  return c;
}

// quant_method "fp8" in quantization_config: DeepSeek-V3-style block-scaled FP8 weights (E4M3,
// 128x128 weight blocks; minimax_m2-architecture-facts.md §1, §6), the only FP8 layout read.
// Other methods (a compressed-tensors export's own config) say nothing about a source here.
bool parse_fp8_block_weights(const Fields& top) {
  if (!top.has("quantization_config")) return false;
  const Fields q = top.child("quantization_config");
  if (q.optional<std::string>("quant_method").value_or("") != "fp8") return false;
  // DeepSeek-V3 spells the element type "e4m3" (deepseek_v3-architecture-facts.md §1).
  const std::string format = q.optional<std::string>("fmt").value_or("float8_e4m3fn");
  PQ_CHECK(format == "float8_e4m3fn" || format == "e4m3",
           "{}: field \"{}\" is {}; only float8_e4m3fn (e4m3) is read", q.label(), q.name("fmt"),
           quoted_json_string(format));
  const auto block = q.optional<std::vector<std::int64_t>>("weight_block_size");
  PQ_CHECK(block == std::vector<std::int64_t>({128, 128}),
           "{}: field \"{}\" must be [128, 128] (per-tensor or other block sizes are not read)",
           q.label(), q.name("weight_block_size"));
  return true;
}

// MiniMaxM2Config (minimax_m2-architecture-facts.md §1): experts are "num_local_experts" of width
// "intermediate_size" on every layer, top-k weights always renormalised (§4 step 5), and RoPE
// covers "rotary_dim" of head_dim (partial_rotary_factor rotary_dim / head_dim, default half:
// §3). The q/k norm and router variants the facts do not describe are refused.
void parse_minimax_m2(const Fields& text, ModelConfig& c) {
  c.num_experts = text.required_integer("num_local_experts", 1, kMaxCount);
  c.num_experts_per_tok = text.required_integer("num_experts_per_tok", 1, kMaxCount);
  PQ_CHECK(c.num_experts_per_tok <= c.num_experts,
           "{}: num_experts_per_tok {} exceeds num_local_experts {}", text.label(),
           c.num_experts_per_tok, c.num_experts);
  c.moe_intermediate_size = c.intermediate_size;
  PQ_CHECK(c.moe_intermediate_size > 0, "{}: missing required field \"{}\"", text.label(),
           text.name("intermediate_size"));
  c.norm_topk_prob = true;
  const std::string scoring = text.optional<std::string>("scoring_func").value_or("sigmoid");
  PQ_CHECK(scoring == "sigmoid", "{}: field \"{}\" is {}; MiniMax-M2 routes with sigmoid",
           text.label(), text.name("scoring_func"), quoted_json_string(scoring));
  const std::string qk_norm = text.optional<std::string>("qk_norm_type").value_or("per_layer");
  PQ_CHECK(qk_norm == "per_layer",
           "{}: field \"{}\" is {}; only the per_layer (whole-projection) q/k norm is supported",
           text.label(), text.name("qk_norm_type"), quoted_json_string(qk_norm));
  PQ_CHECK(text.optional_integer("shared_intermediate_size", 0, kMaxDimension).value_or(0) == 0,
           "{}: field \"{}\" is set; MiniMax-M2 has no shared expert", text.label(),
           text.name("shared_intermediate_size"));
  const std::int64_t rotary_dim =
      text.optional_integer("rotary_dim", 2, c.head_dim).value_or(c.head_dim / 2);
  c.partial_rotary_factor = static_cast<double>(rotary_dim) / static_cast<double>(c.head_dim);
}

// Gemma4TextConfig (gemma4-architecture-facts.md §1, §1.3, §4, §6, §7): per-layer-type attention
// geometry and RoPE, GeGLU ("hidden_activation"), a MoE block beside the dense MLP when
// enable_moe_block is set, and the final logit soft-cap. The on-device variants' per-layer
// embeddings, KV sharing, double-wide MLP and audio tower (§4.4, §7) are refused until a checkpoint
// of them can be checked.
void parse_gemma4(const Fields& top, const Fields& text, ModelConfig& c) {
  const std::string& label = text.label();
  Gemma4Config g;
  c.hidden_act = text.optional<std::string>("hidden_activation").value_or("gelu_pytorch_tanh");
  PQ_CHECK(text.optional_integer("hidden_size_per_layer_input", 0, kMaxDimension).value_or(0) == 0,
           "{}: field \"{}\" is set; Gemma 4 per-layer embeddings (E2B/E4B) are not supported",
           label, text.name("hidden_size_per_layer_input"));
  PQ_CHECK(text.optional_integer("num_kv_shared_layers", 0, kMaxCount).value_or(0) == 0,
           "{}: field \"{}\" is set; Gemma 4 KV sharing (E2B/E4B) is not supported", label,
           text.name("num_kv_shared_layers"));
  PQ_CHECK(!text.optional<bool>("use_double_wide_mlp").value_or(false),
           "{}: field \"{}\" is set; Gemma 4's double-wide MLP (E2B) is not supported", label,
           text.name("use_double_wide_mlp"));
  PQ_CHECK(!top.has("audio_config"),
           "{}: field \"audio_config\" is set; the Gemma 4 audio tower "
           "(E2B/E4B) is not supported",
           label);
  // Layers default to sliding except every sixth; the last is always full (§1.3).
  if (c.layer_types.empty()) {
    for (std::int64_t i = 0; i < c.num_hidden_layers; ++i) {
      c.layer_types.push_back((i + 1) % 6 == 0 ? LayerType::kFullAttention
                                               : LayerType::kSlidingAttention);
    }
  }
  c.layer_types.back() = LayerType::kFullAttention;
  for (std::size_t i = 0; i < c.layer_types.size(); ++i) {
    PQ_CHECK(c.layer_types[i] != LayerType::kLinearAttention,
             "{}: field \"{}\" has linear_attention at index {}; Gemma 4 layers are "
             "sliding_attention or full_attention",
             label, text.name("layer_types"), i);
  }
  // Newer config classes move global_head_dim and num_global_key_value_heads into
  // per_layer_config, keyed by full layer index (§1.3): read them from the first full layer.
  std::optional<std::int64_t> global_head_dim =
      text.optional_integer("global_head_dim", 1, kMaxDimension);
  std::optional<std::int64_t> global_kv_heads =
      text.optional_integer("num_global_key_value_heads", 1, kMaxCount);
  if (text.has("per_layer_config")) {
    const Fields per_layer = text.child("per_layer_config");
    for (std::size_t i = 0; i < c.layer_types.size(); ++i) {
      const std::string key = std::to_string(i);
      if (c.layer_types[i] != LayerType::kFullAttention || !per_layer.has(key.c_str())) continue;
      const Fields layer = per_layer.child(key.c_str());
      global_head_dim =
          global_head_dim ? global_head_dim : layer.optional_integer("head_dim", 1, kMaxDimension);
      global_kv_heads = global_kv_heads
                            ? global_kv_heads
                            : layer.optional_integer("num_key_value_heads", 1, kMaxCount);
      break;
    }
  }
  g.global_head_dim = global_head_dim.value_or(g.global_head_dim);
  g.attention_k_eq_v = text.optional<bool>("attention_k_eq_v").value_or(false);
  g.full_key_value_heads =
      g.attention_k_eq_v ? global_kv_heads.value_or(c.num_key_value_heads) : c.num_key_value_heads;
  PQ_CHECK(c.num_attention_heads % g.full_key_value_heads == 0,
           "{}: num_attention_heads {} is not a multiple of the full layers' {} KV heads", label,
           c.num_attention_heads, g.full_key_value_heads);
  const Fields full = text.child("rope_parameters").child("full_attention");
  const std::string full_type = full.optional<std::string>("rope_type").value_or("default");
  PQ_CHECK(full_type == "proportional" || full_type == "default", "{}: unsupported {} type {}",
           label, full.name("rope_type"), quoted_json_string(full_type));
  g.full_rope_theta = full.optional<double>("rope_theta").value_or(g.full_rope_theta);
  g.full_partial_rotary_factor = full_type == "proportional"
                                     ? full.optional<double>("partial_rotary_factor").value_or(1.0)
                                     : 1.0;
  PQ_CHECK(g.full_rope_theta > 0.0 && g.full_partial_rotary_factor > 0.0 &&
               g.full_partial_rotary_factor <= 1.0,
           "{}: {} has rope_theta {} and partial_rotary_factor {}", label, full.own_name(),
           g.full_rope_theta, g.full_partial_rotary_factor);
  g.final_logit_softcapping = text.optional<double>("final_logit_softcapping").value_or(0.0);
  PQ_CHECK(g.final_logit_softcapping >= 0.0, "{}: {} {} is negative", label,
           text.name("final_logit_softcapping"), g.final_logit_softcapping);
  if (text.optional<bool>("enable_moe_block").value_or(false)) {
    // The MoE block on every layer, beside the dense MLP (§6); the real config's
    // expert_intermediate_size is read as vLLM reads it (§1.3).
    c.num_experts = text.required_integer("num_experts", 1, kMaxCount);
    c.num_experts_per_tok = text.required_integer("top_k_experts", 1, c.num_experts);
    const auto width = text.optional_integer("moe_intermediate_size", 1, kMaxDimension);
    c.moe_intermediate_size =
        width ? *width : text.required_integer("expert_intermediate_size", 1, kMaxDimension);
    c.norm_topk_prob = true;
  }
  PQ_CHECK(c.intermediate_size > 0, "{}: missing required field \"{}\"", label,
           text.name("intermediate_size"));
  c.gemma4 = g;
  if (top.has("vision_config")) {
    // The tower is passed through (§9); what names and shapes its tensors. Its patch embedder
    // is a Linear over patch_size^2 RGB pixels (§9).
    const Fields v = top.child("vision_config");
    PQ_CHECK(!v.optional<bool>("use_clipped_linears").value_or(false),
             "{}: field \"{}\" is set; the clipped-linear vision towers (E2B/E4B) are not "
             "supported",
             label, v.name("use_clipped_linears"));
    VisionConfig vision;
    vision.depth = v.required_integer("num_hidden_layers", 1, kMaxCount);
    vision.hidden_size = v.required_integer("hidden_size", 1, kMaxDimension);
    vision.intermediate_size = v.required_integer("intermediate_size", 1, kMaxDimension);
    vision.out_hidden_size = c.hidden_size;
    vision.in_channels = 3;
    vision.patch_size = v.required_integer("patch_size", 1, kMaxCount);
    vision.num_position_embeddings =
        v.required_integer("position_embedding_size", 1, kMaxPositions);
    vision.head_dim = v.required_integer("head_dim", 1, kMaxDimension);
    vision.num_attention_heads = v.required_integer("num_attention_heads", 1, kMaxCount);
    vision.num_key_value_heads = v.optional_integer("num_key_value_heads", 1, kMaxCount)
                                     .value_or(vision.num_attention_heads);
    vision.standardize = v.optional<bool>("standardize").value_or(false);
    c.vision = vision;
  }
}

// DeepseekV3Config (deepseek_v3-architecture-facts.md §1, §3, §5, §6): n_routed_experts of width
// moe_intermediate_size on layers l >= first_k_dense_replace with l % moe_layer_freq == 0 (vLLM's
// rule, §1), the others dense; n_shared_experts ungated shared experts of the same width; sigmoid
// scores with the noaux_tc selection bias and group limit; MLA; num_nextn_predict_layers MTP
// layers after the body, built like a body layer of their index.
void parse_deepseek_v3(const Fields& text, ModelConfig& c) {
  c.num_experts = text.required_integer("n_routed_experts", 1, kMaxCount);
  c.num_experts_per_tok = text.required_integer("num_experts_per_tok", 1, kMaxCount);
  PQ_CHECK(c.num_experts_per_tok <= c.num_experts,
           "{}: num_experts_per_tok {} exceeds n_routed_experts {}", text.label(),
           c.num_experts_per_tok, c.num_experts);
  c.moe_intermediate_size = text.required_integer("moe_intermediate_size", 1, kMaxDimension);
  c.norm_topk_prob = text.optional<bool>("norm_topk_prob").value_or(true);
  c.shared_expert_intermediate_size =
      text.optional_integer("n_shared_experts", 0, kMaxCount).value_or(0) * c.moe_intermediate_size;
  const std::string scoring = text.optional<std::string>("scoring_func").value_or("sigmoid");
  PQ_CHECK(scoring == "sigmoid", "{}: field \"{}\" is {}; DeepSeek-V3 routes with sigmoid",
           text.label(), text.name("scoring_func"), quoted_json_string(scoring));
  const std::string method = text.optional<std::string>("topk_method").value_or("noaux_tc");
  PQ_CHECK(method == "noaux_tc",
           "{}: field \"{}\" is {}; only noaux_tc (selection bias, group limit) is supported",
           text.label(), text.name("topk_method"), quoted_json_string(method));
  c.n_group = text.optional_integer("n_group", 1, kMaxCount).value_or(1);
  c.topk_group = text.optional_integer("topk_group", 1, c.n_group).value_or(c.n_group);
  PQ_CHECK(c.num_experts % c.n_group == 0, "{}: n_routed_experts {} is not a multiple of {} {}",
           text.label(), c.num_experts, text.name("n_group"), c.n_group);
  // A group scores by its two best experts (§5 step 3) and the kept groups must hold top_k.
  PQ_CHECK(c.num_experts / c.n_group >= 2 &&
               c.topk_group * (c.num_experts / c.n_group) >= c.num_experts_per_tok,
           "{}: {} groups of {} experts, {} kept, cannot supply num_experts_per_tok {}",
           text.label(), c.n_group, c.num_experts / c.n_group, c.topk_group, c.num_experts_per_tok);
  c.routed_scaling_factor = text.optional<double>("routed_scaling_factor").value_or(1.0);
  PQ_CHECK(c.routed_scaling_factor > 0.0 && std::isfinite(c.routed_scaling_factor),
           "{}: routed_scaling_factor {} is not a positive number", text.label(),
           c.routed_scaling_factor);
  // HF's rope_interleave (default true) rotates the stored interleaved pairs; false would pair
  // (i, i + d/2) on the same weights, a different model (§3.1).
  PQ_CHECK(text.optional<bool>("rope_interleave").value_or(true),
           "{}: field \"{}\" is false; only the interleaved rope of the published checkpoints "
           "is supported",
           text.label(), text.name("rope_interleave"));

  MlaConfig mla;
  mla.q_lora_rank = text.optional_integer("q_lora_rank", 1, kMaxDimension).value_or(0);
  mla.kv_lora_rank = text.required_integer("kv_lora_rank", 1, kMaxDimension);
  mla.qk_nope_head_dim = text.required_integer("qk_nope_head_dim", 1, kMaxDimension);
  mla.qk_rope_head_dim = text.required_integer("qk_rope_head_dim", 2, kMaxDimension);
  mla.v_head_dim = text.required_integer("v_head_dim", 1, kMaxDimension);
  PQ_CHECK(mla.qk_rope_head_dim % 2 == 0, "{}: qk_rope_head_dim {} is odd", text.label(),
           mla.qk_rope_head_dim);
  c.mla = mla;
  c.head_dim = mla.qk_rope_head_dim;
  c.partial_rotary_factor = 1.0;

  const std::int64_t first_dense =
      text.optional_integer("first_k_dense_replace", 0, kMaxCount).value_or(0);
  const std::int64_t frequency = text.optional_integer("moe_layer_freq", 1, kMaxCount).value_or(1);
  c.mtp_num_hidden_layers =
      text.optional_integer("num_nextn_predict_layers", 0, kMaxCount).value_or(0);
  c.decoder_sparse_step = 1;
  c.mlp_only_layers.clear();
  for (std::int64_t l = 0; l < c.num_hidden_layers + c.mtp_num_hidden_layers; ++l) {
    if (l < first_dense || l % frequency != 0) c.mlp_only_layers.push_back(l);
  }
}

}  // namespace

bool ModelConfig::is_sliding_attention_layer(std::int64_t layer) const {
  return layer >= 0 && layer < std::ssize(layer_types) &&
         layer_types[static_cast<std::size_t>(layer)] == LayerType::kSlidingAttention;
}

std::int64_t ModelConfig::attention_head_dim(std::int64_t layer) const {
  return gemma4 && !is_sliding_attention_layer(layer) ? gemma4->global_head_dim : head_dim;
}

std::int64_t ModelConfig::attention_key_value_heads(std::int64_t layer) const {
  return gemma4 && !is_sliding_attention_layer(layer) ? gemma4->full_key_value_heads
                                                      : num_key_value_heads;
}

bool ModelConfig::has_v_proj(std::int64_t layer) const {
  return !(gemma4 && gemma4->attention_k_eq_v && !is_sliding_attention_layer(layer));
}

bool ModelConfig::is_moe_layer(std::int64_t layer) const {
  if (num_experts <= 0) return false;
  if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end()) {
    return false;
  }
  return (layer + 1) % decoder_sparse_step == 0;
}

bool ModelConfig::is_linear_attention_layer(std::int64_t layer) const {
  return layer >= 0 && layer < std::ssize(layer_types) &&
         layer_types[static_cast<std::size_t>(layer)] == LayerType::kLinearAttention;
}

ModelConfig ModelConfig::from_json(const json& j, const std::string& label) {
  PQ_CHECK(j.is_object(), "{}: config is not a JSON object", label);
  ModelConfig c;
  c.raw = j;
  const Fields top(j, "", label);
  const auto archs = top.optional<std::vector<std::string>>("architectures");
  PQ_CHECK(archs.has_value() && !archs->empty(), "{}: missing \"architectures\"", label);
  c.architecture = archs->front();
  c.model_type = top.optional<std::string>("model_type").value_or("");
  // transformers' get_text_config(): a multimodal config keeps its text model under text_config.
  const bool nested = top.has("text_config");
  const Fields text = nested ? top.child("text_config") : top;
  const std::string text_model_type = text.optional<std::string>("model_type").value_or("");
  const bool hybrid = is_hybrid_model_type(text_model_type);

  c.hidden_size = text.required_integer("hidden_size", 1, kMaxDimension);
  c.intermediate_size = text.optional_integer("intermediate_size", 0, kMaxDimension).value_or(0);
  c.num_hidden_layers = text.required_integer("num_hidden_layers", 1, kMaxCount);
  c.num_attention_heads = text.required_integer("num_attention_heads", 1, kMaxCount);
  c.num_key_value_heads =
      text.optional_integer("num_key_value_heads", 1, kMaxCount).value_or(c.num_attention_heads);
  PQ_CHECK(c.num_attention_heads % c.num_key_value_heads == 0,
           "{}: num_attention_heads {} is not a multiple of num_key_value_heads {}", label,
           c.num_attention_heads, c.num_key_value_heads);
  c.head_dim = text.optional_integer("head_dim", 1, kMaxDimension)
                   .value_or(hybrid ? 256 : c.hidden_size / c.num_attention_heads);
  PQ_CHECK(c.head_dim > 0, "{}: field \"{}\" must be positive, got {}", label,
           text.name("head_dim"), c.head_dim);
  c.vocab_size = text.required_integer("vocab_size", 1, kMaxVocabulary);
  c.max_position_embeddings =
      text.optional_integer("max_position_embeddings", 0, kMaxPositions).value_or(0);
  c.rms_norm_eps = text.optional<double>("rms_norm_eps").value_or(1e-6);
  // RMSNorm divides by sqrt(mean(x^2) + eps), with eps as a float, and RoPE raises rope_theta to
  // negative powers (and yarn takes its logarithm): a negative eps or a theta <= 0 (<= 1 for yarn)
  // gives NaN logits, and an eps beyond float range is no float. Real models use 1e-5 or 1e-6.
  PQ_CHECK(c.rms_norm_eps >= 0.0 && c.rms_norm_eps <= 1.0, "{}: rms_norm_eps {} is outside [0, 1]",
           label, c.rms_norm_eps);
  std::optional<double> rope_theta;
  std::optional<double> partial_rotary_factor;
  const bool gemma4 = text_model_type == "gemma4_text";
  if (gemma4) {
    // One parameter set per layer type (facts §1): the sliding layers' is the model's RoPE, the
    // full layers' is read by parse_gemma4.
    const Fields rope = text.child("rope_parameters").child("sliding_attention");
    c.rope_scaling = parse_rope_scaling(rope);
    rope_theta = rope.optional<double>("rope_theta");
  } else if (text.has("rope_parameters")) {
    PQ_CHECK(!text.has("rope_scaling"), "{}: both \"{}\" and \"{}\" are given", label,
             text.name("rope_parameters"), text.name("rope_scaling"));
    const Fields rope = text.child("rope_parameters");
    // Gemma-style files nest one parameter set per layer type.
    for (const auto& [key, value] : rope.object().items()) {
      PQ_CHECK(!value.is_object(),
               "{}: field \"{}\" holds parameters per layer type (\"{}\"), which are not supported",
               label, text.name("rope_parameters"), key);
    }
    c.rope_scaling = parse_rope_scaling(rope);
    rope_theta = rope_value(text, rope, "rope_theta");
    partial_rotary_factor = rope_value(text, rope, "partial_rotary_factor");
  } else {
    if (text.has("rope_scaling")) c.rope_scaling = parse_rope_scaling(text.child("rope_scaling"));
    rope_theta = text.optional<double>("rope_theta");
    partial_rotary_factor = text.optional<double>("partial_rotary_factor");
  }
  c.rope_theta = rope_theta.value_or(10000.0);
  PQ_CHECK(c.rope_theta > 0.0, "{}: rope_theta {} is not positive", label, c.rope_theta);
  PQ_CHECK(c.rope_scaling.type != "yarn" || c.rope_theta > 1.0,
           "{}: yarn rope_scaling needs rope_theta > 1, got {}", label, c.rope_theta);
  c.partial_rotary_factor = partial_rotary_factor.value_or(hybrid ? 0.25 : 1.0);
  c.hidden_act = text.optional<std::string>("hidden_act").value_or("silu");
  c.max_window_layers = text.optional_integer("max_window_layers", 0, kMaxCount);
  // The wrapper and its text config may both say; vLLM ties by the text config's value.
  const auto tie = text.optional<bool>("tie_word_embeddings");
  if (nested) {
    const auto outer = top.optional<bool>("tie_word_embeddings");
    PQ_CHECK(!tie || !outer || *tie == *outer,
             "{}: field \"tie_word_embeddings\" is {} but \"{}\" is {}", label, *outer,
             text.name("tie_word_embeddings"), *tie);
    c.tie_word_embeddings = tie.value_or(outer.value_or(false));
  } else {
    c.tie_word_embeddings = tie.value_or(false);
  }
  c.attention_bias = text.optional<bool>("attention_bias").value_or(false);
  c.mlp_bias = text.optional<bool>("mlp_bias").value_or(false);
  const bool use_sliding = text.optional<bool>("use_sliding_window").value_or(true);
  if (use_sliding) {
    c.sliding_window = text.optional_integer("sliding_window", 0, kMaxPositions);
  }
  c.torch_dtype = text.optional<std::string>("torch_dtype").value_or("");
  c.bos_token_id = text.optional_integer("bos_token_id", 0, kMaxVocabulary - 1);
  if (text.has("eos_token_id") && text.object()["eos_token_id"].is_array()) {
    c.eos_token_ids = text.integer_list("eos_token_id", 0, kMaxVocabulary - 1);
  } else if (auto eos = text.optional_integer("eos_token_id", 0, kMaxVocabulary - 1)) {
    c.eos_token_ids = {*eos};
  }
  c.num_experts = gemma4 ? 0 : text.optional_integer("num_experts", 0, kMaxCount).value_or(0);
  if (c.num_experts > 0) {
    c.num_experts_per_tok = text.required_integer("num_experts_per_tok", 1, kMaxCount);
    PQ_CHECK(c.num_experts_per_tok <= c.num_experts,
             "{}: num_experts_per_tok {} exceeds num_experts {}", label, c.num_experts_per_tok,
             c.num_experts);
    c.moe_intermediate_size = text.required_integer("moe_intermediate_size", 1, kMaxDimension);
    // Qwen3.5-MoE has no flag and always renormalises; vLLM defaults it to true (facts §6.2).
    c.norm_topk_prob = text.optional<bool>("norm_topk_prob").value_or(hybrid);
    c.decoder_sparse_step = text.optional_integer("decoder_sparse_step", 1, kMaxCount).value_or(1);
    if (text.has("mlp_only_layers")) {
      c.mlp_only_layers = text.integer_list("mlp_only_layers", 0, kMaxCount - 1);
    }
    c.shared_expert_intermediate_size =
        text.optional_integer("shared_expert_intermediate_size", 0, kMaxDimension).value_or(0);
  }

  if (text_model_type == "minimax_m2" || c.architecture == "MiniMaxM2ForCausalLM") {
    parse_minimax_m2(text, c);
  }
  const bool deepseek_v3 =
      text_model_type == "deepseek_v3" || c.architecture == "DeepseekV3ForCausalLM";
  if (deepseek_v3) parse_deepseek_v3(text, c);
  c.fp8_block_weights = parse_fp8_block_weights(top);

  c.layer_types = parse_layer_types(text, c.num_hidden_layers, hybrid);
  if (gemma4) parse_gemma4(top, text, c);
  if (std::find(c.layer_types.begin(), c.layer_types.end(), LayerType::kLinearAttention) !=
      c.layer_types.end()) {
    c.linear_attention = parse_linear_attention(text);
  }
  c.attn_output_gate = text.optional<bool>("attn_output_gate").value_or(hybrid);
  // Qwen3-Next configs have no mtp_num_hidden_layers; vLLM reads num_nextn_predict_layers,
  // default 1 (facts §1).
  const bool next = text_model_type == "qwen3_next";
  if (!deepseek_v3) {
    c.mtp_num_hidden_layers =
        text.optional_integer(next ? "num_nextn_predict_layers" : "mtp_num_hidden_layers", 0,
                              kMaxCount)
            .value_or(next ? 1 : 0);
  }
  // The Qwen3.5/3.6 wrappers hold a Qwen3-VL-style vision tower (facts §8); other multimodal
  // configs describe theirs with other fields.
  if (c.model_type == "qwen3_5" || c.model_type == "qwen3_5_moe") {
    c.vision = parse_vision(top.child("vision_config"));
  }
  return c;
}

ModelConfig ModelConfig::load(const std::filesystem::path& model_dir) {
  const auto path = model_dir / "config.json";
  return from_json(read_json_file(path), path.string());
}

}  // namespace pq::model
