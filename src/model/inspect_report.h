#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "model/model_spec.h"

namespace pq::model {

// Bumped whenever a key of the inspect JSON changes meaning or disappears (adding keys does not).
inline constexpr int kInspectSchemaVersion = 1;

// The `prismaquant inspect --json` object, keys in documented order; docs/inspect-json.md
// documents every key.
nlohmann::ordered_json inspect_json(const ModelSpec& spec);

// The human-readable `prismaquant inspect` report (several lines, ends with a newline).
std::string inspect_text(const ModelSpec& spec);

}  // namespace pq::model
