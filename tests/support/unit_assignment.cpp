#include "support/unit_assignment.h"

#include <map>
#include <set>

#include "alloc/cost_table.h"
#include "formats/weight_format.h"

namespace pq::test {

alloc::AssignmentFile unit_assignment(const model::ModelSpec& spec,
                                      const io::Checkpoint& checkpoint,
                                      const std::vector<std::string>& menu,
                                      const UnitChooser& choose, bool respect_groups) {
  alloc::CostTable table;
  table.model = spec.architecture;
  table.formats = menu;
  std::set<std::string> counted;
  for (const std::string& name : spec.passthrough_tensors()) {
    if (!counted.insert(name).second) continue;
    table.passthrough_params += static_cast<std::uint64_t>(checkpoint.info(name).numel());
    table.passthrough_bytes += checkpoint.info(name).nbytes();
  }
  alloc::Allocation allocation;
  std::map<std::string, std::string> format_of_group;
  std::size_t units = 0;
  for (const model::Linear& linear : spec.linears) {
    if (!linear.is_candidate) continue;
    const formats::Shape2D shape{linear.out_features, linear.in_features};
    alloc::LinearCost cost{linear.name,
                           {shape.out, shape.in},
                           linear.group.value_or(""),
                           static_cast<std::uint64_t>(shape.numel()),
                           {}};
    for (const std::string& format : menu) {
      const formats::WeightFormat& f = formats::format_by_name(format);
      if (f.accepts(shape)) {
        cost.costs.push_back(alloc::FormatCost{f.bytes(shape), 0.0, {}, {}, {}});
      } else {
        cost.costs.emplace_back();
      }
    }
    std::string format;
    if (respect_groups && linear.group && format_of_group.contains(*linear.group)) {
      format = format_of_group.at(*linear.group);
    } else {
      format = choose(units++, linear);
      if (linear.group) format_of_group[*linear.group] = format;
    }
    const std::size_t index = table.format_index(format);
    allocation.format_of_linear.push_back(index);
    allocation.bytes += cost.costs[index].value().bytes;
    table.linears.push_back(std::move(cost));
  }
  allocation.budget_bytes = allocation.bytes;
  return alloc::make_assignment_file(
      table, allocation,
      {.kind = "bits_per_param", .value = "16", .budget_bytes = allocation.bytes});
}

UnitChooser cycle(std::vector<std::string> formats) {
  return [formats = std::move(formats)](std::size_t unit, const model::Linear&) {
    return formats[unit % formats.size()];
  };
}

}  // namespace pq::test
