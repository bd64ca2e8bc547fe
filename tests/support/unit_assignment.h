#pragma once

#include <cstddef>
#include <functional>
#include <string>
#include <vector>

#include "alloc/assignment.h"
#include "io/safetensors.h"
#include "model/model_spec.h"

namespace pq::test {

// Picks the format of a decision unit (sibling group or lone Linear) from its position and its
// first Linear.
using UnitChooser = std::function<std::string(std::size_t unit, const model::Linear& first)>;

// An assignment in the allocate stage's file format, made through the alloc library: each
// decision unit gets the format `choose` names (a sibling group's members share it; with
// `respect_groups` false every Linear is its own unit, which the allocator never does), each
// Linear charged what its format stores, the passthrough what the checkpoint stores. `menu` is
// the cost table's format list and must hold every chosen format.
alloc::AssignmentFile unit_assignment(const model::ModelSpec& spec,
                                      const io::Checkpoint& checkpoint,
                                      const std::vector<std::string>& menu,
                                      const UnitChooser& choose, bool respect_groups = true);

// Cycles through `formats`, one per unit.
UnitChooser cycle(std::vector<std::string> formats);

}  // namespace pq::test
