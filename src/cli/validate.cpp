// prismaquant validate: read an exported compressed-tensors checkpoint as a consumer would, check
// its structure, and compare the decoded model with its source on held-out text.
#include "validate/validate.h"

#include <cstdio>
#include <memory>
#include <string>

#include "cli/calibration_options.h"
#include "cli/commands.h"
#include "cli/gate_options.h"
#include "cli/serve_on_option.h"
#include "common/error.h"

namespace pq::cli {

namespace {

struct ValidateArgs {
  validate::ValidateJob job;
  std::string prompt;
  std::string json;
};

void print_report(const validate::ValidateReport& r) {
  std::printf("checkpoint: %s (format %s)\n", r.checkpoint.c_str(), r.format.c_str());
  for (const auto& [format, count] : r.linears_by_format) {
    std::printf("  %-24s %lld Linears\n", format.c_str(), static_cast<long long>(count));
  }
  std::printf("  activations quantized in %lld Linears\n",
              static_cast<long long>(r.activation_quantized_linears));
  std::printf("held-out: %lld windows x %lld tokens (%lld predictions)\n",
              static_cast<long long>(r.windows), static_cast<long long>(r.seqlen),
              static_cast<long long>(r.predictions));
  std::printf("mean KL(reference || checkpoint): %.6g nats (gate <= %g)\n", r.mean_kl,
              r.gates.max_kl);
  std::printf("top-1 agreement: %.4f (gate >= %g)\n", r.top1_agreement, r.gates.min_top1);
  std::printf("perplexity: %.4f, reference %.4f, ratio %.4f (gate <= %g)\n", r.perplexity,
              r.reference_perplexity, r.perplexity / r.reference_perplexity, r.gates.max_ppl_ratio);
  if (r.fp8_kv_cache) {
    const validate::ValidateReport::KvCacheFigures& kv = *r.fp8_kv_cache;
    std::printf(
        "with the FP8 KV cache (%lld layers, scales %.4g to %.4g): KL %.6g nats, top-1 "
        "%.4f, perplexity %.4f (same gates)\n",
        static_cast<long long>(kv.layers), kv.min_scale, kv.max_scale, kv.mean_kl,
        kv.top1_agreement, kv.perplexity);
  }
  std::printf("prompt (%s sample): %s\n", r.sample_mode.c_str(), r.prompt.c_str());
  std::printf("checkpoint: %s\n", r.sample.c_str());
  std::printf("reference:  %s\n", r.reference_sample.c_str());
}

void run(ValidateArgs& args) {
  if (!args.prompt.empty()) args.job.prompt = args.prompt;
  const validate::ValidateReport report = validate::run_validate(args.job);
  print_report(report);
  if (!args.json.empty()) validate::write_report(args.json, report);
  PQ_CHECK(report.passed(), "validation failed: {}", fmt::join(report.failures, "; "));
  std::printf("validation passed\n");
}

}  // namespace

void register_validate(CLI::App& app) {
  auto args = std::make_shared<ValidateArgs>();
  validate::ValidateJob& job = args->job;
  CLI::App* cmd = app.add_subcommand(
      "validate",
      "Check a compressed-tensors checkpoint as vLLM would read it, decode it independently and "
      "compare it with --reference on the held-out split of --data (KL, top-1, perplexity, a "
      "greedy sample); exits non-zero when a gate fails");
  cmd->add_option("checkpoint", job.checkpoint, "exported checkpoint directory")->required();
  cmd->add_option("--reference", job.reference, "the unquantized source checkpoint")->required();
  add_data_options(cmd, job,
                   "text file (plain text or .jsonl); its last 10% of tokens are evaluated");
  cmd->add_option("--seqlen", job.seqlen, "tokens per window")
      ->check(CLI::Range(2, 1 << 20))
      ->capture_default_str();
  cmd->add_option("--max-seqs", job.max_seqs, "at most this many held-out windows (0: all)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  add_gate_options(cmd, job.gates);
  cmd->add_option("--json", args->json, "write the report as JSON here");
  cmd->add_option("--work", job.work,
                  "keep each held-out pass's layer boundaries here, so that a killed run given "
                  "the same directory resumes after its last finished layer (removed at the end)");
  add_serve_on_option(cmd, job.serve_on);
  cmd->add_option("--prompt", args->prompt,
                  "prompt of the greedy sample (default: the start of the held-out split)");
  cmd->callback([args] { run(*args); });
}

}  // namespace pq::cli
