// prismaquant probe: Fisher traces, Hessians and routing statistics from calibration (src/probe).
#include <fmt/format.h>

#include <cstdio>
#include <memory>

#include "cli/calibration_options.h"
#include "cli/commands.h"
#include "cli/compute_option.h"
#include "cli/kv_cache_option.h"
#include "cli/memory_option.h"
#include "probe/probe_stage.h"

namespace pq::cli {

void register_probe(CLI::App& app) {
  auto job = std::make_shared<probe::ProbeJob>();
  auto no_weighting = std::make_shared<bool>(false);
  auto no_fisher = std::make_shared<bool>(false);
  auto no_hessians = std::make_shared<bool>(false);
  CLI::App* cmd = app.add_subcommand(
      "probe",
      "Measure per-Linear sensitivity on calibration data: per-sequence empirical Fisher traces, "
      "GPTQ Hessians per distinct input, activation second moments and MoE routing statistics; "
      "writes probe.json and one probe.<part>.safetensors per layer; one layer-major pass with "
      "its activations on disk (resumable after a kill: rerun the same command)");
  cmd->add_option("model", job->model, "Hugging Face checkpoint directory")->required();
  add_data_options(cmd, *job, "Calibration text (plain text or JSONL)");
  cmd->add_option("--out", job->out, "Output directory, e.g. WORK/probe")->required();
  add_calibration_options(cmd, *job);
  add_max_memory_option(cmd, job->max_memory);
  add_compute_option(cmd, job->compute,
                     "f32, or bf16: bf16 inputs with fp32 accumulation for the forward, backward "
                     "and weight-gradient GEMMs (Hessians and sums stay fp32)");
  cmd->add_flag("--no-importance-weighting", *no_weighting,
                "Weight every token's loss equally (default: clamp(CE_t / mean CE, 0.25, 4))");
  cmd->add_flag("--quantize-lm-head", job->spec_options.quantize_lm_head,
                "Also measure lm_head (a candidate only on request)");
  add_kv_cache_option(cmd, job->kv_cache,
                      "also record each attention layer's key/value amax, from which export "
                      "--kv-cache fp8 sets the scales");
  cmd->add_flag("--holdout-hessian", job->holdout_hessian,
                "Also sum each input's Hessian over the last eighth of the calibration sequences "
                "alone: GPTQ rounding then fits its renders without those rows and picks per "
                "Linear the one with the lowest output error on them");
  cmd->add_flag("--no-fisher", *no_fisher,
                "Forward pass only: Hessians, activation statistics and routing without the "
                "Fisher traces (enough for cost --objective kl-fisher and export; about a "
                "quarter of the arithmetic)");
  cmd->add_flag("--no-hessians", *no_hessians,
                "Store no Hessian X^T X, only each input's second moments: cost --objective "
                "kl-fisher accumulates a layer's Hessians in its own pass and renders the layer "
                "before dropping them (a MoE's Hessians can take more disk than the model)");
  cmd->callback([job, no_weighting, no_fisher, no_hessians] {
    job->importance_weighting = !*no_weighting;
    job->fisher = !*no_fisher;
    job->hessians = !*no_hessians;
    const probe::ProbeOutcome outcome = probe::run_probe(*job);
    std::fputs(fmt::format("probe {}: {} of {} steps{}{}, fingerprint {}\n",
                           outcome.complete ? "complete" : "stopped", outcome.steps_done,
                           outcome.steps_total, outcome.reused ? " (reused)" : "",
                           outcome.resumed_from > 0
                               ? fmt::format(" (resumed after step {})", outcome.resumed_from)
                               : "",
                           outcome.fingerprint)
                   .c_str(),
               stdout);
  });
}

}  // namespace pq::cli
