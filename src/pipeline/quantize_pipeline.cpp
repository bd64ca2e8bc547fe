#include "pipeline/quantize_pipeline.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <exception>
#include <set>
#include <system_error>

#include "alloc/budget.h"
#include "common/disk_space.h"
#include "common/error.h"
#include "common/file_util.h"
#include "common/location_lock.h"
#include "common/progress.h"
#include "data/token_dataset.h"
#include "export/gptq.h"
#include "formats/weight_format.h"
#include "io/safetensors_writer.h"
#include "model/model_spec.h"
#include "pipeline/measure.h"
#include "pipeline/uniform_baseline.h"
#include "runtime/checkpoint_model.h"
#include "runtime/model.h"

namespace pq::pipeline {

namespace {

// A work directory this run creates goes again if the run fails before finishing any work worth
// resuming (a probe step or more): an early failure leaves no trace (issue 13).
class NewWorkDirectory {
 public:
  explicit NewWorkDirectory(std::filesystem::path work)
      : work_(std::move(work)), created_(!std::filesystem::exists(work_)) {}
  ~NewWorkDirectory() {
    if (!created_ || std::uncaught_exceptions() == 0) return;
    std::error_code ec;
    const std::filesystem::path probe = work_ / "probe";
    if (std::filesystem::exists(probe / "probe.json", ec) ||
        std::filesystem::exists(probe / "pass" / "state.json", ec)) {
      return;
    }
    std::filesystem::remove_all(work_, ec);
  }
  NewWorkDirectory(const NewWorkDirectory&) = delete;
  NewWorkDirectory& operator=(const NewWorkDirectory&) = delete;

 private:
  std::filesystem::path work_;
  bool created_;
};

// Disk the run will fill, checked before it probes (issue 13): the checkpoint at the largest
// budget it may ship (the candidate Linears at that many bits per parameter, every other tensor as
// stored) with export's staging, and in the work directory the rounded Linears kept in
// WORK/render (every offered (Linear, format) a kl-fisher cost renders, less what a previous run
// already rendered there) and, for kl-fisher, the layer boundaries its pass keeps on disk until
// its backward passes them, or the held-out passes' boundaries where those are more. The probe and
// the pass check their own disk again when they start.
void require_disk_for_outputs(const QuantizeJob& job, const std::vector<std::string>& menu,
                              const std::filesystem::path& work) {
  const model::ModelSpec spec = model::load_model_spec(job.model);
  const io::Checkpoint checkpoint = io::Checkpoint::open(job.model);
  std::uint64_t params = 0;
  std::uint64_t stored_bytes = 0;  // the candidates' weight tensors as the source stores them
  std::set<std::string> stored;
  for (const model::Linear& linear : spec.linears) {
    if (!linear.is_candidate) continue;
    params += static_cast<std::uint64_t>(linear.numel());
    if (stored.insert(linear.weight_tensor).second) {
      stored_bytes += checkpoint.info(linear.weight_tensor).nbytes();
    }
    if (linear.scale_tensor) stored_bytes += checkpoint.info(*linear.scale_tensor).nbytes();
  }
  std::vector<std::string> budgets = {job.target_bits};
  if (job.select == "scout") {
    budgets.insert(budgets.end(), job.scout_budgets.begin(), job.scout_budgets.end());
  }
  std::uint64_t quantized = 0;
  for (const std::string& budget : budgets) {
    quantized = std::max(quantized, alloc::parse_bits_target(budget).budget_bytes(params));
  }
  const std::uint64_t checkpoint_bytes = checkpoint.total_tensor_bytes() -
                                         std::min(stored_bytes, checkpoint.total_tensor_bytes()) +
                                         quantized;
  const std::uint64_t out_need =
      exporter::export_disk_need(checkpoint_bytes, io::ShardedWriterOptions{}.max_shard_bytes);
  std::uint64_t work_need =
      std::max<std::uint64_t>(quantized, cost::render_bytes(spec, menu, job.serve_on));
  work_need -= std::min(work_need, bytes_under(work / "render"));
  const model::ModelConfig config = model::ModelConfig::load(job.model);
  const auto boundary_bytes = [&](std::uint64_t tokens) {
    return tokens * static_cast<std::uint64_t>(config.hidden_size) * sizeof(float);
  };
  std::uint64_t kl_boundaries = 0;
  if (job.objective == cost::Objective::kKlFisher) {
    kl_boundaries = static_cast<std::uint64_t>(config.num_hidden_layers +
                                               2 * static_cast<std::int64_t>(job.kl_probes)) *
                    boundary_bytes(job.nsamples * job.seqlen);
  }
  // The held-out passes (the measurement's reference, assignment with and without the FP8 KV
  // cache and uniform baseline, then validate's three) keep a boundary each until validate ends,
  // and one more while a pass moves to its next layer; the KL-Fisher pass has removed its own by
  // then.
  const std::uint64_t eval_boundaries = 9 * boundary_bytes(job.eval_windows * job.eval_seqlen);
  work_need += std::max(kl_boundaries, eval_boundaries);
  if (same_filesystem(job.out, work)) {
    require_disk_space(job.out, out_need + work_need,
                       "quantize (the checkpoint, and its rounded Linears and pass in the work "
                       "directory)");
  } else {
    require_disk_space(job.out, out_need, "quantize's checkpoint");
    require_disk_space(work, work_need, "quantize's rounded Linears (WORK/render) and pass");
  }
}

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

std::filesystem::path work_dir(const QuantizeJob& job) {
  if (job.work) return *job.work;
  std::filesystem::path out = job.out.lexically_normal();
  if (!out.has_filename()) out = out.parent_path();
  return out.string() + ".work";
}

QuantizeOutcome run_quantize(const QuantizeJob& job) {
  PQ_CHECK(!job.out.empty(), "quantize: no output directory given");
  const std::filesystem::path work = work_dir(job);
  // What can be known now is refused now, not after minutes of probing (issue 13): locations that
  // would write into the source, and formats quantize could not export.
  PQ_CHECK(!is_within(job.out, job.model) && !is_within(job.model, job.out),
           "quantize: output {} and source {} overlap; the source is never written to",
           job.out.string(), job.model.string());
  PQ_CHECK(!is_within(work, job.model) && !is_within(job.model, work),
           "quantize: work directory {} and source {} overlap; the source is never written to",
           work.string(), job.model.string());
  for (const std::string& name : job.formats) {
    PQ_CHECK(formats::format_by_name(name).exportable(),
             "quantize: format {} has no compressed-tensors format (research only), so it cannot "
             "be exported; use it with the cost stage alone",
             name);
  }
  runtime::require_runtime_support(model::ModelConfig::load(job.model));
  // FP8_SOURCE is on the menu wherever the source stores Linears as block-scaled FP8: keeping
  // their bytes is the one choice without error against the source (docs/formats.md); the cost
  // stage offers it to those Linears only (model::Linear::allows).
  std::vector<std::string> menu = job.formats;
  const model::ModelSpec source_spec = model::load_model_spec(job.model);
  const bool fp8_source = std::any_of(source_spec.linears.begin(), source_spec.linears.end(),
                                      [](const model::Linear& l) { return l.is_fp8_source(); });
  if (fp8_source && std::find(menu.begin(), menu.end(), "FP8_SOURCE") == menu.end()) {
    menu.push_back("FP8_SOURCE");
  }
  const cost::Objective objective = job.objective;
  data::require_dataset(job.data, job.token_ids, job.model);
  // One run per location: a second run on the same output or work directory fails here, before
  // any work, naming the run that holds it.
  const LocationLock out_lock(job.out);
  const LocationLock work_lock(work);
  exporter::remove_interrupted_exports(job.out);
  PQ_CHECK(job.force || !std::filesystem::exists(job.out),
           "{} already exists (use --force to replace it)", job.out.string());
  const NewWorkDirectory new_work(work);
  require_disk_for_outputs(job, menu, work);
  QuantizeOutcome outcome;

  auto start = std::chrono::steady_clock::now();
  probe::ProbeJob probe_job;
  probe_job.model = job.model;
  probe_job.out = work / "probe";
  probe_job.data = job.data;
  probe_job.token_ids = job.token_ids;
  probe_job.nsamples = job.nsamples;
  probe_job.seqlen = job.seqlen;
  probe_job.seed = job.seed;
  probe_job.importance_weighting = job.importance_weighting;
  probe_job.batch_size = job.batch_size;
  probe_job.max_memory = job.max_memory;
  probe_job.compute = job.probe_compute;
  probe_job.kv_cache = job.kv_cache;
  // Choosing between GPTQ and Local-Hessian per Linear is judged on rows neither was fitted to
  // (exporter::GptqRounding), so that choice needs the probe's held-out Hessians.
  probe_job.holdout_hessian = job.rounding == "gptq+local-hessian";
  // The KL-Fisher cost takes its sensitivities from its own pass: the probe's Fisher traces would
  // go unread, so its backward pass is skipped.
  probe_job.fisher = objective != cost::Objective::kKlFisher;
  // It also renders every (Linear, format) a layer at a time from Hessians it accumulates in its
  // own forward, so the probe stores none (a MoE's take more disk than the model), unless the
  // rounding needs the held-out rows' Hessians only the probe sums.
  probe_job.hessians = objective != cost::Objective::kKlFisher || probe_job.holdout_hessian;
  const probe::ProbeOutcome probed = probe::run_probe(probe_job);
  PQ_CHECK(probed.complete, "probe stopped before the end");
  outcome.stages.push_back({"probe", seconds_since(start), probed.reused});

  const model::ModelSpec spec = model::load_model_spec(job.model);
  const io::Checkpoint checkpoint = io::Checkpoint::open(job.model);
  const probe::ProbeResult probe = probe::ProbeResult::read(probe_job.out);
  const std::map<std::string, float> input_amax = exporter::input_amax_from_probe(spec, probe);
  std::map<std::int64_t, runtime::KvCacheScales> kv_cache_scales;
  if (job.kv_cache) kv_cache_scales = exporter::kv_cache_scales_from_probe(spec, probe);
  const runtime::Fp8KvCache kv_cache(kv_cache_scales);
  const std::unique_ptr<exporter::RoundingStrategy> rounding =
      exporter::make_rounding(job.rounding, &probe);
  // Every (Linear, format) export may write is rendered once, into WORK/render, by whichever
  // stage needs it first (the KL-Fisher cost, scout or the measurement), and read back after.
  const exporter::LinearEncoder encoder(spec, checkpoint, *rounding, input_amax, job.serve_on,
                                        work / "render");
  const exporter::EncoderRenders renders(encoder);

  start = std::chrono::steady_clock::now();
  cost::CostJob cost_job;
  cost_job.model = job.model;
  cost_job.probe = probe_job.out;
  cost_job.out = work / "cost";
  cost_job.formats = menu;
  cost_job.objective = objective;
  cost_job.serve_on = job.serve_on;
  if (objective == cost::Objective::kKlFisher) {
    // The KL-Fisher cost measures the weights export writes, on the probe's calibration sample.
    cost_job.renders = &renders;
    cost::KlFisherJob kl = cost::kl_fisher_job_on(probe_job);
    kl.probes = job.kl_probes;
    cost_job.kl_fisher = kl;
  }
  const cost::CostOutcome costed = cost::run_cost(cost_job);
  outcome.stages.push_back({"cost", seconds_since(start), costed.reused});

  start = std::chrono::steady_clock::now();
  alloc::AllocateJob allocate_job;
  allocate_job.cost = cost_job.out;
  allocate_job.out = work / "alloc";
  allocate_job.target_bits = job.target_bits;
  allocate_job.serve_on = job.serve_on;
  allocate_job.pareto = job.pareto.value_or(default_pareto_targets(job.target_bits));
  ProgressBar progress("allocate", 1);
  outcome.allocation = alloc::run_allocate(allocate_job);
  progress.advance();
  progress.finish();
  outcome.stages.push_back({"allocate", seconds_since(start), false});

  std::filesystem::path assignment_path = work / "alloc" / "assignment.json";
  const alloc::AssignmentFile* shipped = &outcome.allocation.assignment;
  PQ_CHECK(job.select == "allocate" || job.select == "scout",
           "unknown --select '{}' (known: allocate, scout)", job.select);
  if (job.select == "scout") {
    // Scout measures on the same held-out windows as the measurement below, so the KL it reports
    // for its choice is the one measured before export and again by validate.
    start = std::chrono::steady_clock::now();
    scout::ScoutJob scout_job;
    scout_job.model = job.model;
    scout_job.data = job.data;
    scout_job.token_ids = job.token_ids;
    scout_job.work = work;
    scout_job.formats = menu;
    scout_job.serve_on = job.serve_on;
    scout_job.budgets = job.scout_budgets;
    scout_job.target = job.target_bits;
    scout_job.rounding = rounding.get();
    scout_job.heldout_windows = job.eval_windows;
    scout_job.heldout_seqlen = job.eval_seqlen;
    scout_job.seed = job.seed;
    outcome.scout = scout::run_scout(scout_job);
    assignment_path = work / "scout" / "assignment.json";
    shipped = &outcome.scout->assignment;
    outcome.stages.push_back({"scout", seconds_since(start), false});
  }

  // The assignment's held-out quality with the exact weights export writes, measured before the
  // export so the model card can state it (validate measures the written checkpoint again).
  start = std::chrono::steady_clock::now();
  // The measurement's passes keep their layer boundaries here until validate is done, so that a
  // killed run resumes each where it stopped (a pass that finished runs only its head again).
  const std::filesystem::path measure_dir = work / "measure";
  std::map<std::string, std::string> format_of;
  for (const alloc::AssignedLinear& linear : shipped->linears) {
    format_of[linear.name] = linear.format;
  }
  {
    const model::ModelConfig config = model::ModelConfig::load(job.model);
    // The source model goes once its logits are taken: the measurement holds about one layer.
    const runtime::ReferenceLogits reference = [&] {
      // Streamed, not resident, and kept as lm_head inputs rather than logits: memory stays near
      // one layer plus the head whatever the model's size.
      runtime::CheckpointModel source(job.model);
      auto windows =
          heldout_windows(job.model, job.data, job.token_ids, job.eval_windows, job.eval_seqlen);
      const runtime::ForwardCheckpoint resume =
          reference_pass(measure_dir / "reference", job.model, windows);
      return runtime::ReferenceLogits(source.model(), runtime::ReferenceLogits::Keep::kHeadInputs,
                                      std::move(windows), runtime::kEvalWindowsPerPass, &resume);
    }();
    outcome.measured =
        measure_assignment(config, checkpoint, encoder, format_of, reference,
                           job.kv_cache ? &kv_cache : nullptr, measure_dir / "assignment");
    outcome.measured.data = fmt::format("{}, held-out split", job.data.filename().string());
    outcome.stages.push_back({"measure", seconds_since(start), false});

    // Never worse than uniform: the same render of uniform FP4 at no more bytes, on the same
    // windows; an assignment that loses to it is not exported.
    if (const std::optional<std::string> format = uniform_baseline_format(menu)) {
      start = std::chrono::steady_clock::now();
      outcome.uniform =
          measure_uniform_baseline(config, checkpoint, encoder, costed.table, format_of, reference,
                                   *format, measure_dir / "uniform");
      if (outcome.uniform->quality) outcome.uniform->quality->data = outcome.measured.data;
      outcome.stages.push_back({"uniform", seconds_since(start), false});
      require_not_worse_than_uniform(outcome.measured, *outcome.uniform);
    }
  }

  start = std::chrono::steady_clock::now();
  exporter::ExportJob export_job;
  export_job.model_dir = job.model;
  export_job.assignment = assignment_path;
  export_job.pareto_csv = work / "alloc" / "pareto.csv";
  export_job.out = job.out;
  export_job.force = job.force;
  export_job.input_amax = input_amax;
  export_job.render_cache = work / "render";
  export_job.quality = outcome.measured;
  export_job.uniform = outcome.uniform;
  export_job.command_line = job.command_line;
  export_job.vision_format = job.vision_format;
  export_job.serve_on = job.serve_on;
  export_job.kv_cache = kv_cache_scales;
  outcome.exported = exporter::run_export(export_job, *rounding);
  outcome.rounding = rounding->describe(format_of);
  write_text_file_atomic(work / "rounding.json", rounding->report(format_of).dump(2) + "\n");
  outcome.stages.push_back({"export", seconds_since(start), false});

  start = std::chrono::steady_clock::now();
  validate::ValidateJob validate_job;
  validate_job.checkpoint = job.out;
  validate_job.reference = job.model;
  validate_job.data = job.data;
  validate_job.token_ids = job.token_ids;
  validate_job.seqlen = static_cast<std::int64_t>(job.eval_seqlen);
  validate_job.max_seqs = static_cast<std::int64_t>(job.eval_windows);
  validate_job.gates = job.gates;
  validate_job.serve_on = job.serve_on;
  validate_job.work = work / "validate";
  outcome.validated = validate::run_validate(validate_job);
  std::error_code removed;
  std::filesystem::remove_all(measure_dir, removed);
  validate::write_report(work / "validate.json", outcome.validated);
  outcome.stages.push_back({"validate", seconds_since(start), false});
  PQ_CHECK(outcome.validated.passed(), "{}: validation failed: {} (report: {})", job.out.string(),
           outcome.validated.failures.front(), (work / "validate.json").string());
  return outcome;
}

}  // namespace pq::pipeline
