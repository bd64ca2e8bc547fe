// prismaquant cost: quantization error and predicted loss increase per (Linear, format)
// (src/cost).
#include <fmt/format.h>

#include <cstdio>
#include <memory>

#include "cli/calibration_options.h"
#include "cli/commands.h"
#include "cli/compute_option.h"
#include "cli/memory_option.h"
#include "cli/serve_on_option.h"
#include "common/error.h"
#include "cost/cost_stage.h"
#include "export/gptq.h"
#include "export/linear_encoder.h"
#include "model/model_spec.h"
#include "probe/probe_stage.h"

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
                  "predicted_dloss: fisher (1/2 Tr(F) mean dW^2), activation-fisher (Tr(F) "
                  "spread over input channels by E[x^2]) or kl-fisher (the KL change of the "
                  "exported weights, from --kl-probes random probes of the logit Fisher on the "
                  "calibration data; needs --data or --token-ids)")
      ->default_val("fisher");
  auto kl = std::make_shared<cost::KlFisherJob>();
  auto rounding_name = std::make_shared<std::string>("gptq");
  cmd->add_option("--data", kl->data, "kl-fisher: calibration text (the probe's)");
  cmd->add_option_function<std::string>(
      "--token-ids",
      [kl](const std::string& path) {
        kl->data = path;
        kl->token_ids = true;
      },
      "kl-fisher: calibration token ids (the probe's)");
  add_calibration_options(cmd, *kl);
  cmd->add_option("--kl-probes", kl->probes, "kl-fisher: random probes K")
      ->default_val(kl->probes)
      ->check(CLI::PositiveNumber);
  add_compute_option(cmd, kl->compute, "kl-fisher: what the forward and backward GEMMs multiply");
  add_max_memory_option(cmd, kl->max_memory);
  cmd->add_option("--rounding", *rounding_name,
                  "kl-fisher: the export rounding whose weights are measured (gptq, "
                  "local-hessian, gptq+local-hessian or nearest; stored in WORK/render and "
                  "reused by export)")
      ->default_val(*rounding_name);
  cmd->add_flag("--quantize-lm-head", job->spec_options.quantize_lm_head,
                "Also make lm_head a candidate (the probe must have measured it)");
  add_serve_on_option(cmd, job->serve_on);
  cmd->callback([job, objective, kl, rounding_name] {
    job->objective = cost::objective_by_name(*objective);
    // kl-fisher measures the exporter's weights, rendered into WORK/render beside --out.
    std::optional<probe::ProbeResult> probe;
    std::optional<model::ModelSpec> spec;
    std::optional<io::Checkpoint> checkpoint;
    std::unique_ptr<exporter::RoundingStrategy> rounding;
    std::optional<exporter::LinearEncoder> encoder;
    std::optional<exporter::EncoderRenders> renders;
    if (job->objective == cost::Objective::kKlFisher) {
      PQ_CHECK(!kl->data.empty(),
               "cost: --objective kl-fisher needs the calibration data: --data or --token-ids");
      probe = probe::ProbeResult::read(job->probe);
      spec = model::load_model_spec(job->model, job->spec_options);
      checkpoint = io::Checkpoint::open(job->model);
      rounding = exporter::make_rounding(*rounding_name, &*probe);
      std::filesystem::path work = job->out.lexically_normal();
      if (!work.has_filename()) work = work.parent_path();
      encoder.emplace(*spec, *checkpoint, *rounding, exporter::input_amax_from_probe(*spec, *probe),
                      job->serve_on, work.parent_path() / "render");
      renders.emplace(*encoder);
      job->renders = &*renders;
      job->kl_fisher = *kl;
    }
    const cost::CostOutcome outcome = cost::run_cost(*job);
    std::fputs(fmt::format("cost: {} Linears x {} formats{} -> {}\n", outcome.table.linears.size(),
                           outcome.table.formats.size(), outcome.reused ? " (reused)" : "",
                           (job->out / "cost.json").string())
                   .c_str(),
               stdout);
  });
}

}  // namespace pq::cli
