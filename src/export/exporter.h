#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "alloc/assignment.h"
#include "export/linear_encoder.h"
#include "export/rounding.h"
#include "formats/serving.h"
#include "model/model_spec.h"
#include "probe/probe_result.h"
#include "runtime/kv_cache.h"

namespace pq::exporter {

// The held-out figures with vLLM's FP8 KV cache simulated (runtime::Fp8KvCache), measured next to
// those of the default bf16 cache.
struct KvCacheQuality {
  double mean_kl = 0.0;  // KL(source || quantized) per prediction, nats
  double perplexity = 0.0;
  double top1_agreement = 0.0;
};

// Held-out quality of an assignment's weights, measured before export with the very encodings the
// exporter writes (LinearEncoder); the model card reports it.
struct MeasuredQuality {
  std::string data;  // what was measured on, e.g. "wikitext-2-test.txt, held-out split"
  std::int64_t windows = 0;
  std::int64_t seqlen = 0;
  std::int64_t predictions = 0;
  double mean_kl = 0.0;  // KL(source || quantized) per prediction, nats
  double perplexity = 0.0;
  double source_perplexity = 0.0;
  double top1_agreement = 0.0;
  // With an FP8 KV cache (ExportJob::kv_cache): the same measurement with the cache simulated.
  std::optional<KvCacheQuality> fp8_kv_cache;
  // Each prediction's NLL (runtime::EvalResult::prediction_nll), for paired comparisons; not
  // written anywhere.
  std::vector<double> prediction_nll;
  // The same for the source model on the same windows.
  std::vector<double> source_prediction_nll;
};

// The uniform assignment a mixed one must beat (issue 15, "never worse than uniform"): every
// Linear that can take `format` in it, the others in their shipped format, rendered like the
// shipped assignment and measured on the same held-out windows.
struct UniformBaseline {
  std::string format;               // e.g. "NVFP4"
  std::int64_t linears = 0;         // Linears the baseline puts in `format`
  std::uint64_t bytes = 0;          // the baseline's Linear bytes
  std::uint64_t shipped_bytes = 0;  // the shipped assignment's Linear bytes
  // Measured when the baseline fits the shipped bytes (bytes <= shipped_bytes); a baseline
  // that needs more bytes is no like-for-like comparison.
  std::optional<MeasuredQuality> quality;
};

struct ExportJob {
  std::filesystem::path model_dir;   // source checkpoint (HF layout); never written to
  std::filesystem::path assignment;  // WORK/alloc/assignment.json
  std::filesystem::path out;         // the checkpoint directory to create
  bool force = false;                // replace an existing `out`
  // max |x| of each Linear's input activations over the calibration set, keyed by Linear name
  // (input_amax_from_probe); required for every Linear assigned a W4A4 format (NVFP4), whose
  // input_global_scale it sets.
  std::map<std::string, float> input_amax;
  // WORK/render: encodings rendered before (quantize's measurement, scout) are copied from this
  // RenderCache and new ones are stored there (LinearEncoder). Empty: every Linear is rendered.
  std::filesystem::path render_cache;
  std::optional<MeasuredQuality> quality;  // for the model card
  std::optional<UniformBaseline> uniform;  // for the model card, beside `quality`
  // The allocator's Pareto sweep for the model card; empty: pareto.csv beside the assignment.
  std::filesystem::path pareto_csv;
  std::string command_line;  // recorded in the model card
  // The format of every vision-tower Linear (model::Component::kVision), rounded to nearest: the
  // tower has no calibration statistics and is never weighed against the text model. Empty or
  // "BF16": the tower is copied as stored, byte for byte.
  std::string vision_format;
  std::uint64_t max_shard_bytes = 5'000'000'000;
  // The GPU vLLM serves the checkpoint on: an assignment with a format vLLM does not load there
  // for that Linear's layer kind is refused before anything is written; the model card names it.
  formats::ServingTarget serve_on = formats::ServingTarget::kBlackwell;
  // `--kv-cache fp8`: the FP8 KV cache scales of every layer of ModelSpec::kv_cache_modules
  // (kv_cache_scales_from_probe), written as `<module>.k_scale` / `.v_scale` with
  // quantization_config.kv_cache_scheme (fp8_kv_cache_scheme). Empty: kv_cache_scheme null, no
  // scales, and `vllm serve --kv-cache-dtype fp8` would fall back to scale 1.0.
  std::map<std::int64_t, runtime::KvCacheScales> kv_cache;
};

struct ExportSummary {
  std::filesystem::path out;
  std::vector<std::string> files;  // names written into `out`, sorted
  std::uint64_t tensor_bytes = 0;  // safetensors data bytes (no headers)
  std::uint64_t source_tensor_bytes = 0;
  std::uint64_t params = 0;  // parameters of the model (ModelSpec::num_params)
  std::map<std::string, std::uint64_t> linears_per_format;
};

// The compressed-tensors `quantization_config` for an assignment (format-facts.md A.0, A.4): one
// config group per format with the explicit HF names of its Linears as targets, "format" the
// single group format or "mixed-precision", and every Linear left unquantized (BF16, non-candidate
// such as lm_head and routers) in `ignore`. `format_of` maps every quantized Linear (the
// candidates, and the vision tower's under ExportJob::vision_format) to its format. vLLM maps the
// names through the model's hf_to_vllm_mapper before matching (compressed_tensors.py
// apply_vllm_mapper: "model.language_model." -> "language_model.model.", "model.visual." ->
// "visual."; "mtp." names are the MTP drafter's own module names).
nlohmann::json quantization_config(const model::ModelSpec& spec,
                                   const std::map<std::string, std::string>& format_of,
                                   bool fp8_kv_cache = false);

// compressed-tensors' QuantizationArgs of an FP8 KV cache, the kv_cache_scheme llm-compressor
// writes for one (quant_args.py fields; format-facts.md A.0): E4M3 (`num_bits` 8, `type` float),
// one static symmetric scale per tensor (`strategy` tensor, `dynamic` false, `symmetric` true).
// vLLM's CompressedTensorsKVCacheMethod.validate_kv_cache_scheme (compressed_tensors_kv.py)
// accepts exactly type float with 8 bits, strategy tensor and symmetric.
nlohmann::json fp8_kv_cache_scheme();

// The FP8 KV cache scales of every layer of spec.kv_cache_modules() from the probe's key/value
// amax (ProbeJob::kv_cache): k_scale = key amax / 448, v_scale = value amax / 448
// (runtime::fp8_kv_cache_scale). pq::Error when the probe did not record the KV cache or misses a
// layer.
std::map<std::int64_t, runtime::KvCacheScales> kv_cache_scales_from_probe(
    const model::ModelSpec& spec, const probe::ProbeResult& probe);

// Removes what an export killed before its end left beside `out`: its staging directory
// OUT.tmp-XXXXXX, and OUT.old-XXXXXX, which holds the previous checkpoint as "previous" while the
// new one is renamed into place. When `out` itself is missing, the kill came between the two
// renames and "previous" is the only complete checkpoint: it goes back to `out` instead of being
// removed. Only a run holding out's LocationLock may call it (run_export does).
void remove_interrupted_exports(const std::filesystem::path& out);

// Disk an export needs beside its output for a checkpoint of `tensor_bytes` in shards of at most
// `max_shard_bytes`, checked before it writes anything.
std::uint64_t export_disk_need(std::uint64_t tensor_bytes, std::uint64_t max_shard_bytes);

// Writes the quantized checkpoint: safetensors shards + index, config.json with
// quantization_config, the tokenizer/generation files and a README.md model card. Everything is
// built in a sibling temporary directory that is renamed to job.out only when complete; any error
// removes it and throws pq::Error with one line naming the file, Linear or tensor at fault.
ExportSummary run_export(const ExportJob& job,
                         const RoundingStrategy& rounding = NearestRounding{});

}  // namespace pq::exporter
