// prismaquant quantize: probe -> cost -> allocate in one command (src/pipeline).
#include <fmt/format.h>

#include <cstdio>
#include <memory>
#include <string>

#include "cli/calibration_options.h"
#include "cli/commands.h"
#include "cli/gate_options.h"
#include "cli/invocation.h"
#include "cli/kv_cache_option.h"
#include "cli/memory_option.h"
#include "cli/serve_on_option.h"
#include "pipeline/quantize_pipeline.h"

namespace pq::cli {

void register_quantize(CLI::App& app) {
  auto job = std::make_shared<pipeline::QuantizeJob>();
  auto no_weighting = std::make_shared<bool>(false);
  auto objective = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand(
      "quantize",
      "Quantize MODEL end to end: probe -> cost -> allocate -> measure -> export. DIR receives the "
      "compressed-tensors checkpoint (`vllm serve DIR`); stage artifacts go to --work (default "
      "DIR.work), and probe, cost and the rounded Linears (WORK/render) are reused when their "
      "inputs are unchanged");
  cmd->add_option("model", job->model, "Hugging Face checkpoint directory")->required();
  cmd->add_option("--out", job->out, "Output directory DIR")->required();
  cmd->add_option("--formats", job->formats,
                  "Format menu (FP8_SOURCE is added for a source with block-scaled FP8 weights)")
      ->delimiter(',')
      ->default_val(pipeline::QuantizeJob{}.formats);
  cmd->add_option("--target-bits", job->target_bits, "Bits per quantizable parameter")
      ->default_val(job->target_bits);
  add_data_options(cmd, *job,
                   "Calibration text (plain text or .jsonl); its last 10% is held out for "
                   "evaluation");
  cmd->add_option("--work", job->work, "Work directory for the stage artifacts (default DIR.work)");
  cmd->add_flag("--force", job->force, "Replace DIR if it exists");
  cmd->add_option("--select", job->select,
                  "allocate (the knapsack's assignment at --target-bits) or scout (chosen by "
                  "measured held-out KL, docs/scout.md)")
      ->default_val(job->select);
  cmd->add_option("--scout-budgets", job->scout_budgets, "scout's anchor budgets (bits)")
      ->delimiter(',')
      ->default_val(job->scout_budgets);
  cmd->add_option(
      "--vision-format", job->vision_format,
      "Store every vision-tower Linear in this format, rounded to nearest (default: kept as "
      "stored, BF16)");
  cmd->add_option("--rounding", job->rounding,
                  "gptq (GPTQ + per-group scale sweep with the probe's Hessians), local-hessian "
                  "(NVFP4/MX group scales under each group's block of those Hessians), "
                  "gptq+local-hessian (per Linear the lower output error on held-out calibration "
                  "rows, renders fitted without them) or nearest")
      ->default_val(job->rounding);
  cmd->add_option("--eval-windows", job->eval_windows, "Held-out windows evaluated")
      ->default_val(job->eval_windows)
      ->check(CLI::PositiveNumber);
  cmd->add_option("--eval-seqlen", job->eval_seqlen, "Tokens per held-out window")
      ->default_val(job->eval_seqlen)
      ->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--pareto", job->pareto,
                  "Pareto targets (default 4,4.25,4.5,4.75,5,5.5,6,7,8 and --target-bits)");
  add_calibration_options(cmd, *job);
  add_max_memory_option(cmd, job->max_memory);
  cmd->add_option_function<std::string>(
      "--probe-compute",
      [job](const std::string& name) { job->probe_compute = runtime::parse_compute_type(name); },
      "The probe's --compute: f32, or bf16 GEMM inputs with fp32 accumulation (default " +
          std::string(runtime::compute_type_name(job->probe_compute)) + ")");
  add_gate_options(cmd, job->gates);
  cmd->add_flag("--no-importance-weighting", *no_weighting, "Weight every token's loss equally");
  cmd->add_option("--objective", *objective,
                  "The cost's predicted_dloss: kl-fisher (the KL change of the exported weights "
                  "from random probes of the logit Fisher, the default; a multi-token-prediction "
                  "head's Linears by the KL of its own logits), fisher or activation-fisher");
  cmd->add_option("--kl-probes", job->kl_probes, "kl-fisher: random probes K")
      ->default_val(job->kl_probes)
      ->check(CLI::PositiveNumber);
  add_serve_on_option(cmd, job->serve_on);
  add_kv_cache_option(cmd, job->kv_cache,
                      "the probe records each attention layer's key/value amax, the export "
                      "writes kv_cache_scheme and per-layer k_scale / v_scale, and the KL is "
                      "measured with the FP8 cache too");
  cmd->callback([job, no_weighting, objective] {
    job->importance_weighting = !*no_weighting;
    if (!objective->empty()) job->objective = cost::objective_by_name(*objective);
    job->command_line = invocation();
    const pipeline::QuantizeOutcome outcome = pipeline::run_quantize(*job);
    for (const pipeline::StageReport& stage : outcome.stages) {
      std::fputs(fmt::format("{:<8} {:8.2f} s{}\n", stage.stage, stage.seconds,
                             stage.reused ? "  (reused)" : "")
                     .c_str(),
                 stdout);
    }
    std::fputs(alloc::summarize_outcome(outcome.allocation).c_str(), stdout);
    if (outcome.scout) std::fputs(scout::summarize_outcome(*outcome.scout).c_str(), stdout);
    const exporter::MeasuredQuality& q = outcome.measured;
    std::fputs(fmt::format("held-out ({} x {} tokens): KL {:.6f} nats, perplexity {:.4f} (source "
                           "{:.4f}), top-1 agreement {:.4f}\n",
                           q.windows, q.seqlen, q.mean_kl, q.perplexity, q.source_perplexity,
                           q.top1_agreement)
                   .c_str(),
               stdout);
    if (q.fp8_kv_cache) {
      std::fputs(fmt::format("  with the FP8 KV cache: KL {:.6f} nats, perplexity {:.4f}, top-1 "
                             "agreement {:.4f}\n",
                             q.fp8_kv_cache->mean_kl, q.fp8_kv_cache->perplexity,
                             q.fp8_kv_cache->top1_agreement)
                     .c_str(),
                 stdout);
    }
    if (outcome.uniform && outcome.uniform->quality) {
      const exporter::MeasuredQuality& u = *outcome.uniform->quality;
      std::fputs(
          fmt::format("uniform {} ({} bytes against {}): KL {:.6f} nats, perplexity {:.4f}, "
                      "top-1 agreement {:.4f}: not better than the mix\n",
                      outcome.uniform->format, outcome.uniform->bytes,
                      outcome.uniform->shipped_bytes, u.mean_kl, u.perplexity, u.top1_agreement)
              .c_str(),
          stdout);
    }
    std::fputs((outcome.rounding + "\n").c_str(), stdout);
    const validate::ValidateReport& v = outcome.validated;
    std::fputs(fmt::format("validate (reloaded from disk): KL {:.6f} nats, perplexity {:.4f}, "
                           "top-1 agreement {:.4f}: gates passed\n",
                           v.mean_kl, v.perplexity, v.top1_agreement)
                   .c_str(),
               stdout);
    if (v.fp8_kv_cache) {
      std::fputs(fmt::format("  with the FP8 KV cache: KL {:.6f} nats, perplexity {:.4f}, top-1 "
                             "agreement {:.4f}\n",
                             v.fp8_kv_cache->mean_kl, v.fp8_kv_cache->perplexity,
                             v.fp8_kv_cache->top1_agreement)
                     .c_str(),
                 stdout);
    }
    // One line: the sample's newlines shown as \n.
    std::string sample = v.prompt + v.sample;
    for (std::size_t at = sample.find('\n'); at != std::string::npos; at = sample.find('\n', at)) {
      sample.replace(at, 1, "\\n");
    }
    std::fputs(fmt::format("greedy sample: {}\n", sample).c_str(), stdout);
    std::fputs(
        fmt::format("wrote {} ({:.3f} bits per parameter on disk)\n", outcome.exported.out.string(),
                    8.0 * static_cast<double>(outcome.exported.tensor_bytes) /
                        static_cast<double>(outcome.exported.params))
            .c_str(),
        stdout);
  });
}

}  // namespace pq::cli
