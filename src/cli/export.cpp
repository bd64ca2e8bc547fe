// prismaquant export: write the compressed-tensors checkpoint for an assignment (src/export).
#include <fmt/format.h>

#include <memory>
#include <optional>
#include <string>

#include "cli/commands.h"
#include "cli/invocation.h"
#include "cli/kv_cache_option.h"
#include "cli/serve_on_option.h"
#include "common/error.h"
#include "export/exporter.h"
#include "export/gptq.h"
#include "model/model_spec.h"
#include "probe/probe_stage.h"

namespace pq::cli {

void register_export(CLI::App& app) {
  auto job = std::make_shared<exporter::ExportJob>();
  auto probe_dir = std::make_shared<std::string>();
  auto rounding_name = std::make_shared<std::string>("gptq");
  CLI::App* cmd = app.add_subcommand(
      "export",
      "Quantize MODEL with the format of every Linear from assignment.json and write a "
      "compressed-tensors checkpoint that vLLM serves (`vllm serve DIR`)");
  cmd->add_option("model", job->model_dir, "Source checkpoint directory (HF layout)")->required();
  cmd->add_option("--assignment", job->assignment,
                  "Allocate stage output: WORK/alloc/assignment.json")
      ->required();
  cmd->add_option("--out", job->out, "Checkpoint directory to create")->required();
  cmd->add_flag("--force", job->force, "Replace --out if it exists");
  cmd->add_option("--probe", *probe_dir,
                  "Probe stage output (WORK/probe): the Hessians GPTQ rounds with and the "
                  "activation maxima of W4A4 NVFP4's input_global_scale. Renders are reused from "
                  "and stored in WORK/render");
  cmd->add_option(
      "--vision-format", job->vision_format,
      "Store every vision-tower Linear in this format, rounded to nearest (default: kept as "
      "stored, BF16)");
  cmd->add_option("--rounding", *rounding_name,
                  "gptq (GPTQ + per-group scale sweep with the probe's Hessians; needs --probe), "
                  "local-hessian (NVFP4/MX group scales minimising the error under each group's "
                  "block of those Hessians; needs --probe), gptq+local-hessian (per Linear the "
                  "lower output error of the two: on the held-out rows of a probe run with "
                  "--holdout-hessian, else on the calibration rows) or nearest (round to nearest)")
      ->default_val(*rounding_name);
  add_serve_on_option(cmd, job->serve_on);
  auto kv_cache = std::make_shared<bool>(false);
  add_kv_cache_option(cmd, *kv_cache,
                      "kv_cache_scheme and per-layer k_scale / v_scale from the key/value amax "
                      "of a probe run with --kv-cache fp8; needs --probe");
  cmd->callback([job, probe_dir, rounding_name, kv_cache] {
    PQ_CHECK(*rounding_name == "nearest" || !probe_dir->empty(),
             "export: --rounding {} needs the probe's Hessians: give --probe WORK/probe, or "
             "--rounding nearest",
             *rounding_name);
    PQ_CHECK(!*kv_cache || !probe_dir->empty(),
             "export: --kv-cache fp8 takes its scales from the probe: give --probe WORK/probe");
    std::optional<probe::ProbeResult> probe;
    if (!probe_dir->empty()) {
      probe = probe::ProbeResult::read(*probe_dir);
      const model::ModelSpec spec = model::load_model_spec(job->model_dir);
      job->input_amax = exporter::input_amax_from_probe(spec, *probe);
      if (*kv_cache) job->kv_cache = exporter::kv_cache_scales_from_probe(spec, *probe);
      // WORK/probe/ names WORK/probe: its parent is WORK.
      std::filesystem::path work = std::filesystem::path(*probe_dir).lexically_normal();
      if (!work.has_filename()) work = work.parent_path();
      job->render_cache = work.parent_path() / "render";
    }
    const std::unique_ptr<exporter::RoundingStrategy> rounding =
        exporter::make_rounding(*rounding_name, probe ? &*probe : nullptr);
    job->command_line = invocation();
    const exporter::ExportSummary summary = exporter::run_export(*job, *rounding);
    fmt::print(
        "wrote {} ({} files, {} tensor bytes, {:.3f} bits per parameter)\n", summary.out.string(),
        summary.files.size(), summary.tensor_bytes,
        8.0 * static_cast<double>(summary.tensor_bytes) / static_cast<double>(summary.params));
  });
}

}  // namespace pq::cli
