#include "model/inspect_report.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <map>
#include <utility>
#include <vector>

namespace pq::model {

using json = nlohmann::ordered_json;

namespace {

json optional_json(const auto& value) {
  return value ? json(*value) : json(nullptr);
}

// "14488832" -> "14,488,832" (parameter counts are never negative).
std::string group_digits(std::int64_t value) {
  const std::string digits = std::to_string(value);
  std::string out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out.push_back(',');
    out.push_back(digits[i]);
  }
  return out;
}

struct RoleSummary {
  std::int64_t count = 0;
  std::int64_t params = 0;
};

// A role as the text report lists it: the MTP head's and the vision tower's tensors apart from the
// text model's ("mtp q_proj").
std::string role_label(std::string_view role, Component component) {
  if (component == Component::kText) return std::string(role);
  return fmt::format("{} {}", component_name(component), role);
}

// Parameters of each component the checkpoint has, in kComponents order.
std::vector<std::pair<Component, std::int64_t>> params_by_component(const ModelSpec& spec) {
  std::vector<std::pair<Component, std::int64_t>> params;
  for (const Component component : kComponents) {
    std::int64_t sum = 0;
    bool present = false;
    for (const Linear& linear : spec.linears) {
      if (linear.component != component) continue;
      sum += linear.numel();
      present = true;
    }
    for (const OtherTensor& tensor : spec.others) {
      if (tensor.component != component) continue;
      sum += tensor.numel();
      present = true;
    }
    if (present) params.emplace_back(component, sum);
  }
  return params;
}

}  // namespace

nlohmann::ordered_json inspect_json(const ModelSpec& spec) {
  json components = json::object();
  for (const auto& [component, params] : params_by_component(spec)) {
    components[component_name(component)] = params;
  }
  json linears = json::array();
  for (const Linear& linear : spec.linears) {
    json slice = nullptr;
    if (linear.slice) {
      slice = {{"index", linear.slice->index},
               {"row_begin", linear.slice->row_begin},
               {"row_end", linear.slice->row_end}};
    }
    linears.push_back({
        {"name", linear.name},
        {"weight", linear.weight_tensor},
        {"slice", slice},
        {"shape", {linear.out_features, linear.in_features}},
        {"dtype", io::dtype_name(linear.dtype)},
        {"role", linear.role},
        {"layer", optional_json(linear.layer)},
        {"expert", optional_json(linear.expert)},
        {"group", optional_json(linear.group)},
        {"candidate", linear.is_candidate},
        {"bias", optional_json(linear.bias_tensor)},
        {"fp8_source_scale", optional_json(linear.scale_tensor)},
        {"component", component_name(linear.component)},
    });
  }
  json groups = json::array();
  for (const SiblingGroup& group : spec.groups) {
    json members = json::array();
    for (std::size_t index : group.members) members.push_back(spec.linears[index].name);
    groups.push_back({{"name", group.name}, {"members", members}});
  }
  json passthrough = json::array();
  for (const OtherTensor& tensor : spec.others) {
    passthrough.push_back({{"name", tensor.name},
                           {"shape", tensor.shape},
                           {"dtype", io::dtype_name(tensor.dtype)},
                           {"role", tensor.role}});
  }
  for (const Linear& linear : spec.linears) {
    if (linear.is_candidate) continue;
    passthrough.push_back({{"name", linear.weight_tensor},
                           {"shape", {linear.out_features, linear.in_features}},
                           {"dtype", io::dtype_name(linear.dtype)},
                           {"role", linear.role}});
  }
  return {
      {"schema_version", kInspectSchemaVersion},
      {"architecture", spec.architecture},
      {"family", spec.family},
      {"tie_word_embeddings", spec.tie_word_embeddings},
      {"num_params", spec.num_params()},
      {"num_tensors", spec.num_tensors()},
      {"num_linears", spec.linears.size()},
      {"num_candidate_linears", spec.num_candidate_linears()},
      {"num_sibling_groups", spec.groups.size()},
      {"params_by_role", spec.params_by_role()},
      {"params_by_dtype", spec.params_by_dtype()},
      {"params_by_component", components},
      {"linears", linears},
      {"sibling_groups", groups},
      {"passthrough", passthrough},
  };
}

std::string inspect_text(const ModelSpec& spec) {
  // Parameters per role, split into what the quantizer may change and what stays as stored.
  std::map<std::string, RoleSummary> candidate_roles;
  std::map<std::string, RoleSummary> passthrough_roles;
  for (const Linear& linear : spec.linears) {
    RoleSummary& summary =
        (linear.is_candidate ? candidate_roles
                             : passthrough_roles)[role_label(linear.role, linear.component)];
    ++summary.count;
    summary.params += linear.numel();
  }
  for (const OtherTensor& tensor : spec.others) {
    RoleSummary& summary = passthrough_roles[role_label(tensor.role, tensor.component)];
    ++summary.count;
    summary.params += tensor.numel();
  }
  const auto sum_params = [](const std::map<std::string, RoleSummary>& roles) {
    std::int64_t params = 0;
    for (const auto& [role, summary] : roles) params += summary.params;
    return params;
  };
  const std::int64_t total = spec.num_params();
  const auto percent = [total](std::int64_t params) {
    return total > 0 ? 100.0 * static_cast<double>(params) / static_cast<double>(total) : 0.0;
  };

  std::string out;
  const auto row = [&out](std::string_view label, std::string_view count, std::string_view params) {
    fmt::format_to(std::back_inserter(out), "  {:<32}{:>8}{:>16}\n", label, count, params);
  };
  fmt::format_to(std::back_inserter(out), "architecture  {} (profile {}), {} embeddings\n",
                 spec.architecture, spec.family, spec.tie_word_embeddings ? "tied" : "untied");
  fmt::format_to(std::back_inserter(out), "parameters    {} in {} tensors\n", group_digits(total),
                 spec.num_tensors());
  for (const auto& [dtype, params] : spec.params_by_dtype()) {
    row(dtype, "", group_digits(params));
  }
  const auto components = params_by_component(spec);
  if (components.size() > 1) {
    std::vector<std::string> parts;
    for (const auto& [component, params] : components) {
      parts.push_back(fmt::format("{} {}", component_name(component), group_digits(params)));
    }
    fmt::format_to(std::back_inserter(out), "components    {}\n", fmt::join(parts, ", "));
  }
  const std::int64_t candidate_params = sum_params(candidate_roles);
  fmt::format_to(std::back_inserter(out),
                 "candidates    {} Linears in {} sibling groups, {} parameters ({:.1f}%)\n",
                 spec.num_candidate_linears(), spec.groups.size(), group_digits(candidate_params),
                 percent(candidate_params));
  row("role", "count", "parameters");
  for (const auto& [role, summary] : candidate_roles) {
    row(role, std::to_string(summary.count), group_digits(summary.params));
  }
  std::int64_t fp8_linears = 0;
  std::int64_t fp8_params = 0;
  for (const Linear& linear : spec.linears) {
    if (!linear.is_fp8_source()) continue;
    ++fp8_linears;
    fp8_params += linear.numel();
  }
  if (fp8_linears > 0) {
    fmt::format_to(std::back_inserter(out),
                   "fp8 source    {} Linears stored as 128x128 block-scaled FP8, {} parameters "
                   "(FP8_SOURCE keeps their bytes)\n",
                   fp8_linears, group_digits(fp8_params));
  }
  const std::int64_t passthrough_params = sum_params(passthrough_roles);
  fmt::format_to(std::back_inserter(out),
                 "passthrough   {} tensors kept as stored, {} parameters ({:.1f}%)\n",
                 spec.passthrough_tensors().size(), group_digits(passthrough_params),
                 percent(passthrough_params));
  row("role", "count", "parameters");
  for (const auto& [role, summary] : passthrough_roles) {
    row(role, std::to_string(summary.count), group_digits(summary.params));
  }
  return out;
}

}  // namespace pq::model
