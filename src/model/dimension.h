#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "model/config.h"

namespace pq::model {

// Evaluates a dimension expression from an architecture profile against a config, e.g.
// "num_attention_heads*head_dim" or "2*moe_intermediate_size". Grammar: a sum ('+') of products
// ('*') of non-negative integers and config field names. Names resolve to the parsed ModelConfig
// fields first, by their config.json keys (so defaults such as head_dim = hidden_size /
// num_attention_heads apply; the vision tower's as "vision_config.hidden_size"; the switch
// attn_output_gate as 1 or 0), then to integer fields of the raw config.json (so a new family can
// use a field ModelConfig does not parse). Throws pq::Error naming `label` for an unknown name or
// a malformed expression.
std::int64_t evaluate_dimension(std::string_view expression, const ModelConfig& config,
                                const std::string& label);

// "num_attention_heads*head_dim=256": the expression with its value, for error messages.
std::string explain_dimension(std::string_view expression, const ModelConfig& config,
                              const std::string& label);

}  // namespace pq::model
