#include "model/dimension.h"

#include <fmt/format.h>

#include <cctype>
#include <optional>

#include "common/error.h"

namespace pq::model {

namespace {

std::optional<std::int64_t> config_field(const ModelConfig& config, std::string_view name) {
  if (name == "hidden_size") return config.hidden_size;
  if (name == "intermediate_size") return config.intermediate_size;
  if (name == "num_hidden_layers") return config.num_hidden_layers;
  if (name == "num_attention_heads") return config.num_attention_heads;
  if (name == "num_key_value_heads") return config.num_key_value_heads;
  if (name == "head_dim") return config.head_dim;
  if (name == "vocab_size") return config.vocab_size;
  if (name == "num_experts") return config.num_experts;
  if (name == "moe_intermediate_size") return config.moe_intermediate_size;
  if (name == "shared_expert_intermediate_size") return config.shared_expert_intermediate_size;
  if (name == "attn_output_gate") return config.attn_output_gate ? 1 : 0;
  if (const auto& mla = config.mla) {
    if (name == "q_lora_rank") return mla->q_lora_rank;
    if (name == "kv_lora_rank") return mla->kv_lora_rank;
    if (name == "qk_nope_head_dim") return mla->qk_nope_head_dim;
    if (name == "qk_rope_head_dim") return mla->qk_rope_head_dim;
    if (name == "v_head_dim") return mla->v_head_dim;
  }
  if (const auto& linear = config.linear_attention) {
    if (name == "linear_conv_kernel_dim") return linear->conv_kernel_dim;
    if (name == "linear_key_head_dim") return linear->key_head_dim;
    if (name == "linear_value_head_dim") return linear->value_head_dim;
    if (name == "linear_num_key_heads") return linear->num_key_heads;
    if (name == "linear_num_value_heads") return linear->num_value_heads;
  }
  if (const auto& gemma4 = config.gemma4) {
    if (name == "global_head_dim") return gemma4->global_head_dim;
    if (name == "full_attention_key_value_heads") return gemma4->full_key_value_heads;
  }
  if (const auto& vision = config.vision) {
    if (name == "vision_config.hidden_size") return vision->hidden_size;
    if (name == "vision_config.intermediate_size") return vision->intermediate_size;
    if (name == "vision_config.out_hidden_size") return vision->out_hidden_size;
    if (name == "vision_config.in_channels") return vision->in_channels;
    if (name == "vision_config.patch_size") return vision->patch_size;
    if (name == "vision_config.temporal_patch_size") return vision->temporal_patch_size;
    if (name == "vision_config.spatial_merge_size") return vision->spatial_merge_size;
    if (name == "vision_config.num_position_embeddings") return vision->num_position_embeddings;
    if (name == "vision_config.head_dim") return vision->head_dim;
    if (name == "vision_config.num_attention_heads") return vision->num_attention_heads;
    if (name == "vision_config.num_key_value_heads") return vision->num_key_value_heads;
  }
  const std::string key(name);
  if (config.raw.is_object() && config.raw.contains(key) && config.raw[key].is_number_integer()) {
    return config.raw[key].get<std::int64_t>();
  }
  return std::nullopt;
}

// Recursive-descent evaluation over the tiny grammar documented in dimension.h.
class DimensionParser {
 public:
  DimensionParser(std::string_view text, const ModelConfig& config, const std::string& label)
      : text_(text), config_(config), label_(label) {}

  std::int64_t parse() {
    const std::int64_t value = sum();
    skip_space();
    if (pos_ != text_.size()) malformed("unexpected character");
    return value;
  }

 private:
  std::int64_t sum() {
    std::int64_t value = product();
    while (consume('+')) value = checked(value, product(), '+');
    return value;
  }

  std::int64_t product() {
    std::int64_t value = factor();
    while (consume('*')) value = checked(value, factor(), '*');
    return value;
  }

  std::int64_t factor() {
    skip_space();
    const std::size_t begin = pos_;
    if (pos_ < text_.size() && std::isdigit(static_cast<unsigned char>(text_[pos_]))) {
      std::int64_t value = 0;
      while (pos_ < text_.size() && std::isdigit(static_cast<unsigned char>(text_[pos_]))) {
        value = checked(value, 10, '*');
        value = checked(value, text_[pos_++] - '0', '+');
      }
      return value;
    }
    while (pos_ < text_.size() && (std::isalnum(static_cast<unsigned char>(text_[pos_])) ||
                                   text_[pos_] == '_' || text_[pos_] == '.')) {
      ++pos_;
    }
    if (pos_ == begin) malformed("expected a number or a config field");
    const std::string_view name = text_.substr(begin, pos_ - begin);
    const auto value = config_field(config_, name);
    PQ_CHECK(value.has_value(), "{}: config has no integer field \"{}\" (needed for \"{}\")",
             label_, name, text_);
    return *value;
  }

  bool consume(char c) {
    skip_space();
    if (pos_ < text_.size() && text_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }

  void skip_space() {
    while (pos_ < text_.size() && text_[pos_] == ' ') ++pos_;
  }

  std::int64_t checked(std::int64_t a, std::int64_t b, char op) {
    std::int64_t result = 0;
    const bool overflow =
        op == '+' ? __builtin_add_overflow(a, b, &result) : __builtin_mul_overflow(a, b, &result);
    PQ_CHECK(!overflow, "{}: dimension \"{}\" overflows", label_, text_);
    return result;
  }

  [[noreturn]] void malformed(const char* what) {
    fail("{}: malformed dimension expression \"{}\" at offset {}: {}", label_, text_, pos_, what);
  }

  std::string_view text_;
  const ModelConfig& config_;
  const std::string& label_;
  std::size_t pos_ = 0;
};

}  // namespace

std::int64_t evaluate_dimension(std::string_view expression, const ModelConfig& config,
                                const std::string& label) {
  return DimensionParser(expression, config, label).parse();
}

std::string explain_dimension(std::string_view expression, const ModelConfig& config,
                              const std::string& label) {
  const std::int64_t value = evaluate_dimension(expression, config, label);
  const bool is_literal = expression.find_first_not_of("0123456789") == std::string_view::npos;
  return is_literal ? std::string(expression) : fmt::format("{}={}", expression, value);
}

}  // namespace pq::model
