// prismaquant cost: quantization error and predicted loss increase per (Linear, format)
// (src/cost).
#include <fmt/format.h>

#include <cstdio>
#include <memory>

#include "cli/commands.h"
#include "cli/serve_on_option.h"
#include "cost/cost_stage.h"

namespace pq::cli {

void register_cost(CLI::App& app) {
  auto job = std::make_shared<cost::CostJob>();
  auto objective = std::make_shared<std::string>("fisher");
  CLI::App* cmd = app.add_subcommand(
      "cost",
      "Quantize every Linear in every admissible format with the real codec and measure weight, "
      "activation-weighted and output errors and the predicted loss increase; writes cost.json "
      "for `prismaquant allocate`");
  cmd->add_option("model", job->model, "Hugging Face checkpoint directory")->required();
  cmd->add_option("--probe", job->probe, "Probe stage output, e.g. WORK/probe")->required();
  cmd->add_option("--formats", job->formats, "Format menu, e.g. NVFP4,MXFP8_E4M3,BF16")
      ->required()
      ->delimiter(',');
  cmd->add_option("--out", job->out, "Output directory, e.g. WORK/cost")->required();
  cmd->add_option("--objective", *objective,
                  "predicted_dloss: fisher (1/2 Tr(F) mean dW^2) or activation-fisher (Tr(F) "
                  "spread over input channels by E[x^2])")
      ->default_val("fisher");
  cmd->add_flag("--quantize-lm-head", job->spec_options.quantize_lm_head,
                "Also make lm_head a candidate (the probe must have measured it)");
  add_serve_on_option(cmd, job->serve_on);
  cmd->callback([job, objective] {
    job->objective = cost::objective_by_name(*objective);
    const cost::CostOutcome outcome = cost::run_cost(*job);
    std::fputs(fmt::format("cost: {} Linears x {} formats{} -> {}\n", outcome.table.linears.size(),
                           outcome.table.formats.size(), outcome.reused ? " (reused)" : "",
                           (job->out / "cost.json").string())
                   .c_str(),
               stdout);
  });
}

}  // namespace pq::cli
