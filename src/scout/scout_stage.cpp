// The scout stage: surrogates generate candidate assignments, measured held-out KL selects
// (PrismaSCOUT, ../shared/docs/method-facts.md §6; docs/scout.md describes each step).
#include "scout/scout_stage.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <set>
#include <utility>

#include "alloc/budget.h"
#include "alloc/knapsack.h"
#include "common/error.h"
#include "common/file_util.h"
#include "common/json_reader.h"
#include "common/location_lock.h"
#include "cost/cost_stage.h"
#include "data/token_dataset.h"
#include "export/linear_encoder.h"
#include "formats/weight_format.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "probe/fingerprint.h"
#include "probe/probe_stage.h"
#include "report/scout_report.h"
#include "runtime/model.h"
#include "runtime/weights.h"
#include "scout/frontier.h"
#include "scout/neighbourhood.h"
#include "scout/polish.h"
#include "tokenizer/tokenizer.h"

namespace pq::scout {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr std::string_view kScoutSchema = "prismaquant.scout/1";

// One knapsack decision as scout sees it: the cost-table Linears that must share a format (a
// sibling group, or a Linear alone) and every format of the menu all of them accept, by bytes.
struct Unit {
  std::string key;
  std::vector<std::size_t> members;  // cost-table rows
  std::vector<std::size_t> formats;  // cost-table format indices, bytes ascending
  std::vector<std::uint64_t> bytes;  // per entry of `formats`, summed over members
};

std::vector<Unit> make_units(const alloc::CostTable& table, const std::vector<std::size_t>& menu) {
  std::map<std::string, std::size_t> unit_of_key;
  std::vector<Unit> units;
  for (std::size_t i = 0; i < table.linears.size(); ++i) {
    const alloc::LinearCost& linear = table.linears[i];
    const std::string key = linear.group.empty() ? linear.name : linear.group;
    const auto [it, added] = unit_of_key.try_emplace(key, units.size());
    if (added) units.push_back({key, {}, {}, {}});
    units[it->second].members.push_back(i);
  }
  for (Unit& unit : units) {
    std::vector<std::pair<std::uint64_t, std::size_t>> options;
    for (const std::size_t f : menu) {
      std::uint64_t bytes = 0;
      bool accepted = true;
      for (const std::size_t m : unit.members) {
        const auto& cost = table.linears[m].costs[f];
        if (!cost)
          accepted = false;
        else
          bytes += cost->bytes;
      }
      if (accepted) options.emplace_back(bytes, f);
    }
    std::sort(options.begin(), options.end());
    for (const auto& [bytes, f] : options) {
      unit.formats.push_back(f);
      unit.bytes.push_back(bytes);
    }
  }
  return units;
}

// The surrogate of a unit at one of its options, summed over its members.
double unit_dloss(const alloc::CostTable& table, const Unit& unit, std::size_t option) {
  double sum = 0.0;
  for (const std::size_t m : unit.members) {
    sum += table.linears[m].costs[unit.formats[option]]->predicted_dloss;
  }
  return sum;
}

// Options next to `option` (one cheaper, one dearer) among `count`.
std::vector<std::size_t> neighbour_options(std::size_t option, std::size_t count) {
  std::vector<std::size_t> neighbours;
  if (option > 0) neighbours.push_back(option - 1);
  if (option + 1 < count) neighbours.push_back(option + 1);
  return neighbours;
}

// Share of parameters whose format differs between two assignments.
double weighted_hamming(const alloc::CostTable& table, const std::vector<std::size_t>& a,
                        const std::vector<std::size_t>& b) {
  std::uint64_t changed = 0;
  for (std::size_t i = 0; i < table.linears.size(); ++i) {
    if (a[i] != b[i]) changed += table.linears[i].params;
  }
  return static_cast<double>(changed) / static_cast<double>(table.quantizable_params());
}

double bits_of(std::uint64_t bytes, std::uint64_t params) {
  return 8.0 * static_cast<double>(bytes) / static_cast<double>(params);
}

// The whole run's state: the clean cost table, the evaluator and the candidates measured so far.
class Scout {
 public:
  explicit Scout(const ScoutJob& job);
  ScoutOutcome run();

 private:
  const Candidate& measure(std::string id, std::string stage, std::string budget,
                           std::vector<std::size_t> format_of_linear);
  KlMeasurement measure_assignment(const std::vector<std::size_t>& format_of_linear,
                                   const exporter::LinearEncoder& encoder, bool cached);
  exporter::QuantizedLinears quantized_linears(const std::vector<std::size_t>& format_of_linear,
                                               const exporter::LinearEncoder& encoder, bool cached);
  std::vector<std::size_t> solve(const alloc::CostTable& table, const alloc::BitsTarget& target);
  double predicted(const alloc::CostTable& table, const std::vector<std::size_t>& assignment) const;

  std::vector<std::size_t> run_l2(const alloc::BitsTarget& target, std::vector<std::size_t> start,
                                  alloc::CostTable& table_out, json& log);
  void run_l3(const alloc::BitsTarget& target, const std::vector<std::size_t>& start,
              const alloc::CostTable& table, json& log);
  std::size_t select(const alloc::BitsTarget& target, json& log);
  std::size_t polish(std::size_t pick, const alloc::BitsTarget& target, json& log);

  const ScoutJob& job_;
  fs::path out_;
  model::ModelConfig config_;
  io::Checkpoint checkpoint_;
  model::ModelSpec spec_;
  runtime::CheckpointWeightSource source_;
  alloc::CostTable table_;
  cost::Objective objective_ = cost::Objective::kFisher;
  std::vector<std::size_t> menu_;  // allowed cost-table format indices
  std::vector<Unit> units_;
  std::vector<std::size_t> spec_index_;  // per cost-table Linear
  std::uint64_t params_ = 0;
  exporter::NearestRounding nearest_;
  std::map<std::string, float> input_amax_;  // calibration amax per Linear (W4A4 input scales)
  std::string clean_probe_fingerprint_;      // input_amax_ came from it
  std::unique_ptr<exporter::LinearEncoder> encoder_;
  std::unique_ptr<KlEvaluator> evaluator_;
  // Decoded exporter weights per (cost-table Linear, format), shared by every candidate.
  std::map<std::pair<std::size_t, std::size_t>, exporter::DecodedLinear> decoded_;
  std::vector<Candidate> candidates_;
  std::map<std::vector<std::size_t>, std::size_t> candidate_of_assignment_;
  std::optional<double> spearman_;
};

Scout::Scout(const ScoutJob& job)
    : job_(job),
      out_(job.work / "scout"),
      config_(model::ModelConfig::load(job.model)),
      checkpoint_(io::Checkpoint::open(job.model)),
      spec_(model::build_model_spec(config_, checkpoint_, job.spec_options)),
      source_(checkpoint_) {
  runtime::require_runtime_support(config_);
  const fs::path cost_path = job.work / "cost" / "cost.json";
  PQ_CHECK(fs::is_regular_file(cost_path),
           "{}: not found; run `prismaquant probe` and `prismaquant cost` into {} first",
           cost_path.string(), job.work.string());
  table_ = alloc::read_cost_table(cost_path);
  const json cost_doc = read_json_file(cost_path);
  if (cost_doc.contains("meta") && cost_doc["meta"].contains("objective")) {
    const json& objective = cost_doc["meta"]["objective"];
    // get<std::string>() of another type would throw nlohmann's type_error, not a pq::Error.
    PQ_CHECK(objective.is_string(), "{}: meta.objective is not a string", cost_path.string());
    objective_ = cost::objective_by_name(objective.get<std::string>());
  }
  if (job.formats.empty()) {
    menu_.resize(table_.formats.size());
    std::iota(menu_.begin(), menu_.end(), 0);
  } else {
    // Aliases (MXFP8_E4M3) name the cost table's canonical formats.
    for (const std::string& name : job.formats) {
      menu_.push_back(table_.format_index(formats::format_by_name(name).name()));
    }
  }
  units_ = make_units(table_, menu_);
  for (const Unit& unit : units_) {
    PQ_CHECK(!unit.formats.empty(), "{}: no format of the menu fits every Linear of {}",
             cost_path.string(), unit.key);
  }
  for (const alloc::LinearCost& linear : table_.linears) {
    const model::Linear* found = spec_.find_linear(linear.name);
    PQ_CHECK(found != nullptr && found->is_candidate,
             "{}: Linear '{}' is not a candidate of {} (cost table of another model?)",
             cost_path.string(), linear.name, job.model.string());
    spec_index_.push_back(static_cast<std::size_t>(found - spec_.linears.data()));
  }
  params_ = table_.quantizable_params();

  const probe::ProbeResult clean_probe = probe::ProbeResult::read(job.work / "probe");
  clean_probe_fingerprint_ = clean_probe.fingerprint();
  input_amax_ = exporter::input_amax_from_probe(spec_, clean_probe);
  // Renders go to WORK/render, where quantize's measurement and export find them.
  encoder_ = std::make_unique<exporter::LinearEncoder>(
      spec_, checkpoint_, job.rounding != nullptr ? *job.rounding : nearest_, input_amax_,
      job.serve_on, job.work / "render");

  const data::TokenDataset dataset = data::load_token_dataset(
      job.data, job.token_ids, job.model, static_cast<std::int32_t>(config_.vocab_size));
  evaluator_ = std::make_unique<KlEvaluator>(
      config_, source_, dataset.heldout(job.heldout_windows, job.heldout_seqlen));
}

exporter::QuantizedLinears Scout::quantized_linears(
    const std::vector<std::size_t>& format_of_linear, const exporter::LinearEncoder& encoder,
    bool cached) {
  exporter::QuantizedLinears quantized;
  for (std::size_t i = 0; i < table_.linears.size(); ++i) {
    const formats::WeightFormat& format =
        formats::format_by_name(table_.formats[format_of_linear[i]]);
    if (!cached) {
      exporter::DecodedLinear decoded = exporter::decode_linear(encoder, spec_index_[i], format);
      quantized.set(table_.linears[i].name, std::move(decoded.weight),
                    std::move(decoded.activations));
      continue;
    }
    auto it = decoded_.find({i, format_of_linear[i]});
    if (it == decoded_.end()) {
      it = decoded_
               .emplace(std::make_pair(i, format_of_linear[i]),
                        exporter::decode_linear(encoder, spec_index_[i], format))
               .first;
    }
    quantized.set(table_.linears[i].name, it->second.weight, it->second.activations);
  }
  return quantized;
}

KlMeasurement Scout::measure_assignment(const std::vector<std::size_t>& format_of_linear,
                                        const exporter::LinearEncoder& encoder, bool cached) {
  const exporter::QuantizedLinears quantized = quantized_linears(format_of_linear, encoder, cached);
  return evaluator_->measure(&quantized, &quantized);
}

const Candidate& Scout::measure(std::string id, std::string stage, std::string budget,
                                std::vector<std::size_t> format_of_linear) {
  Candidate candidate;
  candidate.id = std::move(id);
  candidate.stage = std::move(stage);
  candidate.budget = std::move(budget);
  for (std::size_t i = 0; i < table_.linears.size(); ++i) {
    candidate.bytes += table_.linears[i].costs[format_of_linear[i]]->bytes;
  }
  candidate.bits = bits_of(candidate.bytes, params_);
  candidate.predicted_dloss = predicted(table_, format_of_linear);
  // The same assignment reached twice (an L2 pass that changes nothing) is measured once.
  if (const auto it = candidate_of_assignment_.find(format_of_linear);
      it != candidate_of_assignment_.end()) {
    candidate.measured = candidates_[it->second].measured;
  } else {
    candidate.measured = measure_assignment(format_of_linear, *encoder_, true);
    candidate_of_assignment_[format_of_linear] = candidates_.size();
  }
  candidate.format_of_linear = std::move(format_of_linear);
  fmt::print(stderr, "scout: {:<14} {:.4f} bits  KL {:.6f}  predicted dL {:.4g}\n", candidate.id,
             candidate.bits, candidate.measured.kl, candidate.predicted_dloss);
  candidates_.push_back(std::move(candidate));
  return candidates_.back();
}

std::vector<std::size_t> Scout::solve(const alloc::CostTable& table,
                                      const alloc::BitsTarget& target) {
  alloc::AllocatorOptions options;
  for (const std::size_t f : menu_) options.formats.push_back(table.formats[f]);
  const alloc::KnapsackAllocator allocator(table, options);
  const std::uint64_t budget = target.budget_bytes(params_);
  PQ_CHECK(budget >= allocator.min_bytes(),
           "scout: budget {} bits is infeasible: the minimum achievable is {:.4f} bits per "
           "quantizable parameter",
           target.text, bits_of(allocator.min_bytes(), params_));
  return allocator.solve(budget).format_of_linear;
}

double Scout::predicted(const alloc::CostTable& table,
                        const std::vector<std::size_t>& assignment) const {
  double sum = 0.0;
  for (std::size_t i = 0; i < table.linears.size(); ++i) {
    sum += table.linears[i].costs[assignment[i]]->predicted_dloss;
  }
  return sum;
}

// L2 (method-facts.md §6, "perturbed-X fixed point"): probe the model as the current assignment
// runs it, so each Linear's statistics come from the activations the quantized layers before it
// produce; re-cost, re-solve at the same budget, and repeat until few parameters change format.
// Successive cost tables are smoothed with an exponential moving average (decay 0.5, as
// upstream) to damp 2-cycles.
std::vector<std::size_t> Scout::run_l2(const alloc::BitsTarget& target,
                                       std::vector<std::size_t> start, alloc::CostTable& table_out,
                                       json& log) {
  std::vector<std::size_t> current = std::move(start);
  std::optional<alloc::CostTable> smoothed;
  json passes = json::array();
  bool converged = false;
  for (std::size_t pass = 1; pass <= job_.l2_max_passes; ++pass) {
    const exporter::QuantizedLinears quantized = quantized_linears(current, *encoder_, true);
    probe::Fingerprint tag;
    // The weights depend on the rounding, the assignment, and for W4A4 on the clean probe's
    // input amax.
    tag.field("rounding", encoder_->rounding().name());
    tag.field("clean_probe", clean_probe_fingerprint_);
    for (std::size_t i = 0; i < table_.linears.size(); ++i) {
      tag.field(table_.linears[i].name, table_.formats[current[i]]);
    }
    const fs::path pass_dir = out_ / "l2" / target.text / fmt::format("pass{}", pass);
    probe::ProbeJob probe_job;
    probe_job.model = job_.model;
    probe_job.data = job_.data;
    probe_job.token_ids = job_.token_ids;
    probe_job.out = pass_dir / "probe";
    probe_job.nsamples = job_.l2_nsamples;
    probe_job.seqlen = job_.l2_seqlen;
    probe_job.seed = job_.seed;
    probe_job.spec_options = job_.spec_options;
    probe_job.quantized = probe::QuantizedRun{&quantized, &quantized, tag.hex()};
    probe::run_probe(probe_job);

    cost::CostJob cost_job;
    cost_job.model = job_.model;
    cost_job.probe = probe_job.out;
    cost_job.out = pass_dir / "cost";
    cost_job.formats = table_.formats;
    // The KL-Fisher cost probes the source model's own KL; at the quantized fixed point the
    // sensitivities are re-estimated with the Fisher trace.
    cost_job.objective =
        objective_ == cost::Objective::kKlFisher ? cost::Objective::kFisher : objective_;
    cost_job.spec_options = job_.spec_options;
    cost_job.serve_on = job_.serve_on;
    alloc::CostTable table = cost::run_cost(cost_job).table;
    if (smoothed) {
      for (std::size_t i = 0; i < table.linears.size(); ++i) {
        for (std::size_t f = 0; f < table.formats.size(); ++f) {
          auto& now = table.linears[i].costs[f];
          const auto& before = smoothed->linears[i].costs[f];
          if (now && before)
            now->predicted_dloss = 0.5 * now->predicted_dloss + 0.5 * before->predicted_dloss;
        }
      }
    }
    std::vector<std::size_t> next = solve(table, target);
    const double hamming = weighted_hamming(table_, current, next);
    smoothed = std::move(table);
    current = std::move(next);
    const Candidate& measured =
        measure(fmt::format("L2@{}/{}", target.text, pass), "L2", target.text, current);
    passes.push_back({{"pass", pass},
                      {"candidate", measured.id},
                      {"weighted_hamming", hamming},
                      {"kl", measured.measured.kl}});
    if (hamming < job_.l2_threshold) {
      converged = true;
      break;
    }
  }
  log = {{"budget", target.text}, {"passes", passes}, {"converged", converged}};
  if (smoothed) table_out = std::move(*smoothed);
  return current;
}

// L3 (method-facts.md §6, "propagated end-KL"): for a bounded set of uncertain units, measure KL
// with the unit flipped one format down and one up while the rest stay fixed; replace the
// surrogate of those options by the measured change (converted to surrogate units with the
// assignment's surrogate-to-KL ratio), re-solve, and keep the result only if measured KL drops
// (upstream's real-KL gate).
void Scout::run_l3(const alloc::BitsTarget& target, const std::vector<std::size_t>& start,
                   const alloc::CostTable& table, json& log) {
  const Candidate& base = candidates_[candidate_of_assignment_.at(start)];
  const double base_kl = base.measured.kl;
  const std::string base_id = base.id;
  std::vector<UnitOptions> options(units_.size());
  for (std::size_t u = 0; u < units_.size(); ++u) {
    const Unit& unit = units_[u];
    options[u].bytes = unit.bytes;
    for (std::size_t o = 0; o < unit.formats.size(); ++o) {
      options[u].dloss.push_back(unit_dloss(table, unit, o));
      if (unit.formats[o] == start[unit.members.front()]) options[u].current = o;
    }
  }
  const std::vector<std::size_t> chosen = uncertain_units(options, job_.l3_items);

  // Surrogate units per nat of measured KL at the start assignment.
  const double scale = predicted(table, start) / base_kl;
  alloc::CostTable measured_table = table;
  json flips = json::array();
  std::vector<double> predicted_delta, measured_delta;
  json units = json::array();
  for (const std::size_t u : chosen) {
    const UnitOptions& s = options[u];
    const Unit& unit = units_[u];
    units.push_back(unit.key);
    for (const std::size_t to : neighbour_options(s.current, unit.formats.size())) {
      std::vector<std::size_t> flipped = start;
      for (const std::size_t m : unit.members) flipped[m] = unit.formats[to];
      const double kl = measure_assignment(flipped, *encoder_, true).kl;
      const double predicted_change = s.dloss[to] - s.dloss[s.current];
      const double measured_change = kl - base_kl;
      predicted_delta.push_back(predicted_change);
      measured_delta.push_back(measured_change);
      flips.push_back({{"unit", unit.key},
                       {"from", table_.formats[unit.formats[s.current]]},
                       {"to", table_.formats[unit.formats[to]]},
                       {"bytes_change", static_cast<std::int64_t>(unit.bytes[to]) -
                                            static_cast<std::int64_t>(unit.bytes[s.current])},
                       {"predicted_dloss_change", predicted_change},
                       {"kl", kl},
                       {"measured_kl_change", measured_change}});
      if (!(std::isfinite(scale) && scale > 0.0)) continue;
      const double replaced = std::max(0.0, s.dloss[s.current] + scale * measured_change);
      for (const std::size_t m : unit.members) {
        auto& cost = measured_table.linears[m].costs[unit.formats[to]];
        cost->predicted_dloss = s.dloss[to] > 0.0
                                    ? cost->predicted_dloss * replaced / s.dloss[to]
                                    : replaced / static_cast<double>(unit.members.size());
      }
    }
  }
  spearman_ = spearman(predicted_delta, measured_delta);
  const Candidate& l3 =
      measure(fmt::format("L3@{}", target.text), "L3", target.text, solve(measured_table, target));
  const bool kept = l3.measured.kl < base_kl;
  log = {{"budget", target.text},
         {"start", base_id},
         {"start_kl", base_kl},
         {"surrogate_per_kl", scale},
         {"marginal_rate", marginal_rate(options)},
         {"units", units},
         {"flips", flips},
         {"spearman", spearman_ ? json(*spearman_) : json(nullptr)},
         {"candidate", l3.id},
         {"kl", l3.measured.kl},
         {"gate", kept ? "kept: measured KL dropped" : "rolled back: measured KL did not drop"}};
}

// The validated frontier (method-facts.md §6): non-dominated measured candidates, the knee on the
// measured curve, bisection of the widest gap beside it, a leave-one-out check; the pick must fit
// the target budget.
std::size_t Scout::select(const alloc::BitsTarget& target, json& log) {
  const std::uint64_t budget = target.budget_bytes(params_);
  const auto frontier_now = [&](std::vector<std::size_t>& ids) {
    std::vector<MeasuredPoint> all;
    for (const Candidate& c : candidates_) all.push_back({c.bits, c.measured.kl});
    ids = non_dominated(all);
    std::vector<MeasuredPoint> points;
    for (const std::size_t i : ids) points.push_back(all[i]);
    return points;
  };
  std::vector<std::size_t> ids;
  std::vector<MeasuredPoint> frontier = frontier_now(ids);
  std::optional<std::size_t> knee = frontier_knee(frontier);
  json bisections = json::array();
  for (std::size_t step = 0; knee && step < job_.max_bisections; ++step) {
    const std::optional<FrontierGap> gap = largest_gap_beside(frontier, *knee);
    if (!gap || gap->width() < job_.bisect_min_gap) break;
    const alloc::BitsTarget middle =
        alloc::parse_bits_target(fmt::format("{:.4f}", gap->midpoint()));
    const Candidate& added = measure(fmt::format("bisect@{}", middle.text), "bisect", middle.text,
                                     solve(table_, middle));
    bisections.push_back(
        {{"between", {candidates_[ids[gap->left]].id, candidates_[ids[gap->right]].id}},
         {"candidate", added.id},
         {"bits", added.bits},
         {"kl", added.measured.kl}});
    frontier = frontier_now(ids);
    knee = frontier_knee(frontier);
  }
  json frontier_ids = json::array();
  for (const std::size_t i : ids) frontier_ids.push_back(candidates_[i].id);
  log = {{"frontier", frontier_ids}, {"bisections", bisections}};

  // The lowest-KL frontier point within budget: the fallback.
  std::optional<std::size_t> best;
  for (const std::size_t i : ids) {
    if (candidates_[i].bytes <= budget &&
        (!best || candidates_[i].measured.kl < candidates_[*best].measured.kl)) {
      best = i;
    }
  }
  PQ_CHECK(best.has_value(), "scout: no measured candidate fits the target of {} bits",
           target.text);
  if (!knee) {
    log["knee"] = nullptr;
    log["pick"] = {{"candidate", candidates_[*best].id},
                   {"reason", "fewer than 3 frontier points: lowest KL within the target"}};
    return *best;
  }
  const LeaveOneOut loo = leave_one_out(frontier, *knee);
  json moved = json::array();
  for (const std::size_t i : loo.moved_by) moved.push_back(candidates_[ids[i]].id);
  const std::size_t knee_candidate = ids[*knee];
  log["knee"] = candidates_[knee_candidate].id;
  log["leave_one_out"] = {{"stable", loo.stable}, {"moved_by", moved}};
  std::string reason;
  std::size_t pick = *best;
  if (!loo.stable) {
    reason = "knee unstable under leave-one-out: lowest KL within the target";
  } else if (candidates_[knee_candidate].bytes > budget) {
    reason = "knee above the target: lowest KL within the target";
  } else {
    pick = knee_candidate;
    reason = "stable knee within the target";
  }
  log["pick"] = {{"candidate", candidates_[pick].id}, {"reason", reason}};
  return pick;
}

// Coordinate descent on the pick (method-facts.md §6, "coord-descent polish"): single-unit flips
// within the target budget, accepted only when measured KL strictly drops.
std::size_t Scout::polish(std::size_t pick, const alloc::BitsTarget& target, json& log) {
  PolishProblem problem;
  problem.budget_bytes = target.budget_bytes(params_);
  std::vector<std::size_t> start(units_.size());
  const std::vector<std::size_t> picked = candidates_[pick].format_of_linear;
  for (std::size_t u = 0; u < units_.size(); ++u) {
    const Unit& unit = units_[u];
    problem.option_bytes.push_back(unit.bytes);
    const auto it =
        std::find(unit.formats.begin(), unit.formats.end(), picked[unit.members.front()]);
    start[u] = static_cast<std::size_t>(it - unit.formats.begin());
  }
  const auto assignment_of = [&](const std::vector<std::size_t>& choice) {
    std::vector<std::size_t> assignment(table_.linears.size());
    for (std::size_t u = 0; u < units_.size(); ++u) {
      for (const std::size_t m : units_[u].members) assignment[m] = units_[u].formats[choice[u]];
    }
    return assignment;
  };
  PolishOptions options;
  options.max_evaluations = job_.polish_max_evaluations;
  options.max_sweeps = job_.polish_max_sweeps;
  // Units whose cheapest feasible flip the surrogate rates least harmful first: where it is
  // most likely wrong about the sign, measurement most likely finds a gain.
  std::vector<double> least_harm(units_.size(), std::numeric_limits<double>::infinity());
  const std::uint64_t spare = problem.budget_bytes - candidates_[pick].bytes;
  for (std::size_t u = 0; u < units_.size(); ++u) {
    const Unit& unit = units_[u];
    for (const std::size_t to : neighbour_options(start[u], unit.formats.size())) {
      if (unit.bytes[to] > unit.bytes[start[u]] + spare) continue;
      least_harm[u] = std::min(least_harm[u],
                               unit_dloss(table_, unit, to) - unit_dloss(table_, unit, start[u]));
    }
  }
  options.item_order.resize(units_.size());
  std::iota(options.item_order.begin(), options.item_order.end(), 0);
  std::stable_sort(options.item_order.begin(), options.item_order.end(),
                   [&](std::size_t a, std::size_t b) { return least_harm[a] < least_harm[b]; });
  const PolishResult result = coordinate_descent(
      problem, start, candidates_[pick].measured.kl,
      [&](const std::vector<std::size_t>& choice) {
        return measure_assignment(assignment_of(choice), *encoder_, true).kl;
      },
      options);
  json trials = json::array();
  for (const PolishTrial& t : result.trials) {
    const Unit& unit = units_[t.item];
    trials.push_back({{"unit", unit.key},
                      {"from", table_.formats[unit.formats[t.from]]},
                      {"to", table_.formats[unit.formats[t.to]]},
                      {"kl_before", t.kl_before},
                      {"kl", t.kl_after},
                      {"accepted", t.accepted}});
  }
  const Candidate& polished =
      measure("polish", "polish", target.text, assignment_of(result.choice));
  log = {{"start", candidates_[pick].id},
         {"start_kl", candidates_[pick].measured.kl},
         {"kl", polished.measured.kl},
         {"trials", trials}};
  return candidates_.size() - 1;
}

json candidate_json(const Candidate& c) {
  return {{"id", c.id},
          {"stage", c.stage},
          {"budget", c.budget},
          {"bits", c.bits},
          {"bytes", c.bytes},
          {"predicted_dloss", c.predicted_dloss},
          {"kl", c.measured.kl},
          {"nll", c.measured.nll},
          {"top1_agreement", c.measured.top1_agreement}};
}

ScoutOutcome Scout::run() {
  const auto started = std::chrono::steady_clock::now();
  const alloc::BitsTarget target = alloc::parse_bits_target(job_.target);
  std::vector<alloc::BitsTarget> anchors;
  for (const std::string& text : job_.budgets) anchors.push_back(alloc::parse_bits_target(text));
  if (std::none_of(anchors.begin(), anchors.end(),
                   [&](const alloc::BitsTarget& b) { return b.text == target.text; })) {
    anchors.push_back(target);
  }
  std::sort(anchors.begin(), anchors.end(),
            [](const auto& a, const auto& b) { return a.value < b.value; });
  // Anchors below the smallest achievable size are skipped (the target itself must be feasible:
  // solve() says why not).
  json skipped = json::array();
  {
    alloc::AllocatorOptions options;
    for (const std::size_t f : menu_) options.formats.push_back(table_.formats[f]);
    const std::uint64_t min_bytes = alloc::KnapsackAllocator(table_, options).min_bytes();
    std::erase_if(anchors, [&](const alloc::BitsTarget& anchor) {
      if (anchor.text == target.text || anchor.budget_bytes(params_) >= min_bytes) return false;
      skipped.push_back(anchor.text);
      return true;
    });
  }

  json report = {{"schema", kScoutSchema},
                 {"model", probe::model_label(job_.model)},
                 {"rounding", encoder_->rounding().name()},
                 {"target", target.text},
                 {"heldout",
                  {{"windows", evaluator_->windows()},
                   {"seqlen", evaluator_->window_length()},
                   {"reference_nll", evaluator_->reference_nll()},
                   {"reference_bytes", evaluator_->reference_bytes()}}}};
  json menu = json::array();
  for (const std::size_t f : menu_) menu.push_back(table_.formats[f]);
  report["formats"] = menu;
  report["infeasible_anchors"] = std::move(skipped);

  // L1: the allocator at every anchor; L2 from each. At the target, L3 starts from whichever of
  // L1 and L2 measures lower (the real-KL gate applied to L2 as well), with the cost table that
  // produced it.
  std::vector<std::size_t> l3_start;
  alloc::CostTable l3_table = table_;
  json l2_logs = json::array();
  for (const alloc::BitsTarget& anchor : anchors) {
    const std::vector<std::size_t> l1 = solve(table_, anchor);
    const double l1_kl =
        measure(fmt::format("L1@{}", anchor.text), "L1", anchor.text, l1).measured.kl;
    if (job_.l2_max_passes == 0) {
      if (anchor.text == target.text) l3_start = l1;
      continue;
    }
    json log;
    alloc::CostTable l2_table;
    const std::vector<std::size_t> l2 = run_l2(anchor, l1, l2_table, log);
    const bool l2_better = candidates_.back().measured.kl < l1_kl;
    log["gate"] = l2_better ? "L2 kept: measured KL below L1" : "L1 kept: L2 measured no lower";
    l2_logs.push_back(std::move(log));
    if (anchor.text == target.text) {
      l3_start = l2_better ? l2 : l1;
      if (l2_better) l3_table = std::move(l2_table);
    }
  }
  report["l2"] = l2_logs;
  if (job_.l3_items > 0) {
    json log;
    run_l3(target, l3_start, l3_table, log);
    report["l3"] = std::move(log);
  }

  json selection;
  const std::size_t pick = select(target, selection);
  report["selection"] = std::move(selection);
  json polish_log;
  const std::size_t chosen = polish(pick, target, polish_log);
  report["polish"] = std::move(polish_log);

  ScoutOutcome outcome;
  outcome.picked = pick;
  outcome.chosen = chosen;
  outcome.spearman = spearman_;

  std::vector<MeasuredPoint> all;
  for (const Candidate& c : candidates_) all.push_back({c.bits, c.measured.kl});
  std::vector<MeasuredPoint> frontier;
  for (const std::size_t i : non_dominated(all)) frontier.push_back(all[i]);
  if (!job_.uniform_baseline.empty()) {
    const std::size_t f = table_.format_index(job_.uniform_baseline);
    std::vector<std::size_t> uniform(table_.linears.size(), f);
    std::uint64_t bytes = 0;
    bool fits = true;
    for (std::size_t i = 0; i < table_.linears.size(); ++i) {
      const auto& cost = table_.linears[i].costs[f];
      if (!cost)
        fits = false;
      else
        bytes += cost->bytes;
    }
    PQ_CHECK(fits, "scout: the uniform baseline {} does not fit every Linear",
             job_.uniform_baseline);
    // Plain rounding, whatever the job's rounding: the baseline is naive uniform quantization.
    const exporter::LinearEncoder plain(spec_, checkpoint_, nearest_, input_amax_, job_.serve_on);
    outcome.uniform = measure_assignment(uniform, plain, false);
    outcome.uniform_bits = bits_of(bytes, params_);
    const std::optional<double> match = bits_to_reach(frontier, outcome.uniform->kl);
    report["uniform"] = {
        {"format", job_.uniform_baseline},
        {"rounding", nearest_.name()},
        {"bits", *outcome.uniform_bits},
        {"kl", outcome.uniform->kl},
        {"nll", outcome.uniform->nll},
        {"top1_agreement", outcome.uniform->top1_agreement},
        {"kl_ratio_to_chosen", outcome.uniform->kl / candidates_[chosen].measured.kl},
        {"frontier_bits_to_match", match ? json(*match) : json(nullptr)}};
  }

  json candidates = json::array();
  for (const Candidate& c : candidates_) candidates.push_back(candidate_json(c));
  report["candidates"] = candidates;
  report["picked"] = candidates_[pick].id;
  report["chosen"] = candidate_json(candidates_[chosen]);

  alloc::Allocation allocation;
  allocation.format_of_linear = candidates_[chosen].format_of_linear;
  allocation.budget_bytes = target.budget_bytes(params_);
  allocation.bytes = candidates_[chosen].bytes;
  allocation.predicted_dloss = candidates_[chosen].predicted_dloss;
  // Chosen by measured KL, not by the DP: no optimality claim about the surrogate.
  allocation.resolution.exact = false;
  outcome.assignment = alloc::make_assignment_file(
      table_, allocation, {"bits_per_param", target.text, allocation.budget_bytes});

  outcome.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  report["seconds"] = outcome.seconds;

  std::vector<report::ScoutPlotPoint> plot;
  for (const Candidate& c : candidates_) {
    plot.push_back(
        {c.id, c.stage, c.bits, c.predicted_dloss, c.measured.kl, &c == &candidates_[chosen]});
  }
  std::error_code error;
  fs::create_directories(out_, error);
  PQ_CHECK(!error, "{}: cannot create the output directory: {}", out_.string(), error.message());
  write_text_file_atomic(out_ / "scout.svg", report::scout_svg(plot));
  alloc::write_assignment(out_ / "assignment.json", outcome.assignment);
  write_text_file_atomic(out_ / "scout.json", report.dump(1) + "\n");

  outcome.candidates = std::move(candidates_);
  outcome.report = std::move(report);
  return outcome;
}

}  // namespace

ScoutOutcome run_scout(const ScoutJob& job) {
  PQ_CHECK(job.heldout_windows > 0 && job.heldout_seqlen >= 2,
           "scout: --heldout-windows must be positive and --heldout-seqlen at least 2");
  PQ_CHECK(fs::is_regular_file(job.data), "{}: data file not found", job.data.string());
  const LocationLock lock(job.work);
  Scout scout(job);
  return scout.run();
}

std::string summarize_outcome(const ScoutOutcome& outcome) {
  std::string text =
      fmt::format("{:<16} {:>8} {:>10} {:>12}\n", "candidate", "bits", "KL", "predicted dL");
  for (const Candidate& c : outcome.candidates) {
    text += fmt::format("{:<16} {:>8.4f} {:>10.6f} {:>12.4g}\n", c.id, c.bits, c.measured.kl,
                        c.predicted_dloss);
  }
  const Candidate& chosen = outcome.candidates[outcome.chosen];
  text +=
      fmt::format("picked {} (KL {:.6f}); shipped after polish: {:.4f} bits, KL {:.6f}\n",
                  outcome.candidates[outcome.picked].id,
                  outcome.candidates[outcome.picked].measured.kl, chosen.bits, chosen.measured.kl);
  if (outcome.uniform) {
    text += fmt::format("uniform baseline: {:.4f} bits, KL {:.6f} ({:.1f}x the shipped KL)\n",
                        *outcome.uniform_bits, outcome.uniform->kl,
                        outcome.uniform->kl / chosen.measured.kl);
  }
  if (outcome.spearman) {
    text += fmt::format("L3 single flips: Spearman(predicted dL, measured KL) = {:.3f}\n",
                        *outcome.spearman);
  }
  text += fmt::format("{:.1f} s\n", outcome.seconds);
  return text;
}

}  // namespace pq::scout
