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

template <typename T>
T required_field(const json& j, const char* key, const std::string& label) {
  auto value = optional_field<T>(j, key, label);
  PQ_CHECK(value.has_value(), "{}: missing required field \"{}\"", label, key);
  return *value;
}

std::int64_t positive(std::int64_t v, const char* key, const std::string& label) {
  PQ_CHECK(v > 0, "{}: field \"{}\" must be positive, got {}", label, key, v);
  return v;
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
      optional_field<std::int64_t>(s, "original_max_position_embeddings", label).value_or(0);
  r.beta_fast = optional_field<double>(s, "beta_fast", label).value_or(32.0);
  r.beta_slow = optional_field<double>(s, "beta_slow", label).value_or(1.0);
  r.attention_factor = optional_field<double>(s, "attention_factor", label);
  static const std::vector<std::string> kKnown = {"default", "linear", "dynamic", "llama3", "yarn"};
  PQ_CHECK(std::find(kKnown.begin(), kKnown.end(), r.type) != kKnown.end(),
           "{}: unsupported rope_scaling type \"{}\"", label, r.type);
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
  c.hidden_size =
      positive(required_field<std::int64_t>(j, "hidden_size", label), "hidden_size", label);
  c.intermediate_size = optional_field<std::int64_t>(j, "intermediate_size", label).value_or(0);
  c.num_hidden_layers = positive(required_field<std::int64_t>(j, "num_hidden_layers", label),
                                 "num_hidden_layers", label);
  c.num_attention_heads = positive(required_field<std::int64_t>(j, "num_attention_heads", label),
                                   "num_attention_heads", label);
  c.num_key_value_heads = positive(
      optional_field<std::int64_t>(j, "num_key_value_heads", label).value_or(c.num_attention_heads),
      "num_key_value_heads", label);
  PQ_CHECK(c.num_attention_heads % c.num_key_value_heads == 0,
           "{}: num_attention_heads {} is not a multiple of num_key_value_heads {}", label,
           c.num_attention_heads, c.num_key_value_heads);
  c.head_dim = optional_field<std::int64_t>(j, "head_dim", label)
                   .value_or(c.hidden_size / c.num_attention_heads);
  positive(c.head_dim, "head_dim", label);
  c.vocab_size =
      positive(required_field<std::int64_t>(j, "vocab_size", label), "vocab_size", label);
  c.max_position_embeddings =
      optional_field<std::int64_t>(j, "max_position_embeddings", label).value_or(0);
  c.rms_norm_eps = optional_field<double>(j, "rms_norm_eps", label).value_or(1e-6);
  c.rope_theta = optional_field<double>(j, "rope_theta", label).value_or(10000.0);
  c.rope_scaling = parse_rope_scaling(j, label);
  c.tie_word_embeddings = optional_field<bool>(j, "tie_word_embeddings", label).value_or(false);
  c.attention_bias = optional_field<bool>(j, "attention_bias", label).value_or(false);
  c.mlp_bias = optional_field<bool>(j, "mlp_bias", label).value_or(false);
  const bool use_sliding = optional_field<bool>(j, "use_sliding_window", label).value_or(true);
  if (use_sliding) c.sliding_window = optional_field<std::int64_t>(j, "sliding_window", label);
  c.torch_dtype = optional_field<std::string>(j, "torch_dtype", label).value_or("");
  c.bos_token_id = optional_field<std::int64_t>(j, "bos_token_id", label);
  if (j.contains("eos_token_id") && j["eos_token_id"].is_array()) {
    c.eos_token_ids = required_field<std::vector<std::int64_t>>(j, "eos_token_id", label);
  } else if (auto eos = optional_field<std::int64_t>(j, "eos_token_id", label)) {
    c.eos_token_ids = {*eos};
  }
  c.num_experts = optional_field<std::int64_t>(j, "num_experts", label).value_or(0);
  if (c.num_experts > 0) {
    c.num_experts_per_tok = positive(required_field<std::int64_t>(j, "num_experts_per_tok", label),
                                     "num_experts_per_tok", label);
    PQ_CHECK(c.num_experts_per_tok <= c.num_experts,
             "{}: num_experts_per_tok {} exceeds num_experts {}", label, c.num_experts_per_tok,
             c.num_experts);
    c.moe_intermediate_size =
        positive(required_field<std::int64_t>(j, "moe_intermediate_size", label),
                 "moe_intermediate_size", label);
    c.norm_topk_prob = optional_field<bool>(j, "norm_topk_prob", label).value_or(false);
    c.decoder_sparse_step =
        positive(optional_field<std::int64_t>(j, "decoder_sparse_step", label).value_or(1),
                 "decoder_sparse_step", label);
    c.mlp_only_layers = optional_field<std::vector<std::int64_t>>(j, "mlp_only_layers", label)
                            .value_or(std::vector<std::int64_t>{});
  }
  return c;
}

ModelConfig ModelConfig::load(const std::filesystem::path& model_dir) {
  const auto path = model_dir / "config.json";
  return from_json(read_json_file(path), path.string());
}

}  // namespace pq::model
