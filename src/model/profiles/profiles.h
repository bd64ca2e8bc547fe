#pragma once

#include "model/profile.h"

// One function per architecture family, each defined in its own file in this folder and listed
// in profile_registry.cpp.
namespace pq::model::profiles {

const ArchitectureProfile& llama();
const ArchitectureProfile& mistral();
const ArchitectureProfile& qwen2();
const ArchitectureProfile& qwen3();
const ArchitectureProfile& qwen3_moe();
const ArchitectureProfile& qwen3_5();
const ArchitectureProfile& qwen3_5_moe();
const ArchitectureProfile& qwen3_next();
const ArchitectureProfile& minimax_m2();
const ArchitectureProfile& deepseek_v3();
const ArchitectureProfile& gemma4();

}  // namespace pq::model::profiles
