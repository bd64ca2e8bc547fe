// libFuzzer target: any byte string as config.json. It is parsed as ModelConfig::load parses the
// file (parse_json, then ModelConfig::from_json); an accepted config then goes through
// build_model_spec once per registered family profile, against the tensor list that profile
// expects for it (written here from the profile's rules, as a checkpoint made for the config would
// hold them), and through the checkpoint's own profile as `prismaquant inspect` does, with both of
// inspect's reports. The library must throw pq::Error or succeed; on success the spec must account
// for every tensor of the list exactly once (checked here, abort otherwise).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "common/error.h"
#include "common/json_reader.h"
#include "model/config.h"
#include "model/dimension.h"
#include "model/inspect_report.h"
#include "model/model_spec.h"
#include "model/profile.h"

namespace {

using pq::model::ModelConfig;
using pq::model::TensorDesc;

// Lists longer than this, or holding more elements, are not written out: the config then meets an
// empty checkpoint, which the builder must reject at its first tensor. A real checkpoint cannot
// come near the element bound: its safetensors files would hold petabytes.
constexpr std::size_t kMaxTensors = 4096;
constexpr std::int64_t kMaxElements = std::int64_t{1} << 40;

std::string expand(std::string_view pattern, std::int64_t layer, std::int64_t expert) {
  std::string out;
  for (std::size_t pos = 0; pos < pattern.size();) {
    if (pattern.substr(pos).starts_with("{layer}")) {
      out += std::to_string(layer);
      pos += 7;
    } else if (pattern.substr(pos).starts_with("{expert}")) {
      out += std::to_string(expert);
      pos += 8;
    } else {
      out += pattern[pos++];
    }
  }
  return out;
}

bool has(std::string_view pattern, std::string_view placeholder) {
  return pattern.find(placeholder) != std::string_view::npos;
}

// The tensors a checkpoint of `profile` holds for `config` (model/profile.h describes the rules),
// or nullopt when a dimension is not positive or the list would exceed kMaxTensors.
class ExpectedTensors {
 public:
  ExpectedTensors(const pq::model::ArchitectureProfile& profile, const ModelConfig& config)
      : profile_(profile), config_(config) {}

  std::optional<std::vector<TensorDesc>> build() {
    const auto per_layer = profile_.tensors.size() + 2 * profile_.linears.size();
    const auto experts = static_cast<std::size_t>(config_.num_experts) + 1;
    std::size_t layers = 0;
    for (const auto component : pq::model::kComponents) {
      layers += static_cast<std::size_t>(pq::model::component_layers(config_, component));
    }
    if (per_layer * experts * layers > kMaxTensors) return std::nullopt;
    for (const auto component : pq::model::kComponents) add_component(component);
    if (!valid_) return std::nullopt;
    return std::move(tensors_);
  }

 private:
  // "{layer}" runs over the layer stack of the rule's component.
  void add_component(pq::model::Component component) {
    for (const auto& rule : profile_.tensors) {
      if (rule.component == component && !has(rule.name, "{layer}") && rule.present(config_, -1)) {
        add_tensor(rule, -1);
      }
    }
    for (std::int64_t layer = 0; layer < pq::model::component_layers(config_, component); ++layer) {
      for (const auto& rule : profile_.tensors) {
        if (rule.component == component && has(rule.name, "{layer}") &&
            rule.present(config_, layer)) {
          add_tensor(rule, layer);
        }
      }
      for (const auto& rule : profile_.linears) {
        if (rule.component != component || !has(rule.module, "{layer}") ||
            !rule.present(config_, layer)) {
          continue;
        }
        if (!has(rule.module, "{expert}")) {
          add_linear(rule, layer, -1);
          continue;
        }
        for (std::int64_t expert = 0; expert < config_.num_experts; ++expert) {
          add_linear(rule, layer, expert);
        }
      }
    }
    for (const auto& rule : profile_.linears) {
      if (rule.component == component && !has(rule.module, "{layer}") &&
          rule.present(config_, -1)) {
        add_linear(rule, -1, -1);
      }
    }
  }

  std::int64_t dim(std::string_view expression) {
    const std::int64_t value = pq::model::evaluate_dimension(expression, config_, "expected");
    if (value <= 0) valid_ = false;
    return value;
  }

  void add(std::string name, std::vector<std::int64_t> shape) {
    std::int64_t numel = 1;
    for (const std::int64_t d : shape) {
      if (__builtin_mul_overflow(numel, d, &numel) || numel > kMaxElements) valid_ = false;
    }
    if (!valid_ || __builtin_add_overflow(elements_, numel, &elements_) ||
        elements_ > kMaxElements) {
      valid_ = false;
      return;
    }
    if (names_.insert(name).second) {
      tensors_.push_back({std::move(name), pq::io::DType::BF16, std::move(shape)});
    }
  }

  void add_tensor(const pq::model::TensorRule& rule, std::int64_t layer) {
    std::vector<std::int64_t> shape;
    for (const auto expression : rule.shape) shape.push_back(dim(expression));
    add(expand(rule.name, layer, -1), std::move(shape));
  }

  void add_linear(const pq::model::LinearRule& rule, std::int64_t layer, std::int64_t expert) {
    const std::string module = expand(rule.module, layer, expert);
    const std::int64_t out = dim(rule.out_features);
    const std::int64_t in = dim(rule.in_features);
    if (rule.packed) {
      add(expand(rule.packed->tensor, layer, -1),
          {config_.num_experts, dim(rule.packed->rows), in});
    } else {
      add(module + ".weight", {out, in});
    }
    if (rule.has_bias(config_, layer)) add(module + ".bias", {out});
  }

  const pq::model::ArchitectureProfile& profile_;
  const ModelConfig& config_;
  std::vector<TensorDesc> tensors_;
  std::set<std::string> names_;
  std::int64_t elements_ = 0;
  bool valid_ = true;
};

void check_spec(const pq::model::ModelSpec& spec, const std::vector<TensorDesc>& tensors) {
  std::int64_t params = 0;
  for (const TensorDesc& tensor : tensors) params += tensor.numel();
  if (spec.num_tensors() != tensors.size() || spec.num_params() != params) std::abort();
  for (const auto& linear : spec.linears) {
    if (linear.out_features <= 0 || linear.in_features <= 0) std::abort();
  }
  std::vector<int> grouped(spec.linears.size(), 0);
  for (const auto& group : spec.groups) {
    for (const std::size_t member : group.members) {
      if (member >= spec.linears.size() || ++grouped[member] > 1) std::abort();
    }
  }
  const std::string text = pq::model::inspect_text(spec);
  const std::string json = pq::model::inspect_json(spec).dump();
  if (text.empty() || json.empty()) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const std::string label = "fuzz/config.json";
  std::optional<ModelConfig> config;
  try {
    config = ModelConfig::from_json(pq::parse_json(text, label), label);
  } catch (const pq::Error&) {
    return 0;  // rejecting malformed input with a pq::Error is the expected outcome
  }
  if (config->hidden_size <= 0 || config->num_hidden_layers <= 0 ||
      config->num_attention_heads <= 0 || config->num_key_value_heads <= 0 ||
      config->head_dim <= 0 || config->vocab_size <= 0 ||
      config->num_attention_heads % config->num_key_value_heads != 0 ||
      config->num_experts_per_tok > config->num_experts || !(config->rms_norm_eps >= 0.0) ||
      !(config->rms_norm_eps <= 1.0) || !(config->rope_theta > 0.0) ||
      (config->rope_scaling.type != "default" && !(config->rope_scaling.factor > 0.0))) {
    std::abort();
  }
  for (const pq::model::ArchitectureProfile* profile : pq::model::all_profiles()) {
    try {
      const auto tensors = ExpectedTensors(*profile, *config).build();
      const auto checkpoint = tensors.value_or(std::vector<TensorDesc>{});
      try {
        const auto spec = pq::model::build_model_spec(*profile, *config, checkpoint, label);
        check_spec(spec, checkpoint);
      } catch (const pq::Error&) {
        // A checkpoint with exactly the expected tensors must be accepted.
        if (tensors) std::abort();
      }
      if (pq::model::find_profile(config->architecture) == profile) {
        check_spec(pq::model::build_model_spec(*config, checkpoint, label), checkpoint);
      }
    } catch (const pq::Error&) {
      // A dimension expression that overflows, or an empty checkpoint.
    }
  }
  return 0;
}
