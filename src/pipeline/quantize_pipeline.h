#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "alloc/allocate_stage.h"
#include "cost/cost_stage.h"
#include "export/exporter.h"
#include "probe/probe_stage.h"
#include "scout/scout_stage.h"
#include "validate/validate.h"

namespace pq::pipeline {

// What `prismaquant quantize` was asked to do.
struct QuantizeJob {
  std::filesystem::path model;
  std::filesystem::path out;  // the exported checkpoint (`vllm serve out`)
  // Stage artifacts (probe/, cost/, alloc/, render/, rounding.json, validate.json); default:
  // `out` + ".work" beside it, so that replacing the checkpoint never touches them.
  std::optional<std::filesystem::path> work;
  std::filesystem::path data;  // calibration text; its held-out tail is the evaluation text
  bool token_ids = false;      // `data` holds whitespace-separated token ids, not text
  // The format menu; FP8_SOURCE joins it when the source stores block-scaled FP8 Linears. The
  // default is the best measured one at the default target (docs/probe-artifacts.md, "Which
  // menu"): NVFP4, FP8 per channel with dynamic per-token activations, BF16.
  std::vector<std::string> formats = {"NVFP4", "FP8_E4M3", "BF16"};
  std::string target_bits = "4.75";
  std::optional<std::string> pareto;  // default: a ladder from 4 to 8 bits plus the target
  std::size_t nsamples = 32;
  std::size_t seqlen = 1024;
  std::uint64_t seed = 42;
  bool importance_weighting = true;
  std::size_t batch_size = 4;
  std::int64_t max_memory = 0;  // bytes; 0: 80% of available memory (ProbeJob::max_memory)
  runtime::ComputeType probe_compute = probe::ProbeJob{}.compute;  // ProbeJob::compute
  // The cost's objective: kl-fisher, which shipped lower held-out KL than fisher on the tiny
  // models (docs/probe-artifacts.md, "Which objective").
  cost::Objective objective = cost::Objective::kKlFisher;
  // With Objective::kKlFisher: the KL-Fisher pass's probes (cost::KlFisherJob::probes).
  std::size_t kl_probes = cost::KlFisherJob{}.probes;
  // Held-out evaluation: windows of the data's held-out split (data::TokenDataset::heldout).
  std::size_t eval_windows = 16;
  std::size_t eval_seqlen = 512;
  // Which assignment ships: "allocate" (the knapsack's at target_bits) or "scout" (chosen by
  // measured held-out KL among candidates at `scout_budgets`, docs/scout.md).
  std::string select = "allocate";
  std::vector<std::string> scout_budgets = {"4.5", "4.75", "5", "5.5", "6"};
  // "gptq" (GPTQ + scale sweep with the probe's Hessians), "local-hessian", "gptq+local-hessian"
  // (exporter::make_rounding) or "nearest" (round to nearest).
  std::string rounding = "gptq";
  std::string vision_format;  // ExportJob::vision_format
  // The GPU vLLM serves the checkpoint on (cost::CostJob::serve_on, ExportJob::serve_on).
  formats::ServingTarget serve_on = formats::ServingTarget::kBlackwell;
  // `--kv-cache fp8`: the probe records each attention layer's key/value amax, the export
  // carries FP8 KV cache scales (ExportJob::kv_cache) and the measurement reports the KL with the
  // FP8 cache next to the KL without it. Off: a bf16 cache, nothing of the above.
  bool kv_cache = false;
  validate::Gates gates;     // validate's gates on the written checkpoint
  bool force = false;        // replace an existing `out`
  std::string command_line;  // recorded in the model card
};

// Where a job's stage artifacts go.
std::filesystem::path work_dir(const QuantizeJob& job);

struct StageReport {
  std::string stage;
  double seconds = 0.0;
  bool reused = false;
};

struct QuantizeOutcome {
  std::vector<StageReport> stages;
  alloc::AllocateOutcome allocation;
  std::optional<scout::ScoutOutcome> scout;  // with select == "scout"
  exporter::MeasuredQuality measured;        // before export, with the exporter's weights
  // The uniform FP4 assignment it was measured against (uniform_baseline.h); none when the menu
  // has no FP4 format.
  std::optional<exporter::UniformBaseline> uniform;
  exporter::ExportSummary exported;
  std::string rounding;                // what the rounding strategy did (its model-card paragraph)
  validate::ValidateReport validated;  // the written checkpoint, reloaded as a consumer does
};

// probe -> cost -> allocate (-> scout) in the work directory, then the assignment's held-out
// quality measured with the exact weights export writes, the export to job.out, and validate on
// what was written (report in WORK/validate.json). Each of probe and cost stores the fingerprint of
// its inputs and options; one whose artifact matches is skipped. Each (Linear, format) is rounded
// once, by scout or the measurement, into WORK/render (exporter::RenderCache), which the export
// copies and a later run with the same inputs reuses. Throws pq::Error when a validate gate fails
// (the checkpoint stays: it is complete, the report says what failed).
QuantizeOutcome run_quantize(const QuantizeJob& job);

// The default Pareto targets for a main target: 4, 4.25, 4.5, 4.75, 5, 5.5, 6, 7, 8 and the
// target itself.
std::string default_pareto_targets(const std::string& target_bits);

}  // namespace pq::pipeline
