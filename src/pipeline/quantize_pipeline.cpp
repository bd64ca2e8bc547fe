#include "pipeline/quantize_pipeline.h"

#include <fmt/format.h>

#include <chrono>
#include <cmath>

#include "alloc/budget.h"
#include "common/error.h"
#include "common/progress.h"

namespace pq::pipeline {

namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

std::string default_pareto_targets(const std::string& target_bits) {
  const alloc::BitsTarget target = alloc::parse_bits_target(target_bits);
  std::vector<alloc::BitsTarget> ladder = alloc::parse_bits_targets("4,4.25,4.5,4.75,5,5.5,6,7,8");
  std::string list;
  bool listed = false;
  for (const alloc::BitsTarget& rung : ladder) {
    // Compare the exact decimals (4.75 and 4.750 are the same target).
    listed = listed || std::abs(rung.value - target.value) < 1e-12;
    list += (list.empty() ? "" : ",") + rung.text;
  }
  if (!listed) list += "," + target.text;
  return list;
}

QuantizeOutcome run_quantize(const QuantizeJob& job) {
  const std::filesystem::path work = job.work.value_or(job.out / "work");
  QuantizeOutcome outcome;

  auto start = std::chrono::steady_clock::now();
  probe::ProbeJob probe_job;
  probe_job.model = job.model;
  probe_job.out = work / "probe";
  if (job.data) {
    probe_job.data = *job.data;
    probe_job.nsamples = job.nsamples;
    probe_job.seqlen = job.seqlen;
    probe_job.seed = job.seed;
    probe_job.importance_weighting = job.importance_weighting;
    probe_job.batch_size = job.batch_size;
    const probe::ProbeOutcome probed = probe::run_probe(probe_job);
    PQ_CHECK(probed.complete, "probe stopped before the end");
    outcome.stages.push_back({"probe", seconds_since(start), probed.reused});
  } else {
    PQ_CHECK(std::filesystem::exists(probe_job.out / "probe.json"),
             "{}: no finished probe; give --data FILE to calibrate", probe_job.out.string());
    outcome.stages.push_back({"probe", 0.0, true});
  }

  start = std::chrono::steady_clock::now();
  cost::CostJob cost_job;
  cost_job.model = job.model;
  cost_job.probe = probe_job.out;
  cost_job.out = work / "cost";
  cost_job.formats = job.formats;
  cost_job.objective = job.objective;
  const cost::CostOutcome costed = cost::run_cost(cost_job);
  outcome.stages.push_back({"cost", seconds_since(start), costed.reused});

  start = std::chrono::steady_clock::now();
  alloc::AllocateJob allocate_job;
  allocate_job.cost = cost_job.out;
  allocate_job.out = job.out;
  allocate_job.target_bits = job.target_bits;
  allocate_job.pareto = job.pareto.value_or(default_pareto_targets(job.target_bits));
  ProgressBar progress("allocate", 1);
  outcome.allocation = alloc::run_allocate(allocate_job);
  progress.advance();
  progress.finish();
  outcome.stages.push_back({"allocate", seconds_since(start), false});
  return outcome;
}

}  // namespace pq::pipeline
