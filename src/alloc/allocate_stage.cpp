#include "alloc/allocate_stage.h"

#include <fmt/format.h>

#include "alloc/budget.h"
#include "alloc/cost_table.h"
#include "alloc/knapsack.h"
#include "common/error.h"
#include "common/location_lock.h"
#include "report/pareto_report.h"

namespace pq::alloc {

namespace {

double bits_per_param(std::uint64_t bytes, std::uint64_t params) {
  return params == 0 ? 0.0 : 8.0 * static_cast<double>(bytes) / static_cast<double>(params);
}

}  // namespace

AllocateOutcome run_allocate(const AllocateJob& job) {
  PQ_CHECK(job.target_bits.has_value() != job.target_bytes.has_value(),
           "give exactly one of --target-bits and --target-bytes");
  const LocationLock lock(job.out);
  const CostTable table = read_cost_table(job.cost);
  if (job.serve_on) {
    const std::string_view wanted = formats::serving_target_name(*job.serve_on);
    PQ_CHECK(table.serve_on == wanted,
             "{}: the cost table offers the formats vLLM loads on {}, not on {}; rerun cost with "
             "--serve-on {}",
             job.cost.string(), table.serve_on.value_or("an unrecorded target"), wanted, wanted);
  }
  AllocatorOptions options;
  options.formats = job.formats;
  options.max_units = job.max_units;
  const KnapsackAllocator allocator(table, options);
  const std::uint64_t params = table.quantizable_params();

  // The main budget: bits count over quantizable parameters, bytes over the whole checkpoint.
  BudgetRequest request;
  if (job.target_bits) {
    const BitsTarget target = parse_bits_target(*job.target_bits);
    request = {"bits_per_param", target.text, target.budget_bytes(params)};
  } else {
    const std::uint64_t checkpoint_bytes = parse_byte_size(*job.target_bytes);
    PQ_CHECK(checkpoint_bytes > table.passthrough_bytes,
             "--target-bytes {} ({} bytes) does not even hold the {} bytes of unquantized tensors",
             *job.target_bytes, checkpoint_bytes, table.passthrough_bytes);
    request = {"checkpoint_bytes", *job.target_bytes, checkpoint_bytes - table.passthrough_bytes};
  }
  if (request.budget_bytes < allocator.min_bytes()) {
    const std::uint64_t min_checkpoint = allocator.min_bytes() + table.passthrough_bytes;
    fail(
        "{} {} is infeasible: the minimum achievable is {:.4f} bits per quantizable parameter "
        "({} bytes for the whole checkpoint, every Linear at its smallest allowed format)",
        job.target_bits ? "--target-bits" : "--target-bytes", request.value,
        bits_per_param(allocator.min_bytes(), params), min_checkpoint);
  }

  std::vector<BitsTarget> targets;
  if (job.pareto) targets = parse_bits_targets(*job.pareto);
  std::vector<std::uint64_t> budgets = {request.budget_bytes};
  for (const BitsTarget& target : targets) budgets.push_back(target.budget_bytes(params));
  std::vector<std::optional<Allocation>> allocations = allocator.solve_many(budgets);

  AllocateOutcome outcome;
  outcome.items = allocator.items().size();
  outcome.assignment = make_assignment_file(table, *allocations.front(), std::move(request));
  if (job.pareto) {
    allocations.erase(allocations.begin());
    outcome.sweep = make_pareto_sweep(table, std::move(targets), std::move(allocations));
  }

  std::error_code error;
  std::filesystem::create_directories(job.out, error);
  PQ_CHECK(!error, "{}: cannot create the output directory: {}", job.out.string(), error.message());
  write_assignment(job.out / "assignment.json", outcome.assignment);
  if (outcome.sweep) report::write_pareto_report(job.out, *outcome.sweep);
  return outcome;
}

std::string summarize_outcome(const AllocateOutcome& outcome) {
  const AssignmentFile& a = outcome.assignment;
  const AllocationTotals& t = a.totals;
  std::string mix;
  for (const auto& [format, tally] : t.per_format) {
    if (tally.linears == 0) continue;
    mix += fmt::format("{}{} {}", mix.empty() ? "" : ", ", tally.linears, format);
  }
  std::string text = fmt::format(
      "{}: {} Linears in {} decisions at {:.4f} bits/param ({:.4f} over the whole checkpoint, {} "
      "bytes); predicted dL {:.6g}\n  formats: {}\n",
      a.model, a.linears.size(), outcome.items, t.bits_per_quantizable_param,
      t.bits_per_checkpoint_param, t.checkpoint_bytes, t.predicted_dloss, mix);
  if (!a.resolution.exact) {
    text += fmt::format(
        "  byte axis in units of {} bytes: predicted dL at most {:.3g} above the optimum, and no "
        "worse than the optimum {} bytes below the budget (--max-units refines)\n",
        a.resolution.unit_bytes, a.resolution.max_excess_dloss, a.resolution.max_shortfall_bytes);
  }
  if (outcome.sweep) {
    const ParetoSweep& sweep = *outcome.sweep;
    for (std::size_t i = 0; i < sweep.points.size(); ++i) {
      const ParetoPoint& point = sweep.points[i];
      if (!point.totals) {
        text += fmt::format("  pareto {:>6}: infeasible\n", point.target.text);
        continue;
      }
      text += fmt::format("  pareto {:>6}: {:.4f} bits/param, predicted dL {:.6g}{}\n",
                          point.target.text, point.totals->bits_per_quantizable_param,
                          point.totals->predicted_dloss, sweep.knee == i ? "  <- knee" : "");
    }
  }
  return text;
}

}  // namespace pq::alloc
