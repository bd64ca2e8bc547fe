// prismaquant allocate: choose one format per Linear under a size budget (src/alloc).
#include <cstdio>
#include <memory>

#include "alloc/allocate_stage.h"
#include "cli/commands.h"
#include "formats/serving.h"

namespace pq::cli {

void register_allocate(CLI::App& app) {
  auto job = std::make_shared<alloc::AllocateJob>();
  CLI::App* cmd = app.add_subcommand(
      "allocate",
      "Choose a format per Linear minimising predicted loss under a size budget (multiple-choice "
      "knapsack); writes assignment.json, and pareto.csv/pareto.svg with --pareto");
  cmd->add_option("--cost", job->cost, "Cost stage output: WORK/cost or its cost.json")->required();
  cmd->add_option("--out", job->out, "Output directory, e.g. WORK/alloc")->required();
  auto* bits = cmd->add_option("--target-bits", job->target_bits,
                               "Budget in bits per quantizable parameter, e.g. 4.75");
  auto* bytes = cmd->add_option("--target-bytes", job->target_bytes,
                                "Budget for the whole checkpoint, e.g. 24GB or 22.5GiB");
  bits->excludes(bytes);
  cmd->add_option("--pareto", job->pareto,
                  "Also solve these bits-per-parameter targets, e.g. 4.5,4.75,5,6");
  cmd->add_option("--formats", job->formats, "Only choose among these formats")->delimiter(',');
  cmd->add_option("--max-units", job->max_units,
                  "Most cells on the knapsack's byte axis; a budget needing more is solved on a "
                  "coarser axis (reported)")
      ->check(CLI::PositiveNumber);
  cmd->add_option_function<std::string>(
      "--serve-on",
      [job](const std::string& name) { job->serve_on = formats::parse_serving_target(name); },
      "GPU generation the checkpoint is for (blackwell, hopper, ada, ampere); the cost table "
      "must have been measured for it with cost --serve-on (default: the one it was)");
  cmd->callback([job] {
    const alloc::AllocateOutcome outcome = alloc::run_allocate(*job);
    std::fputs(alloc::summarize_outcome(outcome).c_str(), stdout);
  });
}

}  // namespace pq::cli
