#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "model/config.h"
#include "runtime/weights.h"

namespace pq::runtime::synthetic {

// A randomly initialized model small enough for finite differences: its config.json as JSON,
// the parsed config, and every tensor the architecture needs (named as in Hugging Face).
struct TinyModel {
  nlohmann::json config_json;
  model::ModelConfig config;
  InMemoryWeightSource weights;
};

// config.json of a tiny model of `architecture` (LlamaForCausalLM, MistralForCausalLM,
// Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM); `overrides` are merged on top.
nlohmann::json tiny_config(const std::string& architecture, const nlohmann::json& overrides = {});

// Random weights for the config: Linears ~ N(0, weight_std^2), norms ~ 1 + N(0, 0.1^2).
TinyModel make_tiny_model(const nlohmann::json& config_json, std::uint32_t seed,
                          float weight_std = 0.3f);

}  // namespace pq::runtime::synthetic
