#pragma once

#include <CLI/CLI.hpp>

#include "validate/validate.h"

namespace pq::cli {

// validate's quality gates as options, shared by `validate` and `quantize`.
inline void add_gate_options(CLI::App* cmd, validate::Gates& gates) {
  cmd->add_option("--max-kl", gates.max_kl, "gate: largest mean KL in nats")
      ->default_val(gates.max_kl)
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--min-top1", gates.min_top1, "gate: smallest top-1 agreement")
      ->default_val(gates.min_top1)
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--max-ppl-ratio", gates.max_ppl_ratio,
                  "gate: largest perplexity / reference perplexity")
      ->default_val(gates.max_ppl_ratio)
      ->check(CLI::PositiveNumber);
}

}  // namespace pq::cli
