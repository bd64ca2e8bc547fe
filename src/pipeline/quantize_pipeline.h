#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "alloc/allocate_stage.h"
#include "cost/cost_stage.h"
#include "probe/probe_stage.h"

namespace pq::pipeline {

// What `prismaquant quantize` was asked to do.
struct QuantizeJob {
  std::filesystem::path model;
  std::filesystem::path out;                  // receives assignment.json, pareto.csv/svg
  std::optional<std::filesystem::path> work;  // stage artifacts; default out/work
  std::optional<std::filesystem::path> data;  // calibration text; without it, the work dir's
                                              // finished probe is used as it is
  std::vector<std::string> formats = {"NVFP4", "MXFP8_E4M3", "BF16"};
  std::string target_bits = "4.75";
  std::optional<std::string> pareto;  // default: a ladder from 4 to 8 bits plus the target
  std::size_t nsamples = 32;
  std::size_t seqlen = 1024;
  std::uint64_t seed = 42;
  bool importance_weighting = true;
  std::size_t batch_size = 4;
  cost::Objective objective = cost::Objective::kFisher;
};

struct StageReport {
  std::string stage;
  double seconds = 0.0;
  bool reused = false;
};

struct QuantizeOutcome {
  std::vector<StageReport> stages;
  alloc::AllocateOutcome allocation;
};

// probe -> cost -> allocate in the work directory. Each stage's artifact stores the fingerprint
// of its inputs and options; a stage whose artifact matches is skipped.
QuantizeOutcome run_quantize(const QuantizeJob& job);

// The default Pareto targets for a main target: 4, 4.25, 4.5, 4.75, 5, 5.5, 6, 7, 8 and the
// target itself.
std::string default_pareto_targets(const std::string& target_bits);

}  // namespace pq::pipeline
