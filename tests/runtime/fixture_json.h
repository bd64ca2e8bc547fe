#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "model/config.h"
#include "runtime/model.h"
#include "runtime/weights.h"
#include "support/test_support.h"

// Reading the float64 reference fixtures of ../shared/fixtures (their "about" keys describe the
// fields) and the forward checks every family's fixture test makes, shared by those tests.
namespace pq::runtime {

// Little-endian float32 values written as base64 (the fixtures' gradient probe directions V).
inline std::vector<float> decode_base64_f32(const std::string& text) {
  std::vector<std::uint8_t> bytes;
  std::uint32_t buffer = 0;
  int bits = 0;
  for (const char ch : text) {
    int value;
    if (ch >= 'A' && ch <= 'Z') {
      value = ch - 'A';
    } else if (ch >= 'a' && ch <= 'z') {
      value = ch - 'a' + 26;
    } else if (ch >= '0' && ch <= '9') {
      value = ch - '0' + 52;
    } else if (ch == '+') {
      value = 62;
    } else if (ch == '/') {
      value = 63;
    } else {
      continue;  // '=' padding
    }
    buffer = (buffer << 6) | static_cast<std::uint32_t>(value);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      bytes.push_back(static_cast<std::uint8_t>((buffer >> bits) & 0xff));
    }
  }
  std::vector<float> values(bytes.size() / 4);
  std::memcpy(values.data(), bytes.data(), values.size() * 4);
  return values;
}

// max|a - ref| / max|ref| over rows [rows, width] of `actual` against reference[t][j].
inline double relative_max_error(const float* actual, const nlohmann::json& reference) {
  double diff = 0.0, scale = 0.0;
  const std::size_t width = reference[0].size();
  for (std::size_t t = 0; t < reference.size(); ++t) {
    for (std::size_t j = 0; j < width; ++j) {
      const double ref = reference[t][j].get<double>();
      scale = std::max(scale, std::abs(ref));
      diff = std::max(diff, std::abs(actual[t * width + j] - ref));
    }
  }
  return diff / scale;
}

// A family's tiny checkpoint under ../shared/models with its fixture's token batch.
struct Fixture {
  std::string model;
  nlohmann::json json;
  model::ModelConfig config;
  io::Checkpoint checkpoint;
  std::vector<Sequence> batch;

  explicit Fixture(const std::string& name)
      : model(name),
        json(nlohmann::json::parse(
            std::ifstream(test::shared_dir() / "fixtures" / (name + "-logits.json")))),
        config(model::ModelConfig::load(test::shared_dir() / "models" / name)),
        checkpoint(io::Checkpoint::open(test::shared_dir() / "models" / name)) {
    for (const auto& ids : json["token_ids"]) {
      batch.push_back({ids.get<std::vector<std::int32_t>>(), {}});
    }
  }
};

// The logits of the batch (both sequences in one pass, so the packed layout is exercised) and
// of every layer's residual stream, as max error over max magnitude.
struct ForwardErrors {
  double logits = 0.0;
  double residuals = 0.0;
};

// The residual stream after the last decoder layer for the pass's batch, [rows, hidden];
// `after_layer`, when given, sees it after every layer.
inline std::vector<float> body_output(
    Model& model, const Model::Pass& pass, const model::ModelConfig& config,
    const std::function<void(std::int64_t layer, const float* x)>& after_layer = {}) {
  const std::int64_t hidden = config.hidden_size;
  std::vector<float> x(Model::rows(pass) * hidden), next(x.size());
  model.embed(pass, x.data());
  for (std::int64_t l = 0; l < config.num_hidden_layers; ++l) {
    model.forward_layer(l, pass, x.data(), next.data(), nullptr);
    x.swap(next);
    if (after_layer) after_layer(l, x.data());
  }
  return x;
}

inline ForwardErrors forward_errors(const Fixture& f, ComputeType compute) {
  const CheckpointWeightSource weights(f.checkpoint);
  Model model(f.config, weights, {.compute = compute});
  ForwardErrors errors;
  model.forward(f.batch, [&](std::int64_t s, const float* logits, std::int64_t) {
    errors.logits = std::max(errors.logits, relative_max_error(logits, f.json["logits"][s]));
  });
  const auto pass = model.begin_pass(f.batch);
  const std::int64_t hidden = f.config.hidden_size;
  body_output(model, *pass, f.config, [&](std::int64_t l, const float* x) {
    std::int64_t offset = 0;
    for (std::size_t s = 0; s < f.batch.size(); ++s) {
      errors.residuals =
          std::max(errors.residuals,
                   relative_max_error(x + offset * hidden, f.json["residual_after_layer"][s][l]));
      offset += static_cast<std::int64_t>(f.batch[s].tokens.size());
    }
  });
  return errors;
}

// Records every MoE layer's routing of a forward pass, in token order: the router's
// probabilities (or scores) over all experts, the chosen experts and their weights.
class RoutingRecorder final : public LinearObserver {
 public:
  struct Layer {
    std::vector<float> probabilities;
    std::vector<std::int32_t> experts;
    std::vector<float> weights;
  };
  void on_linear(const LinearActivity&) override {}
  void on_routing(const RoutingActivity& r) override {
    Layer& layer = layers[r.layer];
    layer.probabilities.insert(layer.probabilities.end(), r.probabilities,
                               r.probabilities + r.tokens * r.num_experts);
    layer.experts.insert(layer.experts.end(), r.experts, r.experts + r.tokens * r.top_k);
    layer.weights.insert(layer.weights.end(), r.weights, r.weights + r.tokens * r.top_k);
  }
  std::map<std::int64_t, Layer> layers;
};

// Decodes `tokens` with Model::extend in chunks of 5, 1, 1, 4 and the rest (a prefill, single
// steps, a short chunk) and returns the largest |cached - full| logit over the largest |full|
// one, `full` being one forward pass: any chunking must give the full pass's logits.
inline double cached_decoding_error(Model& model, std::span<const std::int32_t> tokens) {
  if (tokens.size() <= 11) throw std::runtime_error("cached_decoding_error: need 12 tokens");
  const std::vector<float> full = model.logits(tokens);
  DecodeState state;
  std::vector<float> cached;
  std::size_t begin = 0;
  for (const std::size_t length :
       {std::size_t{5}, std::size_t{1}, std::size_t{1}, std::size_t{4}, tokens.size() - 11}) {
    const std::vector<float> logits = model.extend(state, tokens.subspan(begin, length));
    cached.insert(cached.end(), logits.begin(), logits.end());
    begin += length;
  }
  if (cached.size() != full.size()) throw std::runtime_error("cached_decoding_error: sizes differ");
  double diff = 0.0;
  double scale = 0.0;
  for (std::size_t i = 0; i < full.size(); ++i) {
    diff = std::max(diff, static_cast<double>(std::abs(cached[i] - full[i])));
    scale = std::max(scale, static_cast<double>(std::abs(full[i])));
  }
  return diff / scale;
}

}  // namespace pq::runtime
