#pragma once

#include <CLI/CLI.hpp>

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

}  // namespace pq::cli
