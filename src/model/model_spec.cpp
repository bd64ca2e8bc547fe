#include "model/model_spec.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <map>
#include <numeric>
#include <set>
#include <unordered_map>

#include "common/error.h"
#include "io/fp8_block.h"
#include "io/safetensors.h"
#include "model/dimension.h"

namespace pq::model {

namespace {

constexpr std::string_view kLayerPlaceholder = "{layer}";
constexpr std::string_view kExpertPlaceholder = "{expert}";

// Layer value handed to a rule's predicates for rules outside the layer stack.
constexpr std::int64_t kNoLayer = -1;

bool has_placeholder(std::string_view pattern, std::string_view placeholder) {
  return pattern.find(placeholder) != std::string_view::npos;
}

std::string expand(std::string_view pattern, std::optional<std::int64_t> layer,
                   std::optional<std::int64_t> expert) {
  std::string out;
  out.reserve(pattern.size() + 8);
  std::size_t pos = 0;
  while (pos < pattern.size()) {
    if (layer && pattern.substr(pos).starts_with(kLayerPlaceholder)) {
      out += std::to_string(*layer);
      pos += kLayerPlaceholder.size();
    } else if (expert && pattern.substr(pos).starts_with(kExpertPlaceholder)) {
      out += std::to_string(*expert);
      pos += kExpertPlaceholder.size();
    } else {
      out += pattern[pos++];
    }
  }
  return out;
}

// Expands a profile against a config and claims each expected tensor from the checkpoint list.
class SpecBuilder {
 public:
  SpecBuilder(const ModelConfig& config, std::span<const TensorDesc> tensors, std::string label,
              const SpecOptions& options)
      : config_(config), label_(std::move(label)), options_(options) {
    for (const TensorDesc& tensor : tensors) {
      PQ_CHECK(by_name_.emplace(tensor.name, &tensor).second, "{}: tensor \"{}\" appears twice",
               label_, tensor.name);
    }
  }

  ModelSpec build(const ArchitectureProfile& profile) {
    spec_.architecture = config_.architecture;
    spec_.family = std::string(profile.family);
    spec_.tie_word_embeddings = config_.tie_word_embeddings;

    for (const Component component : kComponents) add_component(profile, component);
    check_packed_coverage();
    reject_unclaimed();
    return std::move(spec_);
  }

 private:
  // The rules of one component: its single tensors, its layer stack layer by layer, then its
  // Linears outside the stack (lm_head, mtp.fc, the vision merger).
  void add_component(const ArchitectureProfile& profile, Component component) {
    // DeepSeek-V3 names its MTP layer k "model.layers.<num_hidden_layers + k>"
    // (ArchitectureProfile::mtp_layer_offset); the Linear keeps k as its layer.
    name_offset_ = component == Component::kMtp && !profile.mtp_layer_offset.empty()
                       ? evaluate_dimension(profile.mtp_layer_offset, config_, label_)
                       : 0;
    for (const TensorRule& rule : profile.tensors) {
      if (rule.component == component && !has_placeholder(rule.name, kLayerPlaceholder) &&
          rule.present(config_, kNoLayer)) {
        add_other(rule, std::nullopt);
      }
    }
    for (std::int64_t layer = 0; layer < component_layers(config_, component); ++layer) {
      for (const TensorRule& rule : profile.tensors) {
        if (rule.component == component && has_placeholder(rule.name, kLayerPlaceholder) &&
            rule.present(config_, layer)) {
          add_other(rule, layer);
        }
      }
      add_layer_linears(profile, component, layer);
    }
    for (const LinearRule& rule : profile.linears) {
      if (rule.component == component && !has_placeholder(rule.module, kLayerPlaceholder) &&
          rule.present(config_, kNoLayer)) {
        add_linear(rule, std::nullopt, std::nullopt);
      }
    }
  }

  // Linears of one layer in profile order; routed experts expert by expert (gate, up, down of
  // expert 0, then expert 1, ...), which is how checkpoints list them.
  void add_layer_linears(const ArchitectureProfile& profile, Component component,
                         std::int64_t layer) {
    const auto in_layer = [&](const LinearRule& rule) {
      return rule.component == component && has_placeholder(rule.module, kLayerPlaceholder) &&
             rule.present(config_, layer);
    };
    std::vector<const LinearRule*> expert_rules;
    for (const LinearRule& rule : profile.linears) {
      if (in_layer(rule) && has_placeholder(rule.module, kExpertPlaceholder)) {
        expert_rules.push_back(&rule);
      }
    }
    bool experts_done = false;
    for (const LinearRule& rule : profile.linears) {
      if (!in_layer(rule)) continue;
      if (!has_placeholder(rule.module, kExpertPlaceholder)) {
        add_linear(rule, layer, std::nullopt);
      } else if (!experts_done) {
        experts_done = true;
        for (std::int64_t expert = 0; expert < config_.num_experts; ++expert) {
          for (const LinearRule* expert_rule : expert_rules) {
            add_linear(*expert_rule, layer, expert);
          }
        }
      }
    }
  }

  // The layer number a pattern's "{layer}" expands to.
  std::optional<std::int64_t> named(std::optional<std::int64_t> layer) const {
    return layer ? std::optional(*layer + name_offset_) : std::nullopt;
  }

  void add_other(const TensorRule& rule, std::optional<std::int64_t> layer) {
    const std::string name = expand(rule.name, named(layer), std::nullopt);
    std::vector<std::int64_t> shape;
    for (std::string_view dim : rule.shape) shape.push_back(dimension(dim, name));
    const TensorDesc& tensor = claim(name, shape, rule.shape);
    spec_.others.push_back(
        {name, std::string(rule.role), tensor.shape, tensor.dtype, layer, rule.component});
  }

  void add_linear(const LinearRule& rule, std::optional<std::int64_t> layer,
                  std::optional<std::int64_t> expert) {
    Linear linear;
    linear.name = expand(rule.module, named(layer), expert);
    linear.serving_name = rule.serving_module.empty()
                              ? linear.name
                              : expand(rule.serving_module, named(layer), expert);
    if (!rule.serving_alias.empty()) {
      linear.serving_alias = expand(rule.serving_alias, named(layer), expert);
    }
    linear.role = std::string(rule.role);
    // A Linear the profile packs may be stored per expert instead (LinearRule::packed).
    const bool packed = rule.packed && !by_name_.contains(linear.name + ".weight");
    linear.weight_tensor =
        packed ? expand(rule.packed->tensor, named(layer), std::nullopt) : linear.name + ".weight";
    linear.out_features = dimension(rule.out_features, linear.weight_tensor);
    linear.in_features = dimension(rule.in_features, linear.weight_tensor);
    const TensorDesc& weight =
        packed ? claim_packed(rule, linear, expert)
               : claim(linear.weight_tensor, {linear.out_features, linear.in_features},
                       {rule.out_features, rule.in_features});
    if (weight.dtype == io::DType::F8_E4M3 && config_.fp8_block_weights) {
      PQ_CHECK(!packed, "{}: tensor \"{}\" packs FP8 experts; only per-expert FP8 weights are read",
               label_, weight.name);
      linear.scale_tensor = claim_block_scale(linear);
      linear.scale_dtype = by_name_.at(*linear.scale_tensor)->dtype;
    } else {
      PQ_CHECK(io::dtype_is_float(weight.dtype) && weight.dtype != io::DType::F8_E4M3 &&
                   weight.dtype != io::DType::F8_E5M2,
               "{}: tensor \"{}\" has dtype {}; a Linear weight must be unquantized floating point "
               "or block-scaled FP8 (quantization_config quant_method \"fp8\")",
               label_, weight.name, io::dtype_name(weight.dtype));
    }
    linear.dtype = weight.dtype;
    linear.layer = layer;
    linear.expert = expert;
    linear.component = rule.component;
    linear.formats.assign(rule.formats.begin(), rule.formats.end());
    switch (rule.candidacy) {
      case Candidacy::kCandidate:
        linear.is_candidate = true;
        break;
      case Candidacy::kPassthrough:
        linear.is_candidate = false;
        break;
      case Candidacy::kOptIn:
        linear.is_candidate = options_.quantize_lm_head;
        break;
    }
    if (rule.has_bias(config_, layer.value_or(kNoLayer))) {
      const std::string bias_name = linear.name + ".bias";
      const TensorDesc& bias = claim(bias_name, {linear.out_features}, {rule.out_features});
      spec_.others.push_back({bias_name, "bias", bias.shape, bias.dtype, layer, rule.component});
      linear.bias_tensor = bias_name;
    }
    const std::size_t index = spec_.linears.size();
    if (!rule.group.empty()) {
      const std::string group_name = expand(rule.group, named(layer), expert);
      auto [it, inserted] = group_index_.emplace(group_name, spec_.groups.size());
      if (inserted) spec_.groups.push_back({group_name, {}});
      spec_.groups[it->second].members.push_back(index);
      linear.group = group_name;
    }
    spec_.linears.push_back(std::move(linear));
  }

  // Claims the "<weight>_scale_inv" of a block-scaled FP8 weight: [ceil(out/128), ceil(in/128)],
  // F32 or BF16 (io/fp8_block.h).
  std::string claim_block_scale(const Linear& linear) {
    const std::string name = io::fp8_block_scale_name(linear.weight_tensor);
    const auto it = by_name_.find(name);
    PQ_CHECK(it != by_name_.end(),
             "{}: missing tensor \"{}\" (the block scale of FP8 weight \"{}\")", label_, name,
             linear.weight_tensor);
    PQ_CHECK(claimed_.insert(name).second, "{}: tensor \"{}\" claimed twice by the {} profile",
             label_, name, config_.architecture);
    const TensorDesc& scale = *it->second;
    const auto blocks = [](std::int64_t n) {
      return (n + io::kFp8BlockSize - 1) / io::kFp8BlockSize;
    };
    const std::vector<std::int64_t> expected = {blocks(linear.out_features),
                                                blocks(linear.in_features)};
    PQ_CHECK(scale.shape == expected,
             "{}: tensor \"{}\" has shape [{}], expected [{}] (128x128 blocks of [{}, {}])", label_,
             name, fmt::join(scale.shape, ", "), fmt::join(expected, ", "), linear.out_features,
             linear.in_features);
    PQ_CHECK(scale.dtype == io::DType::F32 || scale.dtype == io::DType::BF16,
             "{}: tensor \"{}\" has dtype {}; a block scale must be F32 or BF16", label_, name,
             io::dtype_name(scale.dtype));
    return name;
  }

  // Claims the packed tensor once for all the Linears it holds and records linear's slice.
  const TensorDesc& claim_packed(const LinearRule& rule, Linear& linear,
                                 std::optional<std::int64_t> expert) {
    const PackedWeight& packed = *rule.packed;
    PQ_CHECK(expert.has_value(), "{}: profile rule \"{}\" packs a Linear that is not per expert",
             label_, rule.module);
    const std::int64_t rows = dimension(packed.rows, linear.weight_tensor);
    const std::int64_t offset = evaluate_dimension(packed.row_offset, config_, label_);
    PQ_CHECK(offset >= 0 && offset + linear.out_features <= rows,
             "{}: profile rule \"{}\" puts rows [{}, {}) outside the {} rows of \"{}\"", label_,
             rule.module, offset, offset + linear.out_features, rows, linear.weight_tensor);
    linear.slice = TensorSlice{*expert, offset, offset + linear.out_features};
    packed_sliced_[linear.weight_tensor] += linear.numel();
    if (!claimed_.contains(linear.weight_tensor)) {
      return claim(linear.weight_tensor, {config_.num_experts, rows, linear.in_features},
                   {"num_experts", packed.rows, rule.in_features});
    }
    return *by_name_.at(linear.weight_tensor);
  }

  std::int64_t dimension(std::string_view expression, const std::string& tensor) {
    const std::int64_t value = evaluate_dimension(expression, config_, label_);
    PQ_CHECK(value > 0, "{}: tensor \"{}\" would have dimension {} = {}; check config.json", label_,
             tensor, expression, value);
    return value;
  }

  const TensorDesc& claim(const std::string& name, const std::vector<std::int64_t>& shape,
                          const std::vector<std::string_view>& shape_expressions) {
    const auto it = by_name_.find(name);
    PQ_CHECK(it != by_name_.end(), "{}: missing tensor \"{}\" (required by {})", label_, name,
             config_.architecture);
    PQ_CHECK(claimed_.insert(name).second, "{}: tensor \"{}\" claimed twice by the {} profile",
             label_, name, config_.architecture);
    const TensorDesc& tensor = *it->second;
    if (tensor.shape != shape) {
      std::vector<std::string> explained;
      for (std::string_view dim : shape_expressions) {
        explained.push_back(explain_dimension(dim, config_, label_));
      }
      fail("{}: tensor \"{}\" has shape [{}], expected [{}] from config.json", label_, name,
           fmt::join(tensor.shape, ", "), fmt::join(explained, ", "));
    }
    return tensor;
  }

  // Guards the profile: the Linears sliced from a packed tensor must cover every element once.
  void check_packed_coverage() const {
    for (const auto& [name, sliced] : packed_sliced_) {
      const std::int64_t stored = by_name_.at(name)->numel();
      PQ_CHECK(sliced == stored,
               "{}: the {} profile slices {} of the {} elements of packed tensor \"{}\"", label_,
               config_.architecture, sliced, stored, name);
    }
  }

  void reject_unclaimed() const {
    std::vector<std::string_view> unclaimed;
    for (const auto& [name, tensor] : by_name_) {
      if (!claimed_.contains(name)) unclaimed.push_back(name);
    }
    if (unclaimed.empty()) return;
    fail("{}: unexpected tensor \"{}\" ({} tensor(s) not part of the {} layout)", label_,
         unclaimed.front(), unclaimed.size(), config_.architecture);
  }

  const ModelConfig& config_;
  std::string label_;
  SpecOptions options_;
  std::map<std::string, const TensorDesc*> by_name_;  // sorted: the first unexpected is stable
  std::set<std::string> claimed_;
  std::unordered_map<std::string, std::size_t> group_index_;
  std::map<std::string, std::int64_t> packed_sliced_;  // packed tensor -> elements sliced so far
  std::int64_t name_offset_ = 0;  // added to a layer's index in the names of its tensors
  ModelSpec spec_;
};

std::int64_t product(const std::vector<std::int64_t>& shape) {
  std::int64_t n = 1;
  for (std::int64_t d : shape) n *= d;
  return n;
}

std::int64_t block_scale_numel(const Linear& linear) {
  const auto blocks = [](std::int64_t n) {
    return (n + io::kFp8BlockSize - 1) / io::kFp8BlockSize;
  };
  return blocks(linear.out_features) * blocks(linear.in_features);
}

}  // namespace

std::int64_t TensorDesc::numel() const {
  return product(shape);
}
std::int64_t OtherTensor::numel() const {
  return product(shape);
}

bool Linear::allows(std::string_view format) const {
  // FP8_SOURCE keeps the source's FP8 bytes: only a Linear stored that way has them.
  if (format == "FP8_SOURCE" && !is_fp8_source()) return false;
  return formats.empty() || std::find(formats.begin(), formats.end(), format) != formats.end();
}

LayerKind Linear::layer_kind() const {
  if (expert) return LayerKind::kMoeExperts;
  if (role == "lm_head") return LayerKind::kLmHead;
  if (group) return LayerKind::kFusedLinear;
  return LayerKind::kLinear;
}

std::int64_t ModelSpec::num_params() const {
  std::int64_t total = 0;
  for (const Linear& linear : linears) {
    // The slices of a packed tensor cover it exactly (checked when building), so this counts
    // each stored element once.
    total += linear.numel();
    if (linear.scale_tensor) total += block_scale_numel(linear);
  }
  for (const OtherTensor& tensor : others) total += tensor.numel();
  return total;
}

std::size_t ModelSpec::num_tensors() const {
  std::set<std::string_view> weights;
  for (const Linear& linear : linears) {
    weights.insert(linear.weight_tensor);
    if (linear.scale_tensor) weights.insert(*linear.scale_tensor);
  }
  return weights.size() + others.size();
}

std::int64_t ModelSpec::num_candidate_linears() const {
  return std::count_if(linears.begin(), linears.end(),
                       [](const Linear& linear) { return linear.is_candidate; });
}

std::map<std::string, std::int64_t> ModelSpec::params_by_role() const {
  std::map<std::string, std::int64_t> by_role;
  for (const Linear& linear : linears) by_role[linear.role] += linear.numel();
  for (const OtherTensor& tensor : others) by_role[tensor.role] += tensor.numel();
  return by_role;
}

std::map<std::string, std::int64_t> ModelSpec::params_by_dtype() const {
  std::map<std::string, std::int64_t> by_dtype;
  for (const Linear& linear : linears) {
    by_dtype[std::string(io::dtype_name(linear.dtype))] += linear.numel();
    if (linear.scale_tensor) {
      by_dtype[std::string(io::dtype_name(linear.scale_dtype))] += block_scale_numel(linear);
    }
  }
  for (const OtherTensor& tensor : others) {
    by_dtype[std::string(io::dtype_name(tensor.dtype))] += tensor.numel();
  }
  return by_dtype;
}

std::vector<std::string> ModelSpec::passthrough_tensors() const {
  std::vector<std::string> names;
  for (const OtherTensor& tensor : others) names.push_back(tensor.name);
  std::set<std::string_view> listed;  // slices of one packed tensor share its name
  for (const Linear& linear : linears) {
    if (!linear.is_candidate && listed.insert(linear.weight_tensor).second) {
      names.push_back(linear.weight_tensor);
      if (linear.scale_tensor) names.push_back(*linear.scale_tensor);
    }
  }
  return names;
}

std::map<std::int64_t, std::string> ModelSpec::kv_cache_modules() const {
  std::map<std::int64_t, std::string> modules;
  constexpr std::string_view kQuery = ".self_attn.q_proj";
  for (const Linear& linear : linears) {
    if (linear.component != Component::kText || !linear.layer || linear.role != "q_proj" ||
        !linear.name.ends_with(kQuery)) {
      continue;
    }
    const std::string_view projection = ".q_proj";
    modules.emplace(*linear.layer, linear.name.substr(0, linear.name.size() - projection.size()));
  }
  return modules;
}

const Linear* ModelSpec::find_linear(std::string_view name) const {
  const auto it = std::find_if(linears.begin(), linears.end(),
                               [&](const Linear& linear) { return linear.name == name; });
  return it == linears.end() ? nullptr : &*it;
}

ModelSpec build_model_spec(const ArchitectureProfile& profile, const ModelConfig& config,
                           std::span<const TensorDesc> tensors, const std::string& label,
                           const SpecOptions& options) {
  return SpecBuilder(config, tensors, label, options).build(profile);
}

ModelSpec build_model_spec(const ModelConfig& config, std::span<const TensorDesc> tensors,
                           const std::string& label, const SpecOptions& options) {
  SpecBuilder builder(config, tensors, label, options);
  return builder.build(require_profile(config.architecture, label));
}

ModelSpec build_model_spec(const ModelConfig& config, const io::Checkpoint& checkpoint,
                           const SpecOptions& options) {
  std::vector<TensorDesc> tensors;
  tensors.reserve(checkpoint.tensor_names().size());
  for (const std::string& name : checkpoint.tensor_names()) {
    const io::TensorInfo& info = checkpoint.info(name);
    tensors.push_back({info.name, info.dtype, info.shape});
  }
  return build_model_spec(config, tensors, checkpoint.directory().string(), options);
}

ModelSpec load_model_spec(const std::filesystem::path& model_dir, const SpecOptions& options) {
  std::error_code ec;
  PQ_CHECK(std::filesystem::is_directory(model_dir, ec), "{}: no such model directory",
           model_dir.string());
  const ModelConfig config = ModelConfig::load(model_dir);
  const io::Checkpoint checkpoint = io::Checkpoint::open(model_dir);
  return build_model_spec(config, checkpoint, options);
}

std::vector<float> read_source_weight(const io::Checkpoint& checkpoint, const Linear& linear) {
  std::vector<std::int64_t> rows(static_cast<std::size_t>(linear.out_features));
  std::int64_t first_row = 0;
  if (linear.slice) {
    const std::vector<std::int64_t>& shape = checkpoint.info(linear.weight_tensor).shape;
    PQ_CHECK(shape.size() == 3 && shape[2] == linear.in_features,
             "{}: tensor {} is not [E, rows, {}]", linear.name, linear.weight_tensor,
             linear.in_features);
    first_row = linear.slice->index * shape[1] + linear.slice->row_begin;
  }
  std::iota(rows.begin(), rows.end(), first_row);
  std::vector<float> weight = io::decode_weight_rows(checkpoint, linear.weight_tensor, rows);
  io::require_finite(weight,
                     fmt::format("tensor {} (Linear {})", linear.weight_tensor, linear.name));
  return weight;
}

}  // namespace pq::model
