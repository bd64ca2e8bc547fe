// pq_objectives: compares cost objectives by what they ship (issue 15, docs/probe-artifacts.md
// "Which objective"). For one model, calibration and format menu it probes once, builds one cost
// table per objective, allocates each at every budget, and measures the shipped assignments'
// held-out KL with the exporter's weights (one rounding for all, so only the choice differs). Then,
// from one base assignment, it flips single sibling groups to another format and ranks each
// objective's predicted change against the measured change (Spearman).
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "alloc/allocate_stage.h"
#include "alloc/cost_table.h"
#include "common/error.h"
#include "common/file_util.h"
#include "cost/cost_stage.h"
#include "data/splitmix64.h"
#include "export/gptq.h"
#include "export/linear_encoder.h"
#include "model/config.h"
#include "model/model_spec.h"
#include "pipeline/measure.h"
#include "probe/probe_stage.h"
#include "runtime/checkpoint_model.h"
#include "runtime/evaluate.h"
#include "scout/frontier.h"

namespace {

using namespace pq;

// Name -> format of an assignment.
std::map<std::string, std::string> formats_of(const alloc::AssignmentFile& assignment) {
  std::map<std::string, std::string> format_of;
  for (const alloc::AssignedLinear& linear : assignment.linears) {
    format_of[linear.name] = linear.format;
  }
  return format_of;
}

// The predicted change of a flip under one cost table: the sum over the flipped Linears of
// predicted_dloss(new) - predicted_dloss(old).
double predicted_change(const alloc::CostTable& table,
                        const std::map<std::string, std::string>& before,
                        const std::map<std::string, std::string>& after) {
  double change = 0.0;
  for (const alloc::LinearCost& row : table.linears) {
    const std::string& from = before.at(row.name);
    const std::string& to = after.at(row.name);
    if (from == to) continue;
    const auto slot = [&](const std::string& format) {
      const auto it = std::find(table.formats.begin(), table.formats.end(), format);
      return row.costs.at(static_cast<std::size_t>(it - table.formats.begin()))->predicted_dloss;
    };
    change += slot(to) - slot(from);
  }
  return change;
}

// `count` token ids sampled from the model at temperature 1, in stories of `length` tokens that
// each start at the BOS token: text from the model's own distribution, for a checkpoint without
// a tokenizer (stories260K). Deterministic for a seed.
std::string sample_tokens(runtime::Model& model, std::int32_t bos, std::size_t count,
                          std::size_t length, std::uint64_t seed) {
  const std::int64_t vocab = model.config().vocab_size;
  data::SplitMix64 random(seed);
  std::string text;
  for (std::size_t written = 0; written < count;) {
    runtime::DecodeState state;
    std::int32_t token = bos;
    for (std::size_t t = 0; t < length && written < count; ++t, ++written) {
      text += fmt::format("{} ", token);
      const std::vector<float> logits = model.extend(state, {&token, 1});
      const float peak = *std::max_element(logits.begin(), logits.end());
      std::vector<double> cumulative(static_cast<std::size_t>(vocab));
      double total = 0.0;
      for (std::int64_t v = 0; v < vocab; ++v) {
        total += std::exp(static_cast<double>(logits[v]) - peak);
        cumulative[v] = total;
      }
      const double u = static_cast<double>(random.next() >> 11) * 0x1.0p-53 * total;
      token = static_cast<std::int32_t>(
          std::upper_bound(cumulative.begin(), cumulative.end() - 1, u) - cumulative.begin());
    }
    text += "\n";
  }
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app("Compare cost objectives by the held-out KL of what they ship");
  std::filesystem::path model_dir, data, work, json_path;
  bool token_ids = false;
  std::vector<std::string> formats = {"NVFP4", "MXFP8", "BF16"};
  std::vector<std::string> objectives = {"fisher", "kl-fisher"};
  std::vector<std::string> budgets = {"4.5", "4.75"};
  std::string base_budget = "4.75", rounding_name = "gptq";
  std::size_t nsamples = 32, seqlen = 1024, eval_windows = 16, eval_seqlen = 512,
              kl_probes = pq::cost::KlFisherJob{}.probes;
  std::size_t max_flips = 32;
  app.add_option("--model", model_dir)->required();
  app.add_option("--data", data);
  app.add_flag("--token-ids", token_ids, "--data holds token ids");
  app.add_option("--work", work)->required();
  app.add_option("--formats", formats)->delimiter(',')->capture_default_str();
  app.add_option("--objectives", objectives)->delimiter(',')->capture_default_str();
  app.add_option("--budgets", budgets)->delimiter(',')->capture_default_str();
  app.add_option("--flip-base", base_budget, "budget of the base assignment of the flips")
      ->capture_default_str();
  app.add_option("--rounding", rounding_name)->capture_default_str();
  app.add_option("--nsamples", nsamples)->capture_default_str();
  app.add_option("--seqlen", seqlen)->capture_default_str();
  app.add_option("--eval-windows", eval_windows)->capture_default_str();
  app.add_option("--eval-seqlen", eval_seqlen)->capture_default_str();
  app.add_option("--kl-probes", kl_probes)->capture_default_str();
  app.add_option("--max-flips", max_flips)->capture_default_str();
  app.add_option("--json", json_path);
  std::size_t sample = 0;
  app.add_option("--sample-tokens", sample,
                 "use this many token ids sampled from the model itself as --data (checkpoints "
                 "without a tokenizer)");
  CLI11_PARSE(app, argc, argv);

  try {
    if (sample > 0) {
      runtime::CheckpointModel sampler(model_dir);
      std::filesystem::create_directories(work);
      data = work / "sampled-tokens.txt";
      token_ids = true;
      if (!std::filesystem::exists(data)) {
        write_text_file_atomic(
            data, sample_tokens(
                      sampler.model(),
                      static_cast<std::int32_t>(sampler.model().config().bos_token_id.value_or(1)),
                      sample, 256, 7));
      }
    }
    probe::ProbeJob probe_job;
    probe_job.model = model_dir;
    probe_job.data = data;
    probe_job.token_ids = token_ids;
    probe_job.out = work / "probe";
    probe_job.nsamples = nsamples;
    probe_job.seqlen = seqlen;
    probe::run_probe(probe_job);
    const probe::ProbeResult probe = probe::ProbeResult::read(probe_job.out);
    const model::ModelConfig config = model::ModelConfig::load(model_dir);
    const model::ModelSpec spec = model::load_model_spec(model_dir);
    const io::Checkpoint checkpoint = io::Checkpoint::open(model_dir);
    const auto rounding = exporter::make_rounding(rounding_name, &probe);
    const exporter::LinearEncoder encoder(spec, checkpoint, *rounding,
                                          exporter::input_amax_from_probe(spec, probe),
                                          formats::ServingTarget::kBlackwell, work / "render");
    const exporter::EncoderRenders renders(encoder);

    std::map<std::string, alloc::CostTable> tables;
    std::map<std::string, std::filesystem::path> cost_dirs;
    for (const std::string& objective : objectives) {
      cost::CostJob job;
      job.model = model_dir;
      job.probe = probe_job.out;
      job.out = work / ("cost-" + objective);
      job.formats = formats;
      job.objective = cost::objective_by_name(objective);
      if (job.objective == cost::Objective::kKlFisher) {
        job.renders = &renders;
        cost::KlFisherJob kl;
        kl.data = data;
        kl.token_ids = token_ids;
        kl.nsamples = nsamples;
        kl.seqlen = seqlen;
        kl.probes = kl_probes;
        job.kl_fisher = kl;
      }
      const auto start = std::chrono::steady_clock::now();
      tables[objective] = cost::run_cost(job).table;
      fmt::print(stderr, "cost {}: {:.1f} s\n", objective,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      cost_dirs[objective] = job.out;
    }

    runtime::CheckpointModel source(model_dir);
    const runtime::ReferenceLogits reference(
        source.model(), runtime::ReferenceLogits::Keep::kHeadInputs,
        pipeline::heldout_windows(model_dir, data, token_ids, eval_windows, eval_seqlen),
        runtime::kEvalWindowsPerPass);
    const auto measure = [&](const std::map<std::string, std::string>& format_of) {
      return pipeline::measure_assignment(config, checkpoint, encoder, format_of, reference)
          .mean_kl;
    };

    nlohmann::json report = {{"model", probe::model_label(model_dir)},
                             {"formats", formats},
                             {"rounding", rounding_name},
                             {"kl_probes", kl_probes}};
    fmt::print("\n| objective | budget (bits) | held-out KL | bytes |\n|---|---|---|---|\n");
    std::map<std::string, alloc::AssignmentFile> base;
    for (const std::string& objective : objectives) {
      for (const std::string& budget : budgets) {
        alloc::AllocateJob job;
        job.cost = cost_dirs[objective];
        job.out = work / fmt::format("alloc-{}-{}", objective, budget);
        job.target_bits = budget;
        const alloc::AllocateOutcome allocated = alloc::run_allocate(job);
        const double kl = measure(formats_of(allocated.assignment));
        std::uint64_t bytes = 0;
        for (const auto& linear : allocated.assignment.linears) bytes += linear.bytes;
        fmt::print("| {} | {} | {:.6f} | {} |\n", objective, budget, kl, bytes);
        report["shipped"].push_back(
            {{"objective", objective}, {"budget", budget}, {"kl", kl}, {"bytes", bytes}});
        if (budget == base_budget) base[objective] = allocated.assignment;
      }
    }

    // Single-group flips from the first objective's base assignment: every sibling group (or
    // lone Linear) moved to the next format of the menu that all its members can take.
    if (max_flips == 0) {
      if (!json_path.empty()) write_text_file_atomic(json_path, report.dump(1) + "\n");
      return 0;
    }
    const alloc::AssignmentFile& flip_base = base.at(objectives.front());
    const std::map<std::string, std::string> before = formats_of(flip_base);
    const double base_kl = measure(before);
    std::map<std::string, std::vector<std::string>> groups;
    for (const alloc::AssignedLinear& linear : flip_base.linears) {
      groups[linear.group.empty() ? linear.name : linear.group].push_back(linear.name);
    }
    const alloc::CostTable& first = tables.at(objectives.front());
    std::map<std::string, const alloc::LinearCost*> row_of;
    for (const alloc::LinearCost& row : first.linears) row_of[row.name] = &row;
    std::vector<double> measured;
    std::map<std::string, std::vector<double>> predicted;
    std::size_t flips = 0;
    const std::size_t stride = std::max<std::size_t>(1, groups.size() / max_flips);
    std::size_t g = 0;
    for (const auto& [group, members] : groups) {
      if (g++ % stride != 0 || flips >= max_flips) continue;
      const std::string& current = before.at(members.front());
      const auto at = std::find(formats.begin(), formats.end(), current) - formats.begin();
      std::optional<std::string> target;
      for (std::size_t step = 1; step < formats.size() && !target; ++step) {
        const std::string& candidate = formats[(at + step) % formats.size()];
        const auto slot = std::find(first.formats.begin(), first.formats.end(), candidate) -
                          first.formats.begin();
        if (std::all_of(members.begin(), members.end(), [&](const std::string& name) {
              return row_of.at(name)->costs.at(static_cast<std::size_t>(slot)).has_value();
            })) {
          target = candidate;
        }
      }
      if (!target) continue;
      std::map<std::string, std::string> after = before;
      for (const std::string& name : members) after[name] = *target;
      measured.push_back(measure(after) - base_kl);
      for (const std::string& objective : objectives) {
        predicted[objective].push_back(predicted_change(tables.at(objective), before, after));
      }
      report["flips"].push_back({{"group", group},
                                 {"from", current},
                                 {"to", *target},
                                 {"measured_kl_change", measured.back()}});
      ++flips;
    }
    fmt::print("\n{} single-group flips from {}'s {}-bit assignment (held-out KL {:.6f}):\n\n",
               flips, objectives.front(), base_budget, base_kl);
    fmt::print("| objective | Spearman (predicted vs measured KL change) |\n|---|---|\n");
    for (const std::string& objective : objectives) {
      const double rho = scout::spearman(predicted[objective], measured).value_or(0.0);
      fmt::print("| {} | {:.3f} |\n", objective, rho);
      report["spearman"][objective] = rho;
    }
    if (!json_path.empty()) write_text_file_atomic(json_path, report.dump(1) + "\n");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pq_objectives: %s\n", e.what());
    return 1;
  }
  return 0;
}
