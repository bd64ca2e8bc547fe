// prismaquant scout: choose the shipped assignment by measured held-out KL (src/scout).
#include <cstdio>
#include <memory>

#include "alloc/budget.h"
#include "cli/calibration_options.h"
#include "cli/commands.h"
#include "cli/serve_on_option.h"
#include "common/error.h"
#include "export/gptq.h"
#include "probe/probe_stage.h"
#include "scout/scout_stage.h"

namespace pq::cli {

namespace {

std::vector<std::string> split_list(const std::string& list) {
  std::vector<std::string> items;
  for (const alloc::BitsTarget& target : alloc::parse_bits_targets(list)) {
    items.push_back(target.text);
  }
  return items;
}

}  // namespace

void register_scout(CLI::App& app) {
  auto job = std::make_shared<scout::ScoutJob>();
  auto budgets = std::make_shared<std::string>("4.5,4.75,5,5.5,6");
  auto rounding = std::make_shared<std::string>("gptq");
  CLI::App* cmd = app.add_subcommand(
      "scout",
      "Choose the assignment to ship by measured held-out KL: allocator candidates at anchor "
      "budgets (L1), perturbed fixed point (L2), measured flips (L3), validated frontier knee, "
      "coordinate-descent polish; writes WORK/scout/{scout.json,scout.svg,assignment.json}");
  cmd->add_option("model", job->model, "Hugging Face checkpoint directory")->required();
  cmd->add_option("--work", job->work, "WORK directory holding probe/ and cost/")->required();
  add_data_options(cmd, *job,
                   "Text file: KL on its held-out split (last 10%), L2 probes on the rest; the "
                   "probe's calibration file");
  cmd->add_option("--formats", job->formats, "Restrict the cost table's format menu")
      ->delimiter(',');
  cmd->add_option("--budgets", *budgets, "L1 anchor budgets, bits per quantizable parameter")
      ->default_val(*budgets);
  cmd->add_option("--target", job->target, "Bits per quantizable parameter the pick must fit")
      ->default_val(job->target);
  cmd->add_option("--heldout-windows", job->heldout_windows, "Held-out windows for KL")
      ->default_val(job->heldout_windows)
      ->check(CLI::PositiveNumber);
  cmd->add_option("--heldout-seqlen", job->heldout_seqlen, "Tokens per held-out window")
      ->default_val(job->heldout_seqlen)
      ->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--l2-passes", job->l2_max_passes, "Most L2 passes per anchor (0: no L2)")
      ->default_val(job->l2_max_passes);
  cmd->add_option("--l2-nsamples", job->l2_nsamples, "Calibration sequences per L2 probe")
      ->default_val(job->l2_nsamples)
      ->check(CLI::PositiveNumber);
  cmd->add_option("--l2-seqlen", job->l2_seqlen, "Tokens per L2 calibration sequence")
      ->default_val(job->l2_seqlen)
      ->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--l3-units", job->l3_items, "Uncertain units L3 measures (0: no L3)")
      ->default_val(job->l3_items);
  cmd->add_option("--polish-evaluations", job->polish_max_evaluations,
                  "Most KL measurements the polish may spend")
      ->default_val(job->polish_max_evaluations);
  cmd->add_option("--uniform-baseline", job->uniform_baseline,
                  "Format of the uniform baseline measured for comparison (empty: none)")
      ->default_val(job->uniform_baseline);
  cmd->add_option("--rounding", *rounding,
                  "How Linears are encoded, as export will: gptq (GPTQ + scale sweep on the "
                  "Hessians of WORK/probe), local-hessian, gptq+local-hessian or nearest")
      ->default_val(*rounding)
      ->check(CLI::IsMember({"nearest", "gptq", "local-hessian", "gptq+local-hessian"}));
  cmd->add_flag("--quantize-lm-head", job->spec_options.quantize_lm_head,
                "lm_head is a candidate (the cost table must have it)");
  add_serve_on_option(cmd, job->serve_on);
  cmd->callback([job, budgets, rounding] {
    scout::ScoutJob run = *job;
    run.budgets = split_list(*budgets);
    const probe::ProbeResult probed = probe::ProbeResult::read(run.work / "probe");
    const std::unique_ptr<exporter::RoundingStrategy> strategy =
        exporter::make_rounding(*rounding, &probed);
    run.rounding = strategy.get();
    const scout::ScoutOutcome outcome = scout::run_scout(run);
    std::fputs(scout::summarize_outcome(outcome).c_str(), stdout);
  });
}

}  // namespace pq::cli
