#include "model/config.h"

#include <algorithm>

#include "common/error.h"
#include "common/file_util.h"
#include "common/json_reader.h"

namespace pq::model {

using nlohmann::json;

namespace {

template <typename T>
std::optional<T> optional_field(const json& j, const char* key, const std::string& label) {
  if (!j.contains(key) || j[key].is_null()) return std::nullopt;
  try {
    return j[key].get<T>();
  } catch (const json::exception&) {
    fail("{}: field \"{}\" has the wrong type", label, key);
  }
}

// Bounds of the integer fields, generous beside the largest released models (hidden 16,384 and
// 262,144 vocabulary entries, a few hundred layers, 512 experts), so that every shape product
// fits in 64 bits and a hostile value is refused before anything is sized by it.
constexpr std::int64_t kMaxDimension = std::int64_t{1} << 20;   // widths, head_dim
constexpr std::int64_t kMaxCount = std::int64_t{1} << 14;       // layers, heads, experts
constexpr std::int64_t kMaxVocabulary = std::int64_t{1} << 24;  // as tokenizer ids
constexpr std::int64_t kMaxPositions = std::int64_t{1} << 30;

// An integer field: a JSON integer (256.5 and 1e30 are refused, not truncated or wrapped) in
// [lo, hi].
std::int64_t checked_integer(const json& value, const char* key, const std::string& label,
                             std::int64_t lo, std::int64_t hi) {
  PQ_CHECK(value.is_number_integer(), "{}: field \"{}\" must be an integer, got {}", label, key,
           value.dump());
  bool in_range = false;
  if (value.is_number_unsigned()) {
    const auto u = value.get<std::uint64_t>();
    in_range = u <= static_cast<std::uint64_t>(hi) && static_cast<std::int64_t>(u) >= lo;
  } else {
    const auto v = value.get<std::int64_t>();
    in_range = v >= lo && v <= hi;
  }
  PQ_CHECK(in_range, "{}: field \"{}\" is {}, outside [{}, {}]", label, key, value.dump(), lo, hi);
  return value.get<std::int64_t>();
}

std::optional<std::int64_t> optional_integer(const json& j, const char* key,
                                             const std::string& label, std::int64_t lo,
                                             std::int64_t hi) {
  if (!j.contains(key) || j[key].is_null()) return std::nullopt;
  return checked_integer(j[key], key, label, lo, hi);
}

std::int64_t required_integer(const json& j, const char* key, const std::string& label,
                              std::int64_t lo, std::int64_t hi) {
  const auto value = optional_integer(j, key, label, lo, hi);
  PQ_CHECK(value.has_value(), "{}: missing required field \"{}\"", label, key);
  return *value;
}

std::vector<std::int64_t> integer_list(const json& j, const char* key, const std::string& label,
                                       std::int64_t lo, std::int64_t hi) {
  PQ_CHECK(j[key].is_array(), "{}: field \"{}\" is not a list", label, key);
  std::vector<std::int64_t> out;
  for (const json& v : j[key]) out.push_back(checked_integer(v, key, label, lo, hi));
  return out;
}

RopeScaling parse_rope_scaling(const json& j, const std::string& label) {
  RopeScaling r;
  if (!j.contains("rope_scaling") || j["rope_scaling"].is_null()) return r;
  const json& s = j["rope_scaling"];
  PQ_CHECK(s.is_object(), "{}: rope_scaling is not an object", label);
  // transformers accepts both "rope_type" and the older "type".
  if (auto t = optional_field<std::string>(s, "rope_type", label)) {
    r.type = *t;
  } else if (auto t2 = optional_field<std::string>(s, "type", label)) {
    r.type = *t2;
  }
  r.factor = optional_field<double>(s, "factor", label).value_or(1.0);
  r.low_freq_factor = optional_field<double>(s, "low_freq_factor", label).value_or(1.0);
  r.high_freq_factor = optional_field<double>(s, "high_freq_factor", label).value_or(4.0);
  r.original_max_position_embeddings =
      optional_integer(s, "original_max_position_embeddings", label, 0, kMaxPositions).value_or(0);
  r.beta_fast = optional_field<double>(s, "beta_fast", label).value_or(32.0);
  r.beta_slow = optional_field<double>(s, "beta_slow", label).value_or(1.0);
  r.attention_factor = optional_field<double>(s, "attention_factor", label);
  r.mscale = optional_field<double>(s, "mscale", label);
  r.mscale_all_dim = optional_field<double>(s, "mscale_all_dim", label);
  r.truncate = optional_field<bool>(s, "truncate", label).value_or(true);
  static const std::vector<std::string> kKnown = {"default", "linear", "dynamic", "llama3", "yarn"};
  PQ_CHECK(std::find(kKnown.begin(), kKnown.end(), r.type) != kKnown.end(),
           "{}: unsupported rope_scaling type {}", label, quoted_json_string(r.type));
  // The frequencies are divided by factor, and the llama3 and yarn ramps divide by
  // low_freq_factor and take logarithms of the beta rotation counts (transformers
  // modeling_rope_utils.py); zero or negative values make them infinite or NaN.
  if (r.type != "default") {
    PQ_CHECK(r.factor > 0.0, "{}: rope_scaling factor {} is not positive", label, r.factor);
  }
  PQ_CHECK(r.type != "llama3" || r.low_freq_factor > 0.0,
           "{}: rope_scaling low_freq_factor {} is not positive", label, r.low_freq_factor);
  PQ_CHECK(r.type != "yarn" || (r.beta_fast > 0.0 && r.beta_slow > 0.0),
           "{}: rope_scaling beta_fast {} and beta_slow {} must be positive", label, r.beta_fast,
           r.beta_slow);
  return r;
}

}  // namespace

bool ModelConfig::is_moe_layer(std::int64_t layer) const {
  if (num_experts <= 0) return false;
  if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end()) {
    return false;
  }
  return (layer + 1) % decoder_sparse_step == 0;
}

ModelConfig ModelConfig::from_json(const json& j, const std::string& label) {
  PQ_CHECK(j.is_object(), "{}: config is not a JSON object", label);
  ModelConfig c;
  c.raw = j;
  const auto archs = optional_field<std::vector<std::string>>(j, "architectures", label);
  PQ_CHECK(archs.has_value() && !archs->empty(), "{}: missing \"architectures\"", label);
  c.architecture = archs->front();
  c.model_type = optional_field<std::string>(j, "model_type", label).value_or("");
  c.hidden_size = required_integer(j, "hidden_size", label, 1, kMaxDimension);
  c.intermediate_size =
      optional_integer(j, "intermediate_size", label, 0, kMaxDimension).value_or(0);
  c.num_hidden_layers = required_integer(j, "num_hidden_layers", label, 1, kMaxCount);
  c.num_attention_heads = required_integer(j, "num_attention_heads", label, 1, kMaxCount);
  c.num_key_value_heads = optional_integer(j, "num_key_value_heads", label, 1, kMaxCount)
                              .value_or(c.num_attention_heads);
  PQ_CHECK(c.num_attention_heads % c.num_key_value_heads == 0,
           "{}: num_attention_heads {} is not a multiple of num_key_value_heads {}", label,
           c.num_attention_heads, c.num_key_value_heads);
  c.head_dim = optional_integer(j, "head_dim", label, 1, kMaxDimension)
                   .value_or(c.hidden_size / c.num_attention_heads);
  PQ_CHECK(c.head_dim > 0, "{}: field \"head_dim\" must be positive, got {}", label, c.head_dim);
  c.vocab_size = required_integer(j, "vocab_size", label, 1, kMaxVocabulary);
  c.max_position_embeddings =
      optional_integer(j, "max_position_embeddings", label, 0, kMaxPositions).value_or(0);
  c.rms_norm_eps = optional_field<double>(j, "rms_norm_eps", label).value_or(1e-6);
  // RMSNorm divides by sqrt(mean(x^2) + eps), with eps as a float, and RoPE raises rope_theta to
  // negative powers (and yarn takes its logarithm): a negative eps or a theta <= 0 (<= 1 for yarn)
  // gives NaN logits, and an eps beyond float range is no float. Real models use 1e-5 or 1e-6.
  PQ_CHECK(c.rms_norm_eps >= 0.0 && c.rms_norm_eps <= 1.0, "{}: rms_norm_eps {} is outside [0, 1]",
           label, c.rms_norm_eps);
  c.rope_theta = optional_field<double>(j, "rope_theta", label).value_or(10000.0);
  PQ_CHECK(c.rope_theta > 0.0, "{}: rope_theta {} is not positive", label, c.rope_theta);
  c.rope_scaling = parse_rope_scaling(j, label);
  PQ_CHECK(c.rope_scaling.type != "yarn" || c.rope_theta > 1.0,
           "{}: yarn rope_scaling needs rope_theta > 1, got {}", label, c.rope_theta);
  c.partial_rotary_factor = optional_field<double>(j, "partial_rotary_factor", label).value_or(1.0);
  c.hidden_act = optional_field<std::string>(j, "hidden_act", label).value_or("silu");
  c.max_window_layers = optional_integer(j, "max_window_layers", label, 0, kMaxCount);
  c.tie_word_embeddings = optional_field<bool>(j, "tie_word_embeddings", label).value_or(false);
  c.attention_bias = optional_field<bool>(j, "attention_bias", label).value_or(false);
  c.mlp_bias = optional_field<bool>(j, "mlp_bias", label).value_or(false);
  const bool use_sliding = optional_field<bool>(j, "use_sliding_window", label).value_or(true);
  if (use_sliding) {
    c.sliding_window = optional_integer(j, "sliding_window", label, 0, kMaxPositions);
  }
  c.torch_dtype = optional_field<std::string>(j, "torch_dtype", label).value_or("");
  c.bos_token_id = optional_integer(j, "bos_token_id", label, 0, kMaxVocabulary - 1);
  if (j.contains("eos_token_id") && j["eos_token_id"].is_array()) {
    c.eos_token_ids = integer_list(j, "eos_token_id", label, 0, kMaxVocabulary - 1);
  } else if (auto eos = optional_integer(j, "eos_token_id", label, 0, kMaxVocabulary - 1)) {
    c.eos_token_ids = {*eos};
  }
  c.num_experts = optional_integer(j, "num_experts", label, 0, kMaxCount).value_or(0);
  if (c.num_experts > 0) {
    c.num_experts_per_tok = required_integer(j, "num_experts_per_tok", label, 1, kMaxCount);
    PQ_CHECK(c.num_experts_per_tok <= c.num_experts,
             "{}: num_experts_per_tok {} exceeds num_experts {}", label, c.num_experts_per_tok,
             c.num_experts);
    c.moe_intermediate_size = required_integer(j, "moe_intermediate_size", label, 1, kMaxDimension);
    c.norm_topk_prob = optional_field<bool>(j, "norm_topk_prob", label).value_or(false);
    c.decoder_sparse_step =
        optional_integer(j, "decoder_sparse_step", label, 1, kMaxCount).value_or(1);
    if (j.contains("mlp_only_layers") && !j["mlp_only_layers"].is_null()) {
      c.mlp_only_layers = integer_list(j, "mlp_only_layers", label, 0, kMaxCount - 1);
    }
  }
  return c;
}

ModelConfig ModelConfig::load(const std::filesystem::path& model_dir) {
  const auto path = model_dir / "config.json";
  return from_json(read_json_file(path), path.string());
}

}  // namespace pq::model
