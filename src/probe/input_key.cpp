#include "probe/input_key.h"

#include <string_view>

namespace pq::probe {

std::string input_key(const model::Linear& linear) {
  std::string_view role = linear.role;
  if (role.starts_with("expert_")) role.remove_prefix(std::string_view("expert_").size());
  const std::size_t dot = linear.name.rfind('.');
  const std::string parent = dot == std::string::npos ? std::string() : linear.name.substr(0, dot);
  if (role == "q_proj" || role == "k_proj" || role == "v_proj") return parent + ".qkv_proj";
  if (role == "gate_proj" || role == "up_proj" || role == "shared_expert_gate_proj" ||
      role == "shared_expert_up_proj") {
    return parent + ".gate_up_proj";
  }
  // A Gated DeltaNet layer's projections all read the input norm's output (facts §4.4 step 1).
  if (role.starts_with("in_proj_")) return parent + ".in_proj";
  return linear.name;
}

}  // namespace pq::probe
