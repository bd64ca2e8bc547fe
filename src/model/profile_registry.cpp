#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <array>

#include "common/error.h"
#include "common/json_reader.h"
#include "model/profile.h"
#include "model/profiles/profiles.h"

namespace pq::model {

std::string_view component_name(Component component) {
  switch (component) {
    case Component::kText:
      return "text";
    case Component::kMtp:
      return "mtp";
    case Component::kVision:
      return "vision";
  }
  return "text";
}

std::int64_t component_layers(const ModelConfig& config, Component component) {
  switch (component) {
    case Component::kText:
      return config.num_hidden_layers;
    case Component::kMtp:
      return config.mtp_num_hidden_layers;
    case Component::kVision:
      return config.vision ? config.vision->depth : 0;
  }
  return 0;
}

std::span<const ArchitectureProfile* const> all_profiles() {
  static const std::array<const ArchitectureProfile*, 11> profiles = {
      &profiles::llama(),       &profiles::mistral(),    &profiles::qwen2(),
      &profiles::qwen3(),       &profiles::qwen3_moe(),  &profiles::qwen3_5(),
      &profiles::qwen3_5_moe(), &profiles::qwen3_next(), &profiles::minimax_m2(),
      &profiles::deepseek_v3(), &profiles::gemma4(),
  };
  return profiles;
}

std::vector<std::string> supported_architectures() {
  std::vector<std::string> names;
  for (const ArchitectureProfile* profile : all_profiles()) {
    for (std::string_view architecture : profile->architectures) {
      names.emplace_back(architecture);
    }
  }
  std::sort(names.begin(), names.end());
  return names;
}

const ArchitectureProfile* find_profile(std::string_view architecture) {
  for (const ArchitectureProfile* profile : all_profiles()) {
    const auto& names = profile->architectures;
    if (std::find(names.begin(), names.end(), architecture) != names.end()) return profile;
  }
  return nullptr;
}

const ArchitectureProfile& require_profile(std::string_view architecture, std::string_view label) {
  const ArchitectureProfile* profile = find_profile(architecture);
  PQ_CHECK(profile != nullptr, "{}: unsupported architecture {}; supported: {}", label,
           quoted_json_string(architecture), fmt::join(supported_architectures(), ", "));
  return *profile;
}

}  // namespace pq::model
