#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "data/token_dataset.h"
#include "formats/serving.h"

namespace pq::validate {

// Quality gates on the decoded checkpoint against its reference (docs/validate.md). The defaults
// reject a checkpoint that is clearly broken (wrong decoding, swapped nibbles, a global scale off
// by a factor) while passing any sane 4-bit-and-up quantization of the shared tiny models.
struct Gates {
  double max_kl = 0.5;         // mean KL(reference || checkpoint) per prediction, nats
  double min_top1 = 0.5;       // fraction of predictions with the reference's arg-max token
  double max_ppl_ratio = 1.5;  // checkpoint perplexity / reference perplexity
};

struct ValidateJob {
  std::filesystem::path checkpoint;  // the compressed-tensors checkpoint directory
  std::filesystem::path reference;   // the unquantized source checkpoint
  std::filesystem::path data;        // text (or .jsonl); tokenized with checkpoint/tokenizer.json
  bool token_ids = false;            // `data` holds whitespace-separated token ids instead
  // Held-out windows scored: at most max_seqs (0: every one that fits) of seqlen tokens. The
  // defaults are the quantize pipeline's pre-export measurement (QuantizeJob eval_windows and
  // eval_seqlen), so the two report the same figures.
  std::int64_t seqlen = 512;
  std::int64_t max_seqs = 16;
  Gates gates;
  // The GPU vLLM serves the checkpoint on: which Linears' activations are quantized in the
  // measurement (CheckpointActivationQuantizer).
  formats::ServingTarget serve_on = formats::ServingTarget::kBlackwell;
  std::optional<std::string> prompt;  // sample prompt; default: the held-out split's start
  std::int64_t sample_tokens = 32;    // greedy: tokens generated; teacher-forced: positions scored
  // Models whose f32 weights fit this stay decoded in memory between passes and sample greedily
  // with the key/value cache; larger ones stream one layer at a time (memory about one layer)
  // and sample teacher-forced, since greedy decoding would read every layer again per token.
  std::int64_t resident_f32_bytes = 1ll << 30;
  // Where the held-out passes keep their layer boundaries (runtime::ForwardCheckpoint: one
  // directory per pass, two boundaries of windows x seqlen x hidden floats at most), so that a
  // killed run given the same directory resumes after the last finished layer of each pass; empty:
  // nothing is kept. run_validate removes the passes' directories once the report is measured, and
  // the work directory if that leaves it empty.
  std::filesystem::path work{};
};

struct ValidateReport {
  std::string checkpoint;
  std::string reference;
  std::string format;                                     // quantization_config.format
  std::map<std::string, std::int64_t> linears_by_format;  // storage format (or "ignored") -> count
  std::string serve_on;                                   // formats::serving_target_name
  std::int64_t activation_quantized_linears = 0;          // on serve_on

  std::int64_t seqlen = 0;
  std::int64_t windows = 0;
  std::int64_t predictions = 0;
  double mean_kl = 0.0;  // nats, KL(reference || checkpoint), logits in f32
  double top1_agreement = 0.0;
  double perplexity = 0.0;
  double reference_perplexity = 0.0;

  // A checkpoint with an FP8 kv_cache_scheme: the figures again with vLLM's FP8 KV cache
  // (`--kv-cache-dtype fp8`) simulated under the stored k_scale / v_scale (runtime::Fp8KvCache).
  // The figures above are those of the default bf16 cache.
  struct KvCacheFigures {
    std::int64_t layers = 0;  // attention layers with scales
    float min_scale = 0.0f;   // over every k_scale and v_scale
    float max_scale = 0.0f;
    double mean_kl = 0.0;
    double top1_agreement = 0.0;
    double perplexity = 0.0;
  };
  std::optional<KvCacheFigures> fp8_kv_cache;

  std::string prompt;  // decoded prompt text
  // "greedy": the checkpoint's greedy continuation of the prompt (models that stay resident).
  // "teacher-forced": its arg-max prediction at each position of the prompt's held-out
  // continuation (of the --prompt itself when given) in one pass (streamed models).
  std::string sample_mode;
  std::string sample;  // the checkpoint's sample (text)
  std::string reference_sample;

  Gates gates;
  // One line per failed gate (of the FP8 KV cache figures too, when measured); empty: passed.
  std::vector<std::string> failures;

  bool passed() const { return failures.empty(); }
  nlohmann::json to_json() const;
};

// The evaluation windows: the first `max_seqs` (0: all) consecutive windows of `seqlen` tokens of
// the dataset's held-out split (its last 10%), the tokens the pipeline never calibrates on.
std::vector<std::vector<std::int32_t>> heldout_windows(const data::TokenDataset& dataset,
                                                       std::int64_t seqlen, std::int64_t max_seqs);

// Opens and checks the checkpoint (CompressedTensorsCheckpoint::open), decodes it, scores it
// against the reference on the held-out windows, samples both greedily and applies the gates.
// Structural problems throw pq::Error; failed gates are listed in the report.
ValidateReport run_validate(const ValidateJob& job);

// The failed gates of a measured report (fills nothing else).
std::vector<std::string> gate_failures(const ValidateReport& report, const Gates& gates);

// Writes report.to_json() to `path` atomically.
void write_report(const std::filesystem::path& path, const ValidateReport& report);

}  // namespace pq::validate
