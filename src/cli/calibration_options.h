#pragma once

#include <CLI/CLI.hpp>
#include <string>

namespace pq::cli {

// The calibration-window options shared by `probe` and `quantize` (their jobs carry the same
// four fields: nsamples, seqlen, seed, batch_size).
template <typename Job>
void add_calibration_options(CLI::App* cmd, Job& job) {
  cmd->add_option("--nsamples", job.nsamples, "Calibration sequences")
      ->default_val(job.nsamples)
      ->check(CLI::PositiveNumber);
  cmd->add_option("--seqlen", job.seqlen, "Tokens per sequence")
      ->default_val(job.seqlen)
      ->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--seed", job.seed, "Seed of the window draw")->default_val(job.seed);
  cmd->add_option("--batch-size", job.batch_size,
                  "Sequences per micro-batch (how many go through a layer at once)")
      ->default_val(job.batch_size)
      ->check(CLI::PositiveNumber);
}

// The data options of the stages that read calibration or evaluation data: exactly one of --data
// (text, tokenized with the checkpoint's tokenizer.json) and --token-ids (whitespace-separated
// token ids, for checkpoints without a tokenizer); the job carries the file in `data` and which it
// is in `token_ids`.
template <typename Job>
void add_data_options(CLI::App* cmd, Job& job, const std::string& text_description) {
  CLI::Option_group* group = cmd->add_option_group("data", "Data: text or token ids");
  group->add_option("--data", job.data, text_description);
  group->add_option_function<std::string>(
      "--token-ids",
      [&job](const std::string& path) {
        job.data = path;
        job.token_ids = true;
      },
      "File of whitespace-separated token ids, read as --data's tokens (checkpoints without "
      "tokenizer.json)");
  group->require_option(1);
}

}  // namespace pq::cli
