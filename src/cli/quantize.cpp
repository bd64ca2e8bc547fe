// prismaquant quantize: probe -> cost -> allocate in one command (src/pipeline).
#include <fmt/format.h>

#include <cstdio>
#include <memory>

#include "cli/calibration_options.h"
#include "cli/commands.h"
#include "pipeline/quantize_pipeline.h"

namespace pq::cli {

void register_quantize(CLI::App& app) {
  auto job = std::make_shared<pipeline::QuantizeJob>();
  auto no_weighting = std::make_shared<bool>(false);
  auto objective = std::make_shared<std::string>("fisher");
  CLI::App* cmd = app.add_subcommand(
      "quantize",
      "Run probe -> cost -> allocate, reusing each stage's artifact when its inputs are unchanged. "
      "Export is not implemented yet: DIR receives assignment.json, pareto.csv and pareto.svg "
      "(stage artifacts go to --work, default DIR/work)");
  cmd->add_option("model", job->model, "Hugging Face checkpoint directory")->required();
  cmd->add_option("--out", job->out, "Output directory DIR")->required();
  cmd->add_option("--formats", job->formats, "Format menu")
      ->delimiter(',')
      ->default_val(std::vector<std::string>{"NVFP4", "MXFP8_E4M3", "BF16"});
  cmd->add_option("--target-bits", job->target_bits, "Bits per quantizable parameter")
      ->default_val(job->target_bits);
  cmd->add_option("--data", job->data,
                  "Calibration text; without it the work directory's finished probe is used");
  cmd->add_option("--work", job->work, "Work directory for the stage artifacts");
  cmd->add_option("--pareto", job->pareto,
                  "Pareto targets (default 4,4.25,4.5,4.75,5,5.5,6,7,8 and --target-bits)");
  add_calibration_options(cmd, *job);
  cmd->add_flag("--no-importance-weighting", *no_weighting, "Weight every token's loss equally");
  cmd->add_option("--objective", *objective, "fisher or activation-fisher")->default_val("fisher");
  cmd->callback([job, no_weighting, objective] {
    job->importance_weighting = !*no_weighting;
    job->objective = cost::objective_by_name(*objective);
    const pipeline::QuantizeOutcome outcome = pipeline::run_quantize(*job);
    for (const pipeline::StageReport& stage : outcome.stages) {
      std::fputs(fmt::format("{:<8} {:8.2f} s{}\n", stage.stage, stage.seconds,
                             stage.reused ? "  (reused)" : "")
                     .c_str(),
                 stdout);
    }
    std::fputs(alloc::summarize_outcome(outcome.allocation).c_str(), stdout);
  });
}

}  // namespace pq::cli
