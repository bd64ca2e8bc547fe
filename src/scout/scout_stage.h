#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "alloc/assignment.h"
#include "export/rounding.h"
#include "formats/serving.h"
#include "model/model_spec.h"
#include "scout/kl_evaluator.h"

namespace pq::scout {

// What `prismaquant scout` was asked to do (docs/scout.md).
struct ScoutJob {
  std::filesystem::path model;  // HF checkpoint directory
  // Text whose held-out split (the last 10% of its tokens, data::TokenDataset) is where KL is
  // measured, and whose calibration split feeds the perturbed probes of L2. Use the file the
  // probe calibrated on, so the held-out windows are text the cost stages never saw.
  std::filesystem::path data;
  bool token_ids = false;  // `data` holds whitespace-separated token ids, not text
  // WORK: reads WORK/probe (clean probe) and WORK/cost/cost.json; writes WORK/scout/, and the
  // encodings it renders to WORK/render/ (exporter::RenderCache) for quantize and export.
  std::filesystem::path work;
  std::vector<std::string> formats;  // restrict the cost table's menu; empty: all of it
  // The target the cost table was made for (cost::CostJob::serve_on); L2's re-costs use it too.
  formats::ServingTarget serve_on = formats::ServingTarget::kBlackwell;
  std::vector<std::string> budgets = {"4.5", "4.75", "5", "5.5", "6"};  // L1 anchors, bits/param
  std::string target = "4.75";  // bits per quantizable parameter the pick must fit
  // How Linears are encoded, as the exporter will (GPTQ plugs in here); null: nearest rounding.
  const exporter::RoundingStrategy* rounding = nullptr;

  std::size_t heldout_windows = 8;
  std::size_t heldout_seqlen = 256;

  // L2, the perturbed fixed point: probe passes at each anchor budget (0 disables L2).
  std::size_t l2_max_passes = 3;
  double l2_threshold = 0.01;  // stop when this share of parameters (or less) changes format
  std::size_t l2_nsamples = 8;
  std::size_t l2_seqlen = 256;
  std::uint64_t seed = 42;

  // L3, measured flips at the target budget: how many uncertain items are measured (0 disables).
  std::size_t l3_items = 8;

  // Validated frontier: bisect the widest gap beside the knee while wider than this (bits).
  double bisect_min_gap = 0.05;
  std::size_t max_bisections = 3;

  // Polish: coordinate descent within the target budget.
  std::size_t polish_max_evaluations = 48;
  std::size_t polish_max_sweeps = 2;

  // Format every candidate Linear gets in the uniform baseline (plain rounding); empty: none.
  std::string uniform_baseline = "NVFP4";
  model::SpecOptions spec_options;
};

// One measured assignment.
struct Candidate {
  std::string id;      // unique, e.g. "L1@4.75", "L2@4.75/2", "L3@4.75", "bisect@5.125", "polish"
  std::string stage;   // L1, L2, L3, bisect, polish
  std::string budget;  // the bits target it was solved for
  std::vector<std::size_t> format_of_linear;  // per cost-table Linear, index into its formats
  std::uint64_t bytes = 0;                    // quantizable bytes
  double bits = 0.0;                          // per quantizable parameter
  double predicted_dloss = 0.0;               // summed surrogate of the clean cost table
  KlMeasurement measured;
};

struct ScoutOutcome {
  std::vector<Candidate> candidates;
  std::size_t picked = 0;  // index into candidates: the frontier's choice, before polish
  std::size_t chosen = 0;  // index into candidates: what ships (the polished pick)
  alloc::AssignmentFile assignment;
  std::optional<KlMeasurement> uniform;  // the uniform baseline
  std::optional<double> uniform_bits;
  std::optional<double> spearman;  // predicted dL vs measured KL delta of L3's single flips
  nlohmann::json report;           // scout.json
  double seconds = 0.0;
};

// Runs L1, L2, L3, the validated frontier and the polish, and writes WORK/scout/scout.json,
// scout.svg and assignment.json (alloc's schema), each atomically. pq::Error on bad input.
ScoutOutcome run_scout(const ScoutJob& job);

// A few lines for the terminal: every candidate's bits and KL, the pick and the shipped choice.
std::string summarize_outcome(const ScoutOutcome& outcome);

}  // namespace pq::scout
