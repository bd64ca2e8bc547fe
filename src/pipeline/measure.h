#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "export/exporter.h"
#include "export/linear_encoder.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "runtime/evaluate.h"
#include "runtime/forward_checkpoint.h"

namespace pq::pipeline {

// The first `count` windows of `seqlen` tokens of the data's held-out split
// (validate::heldout_windows): token ids, or text tokenized with model_dir/tokenizer.json
// (data::load_token_dataset).
std::vector<std::vector<std::int32_t>> heldout_windows(const std::filesystem::path& model_dir,
                                                       const std::filesystem::path& data,
                                                       bool token_ids, std::size_t count,
                                                       std::size_t seqlen);

// The held-out quality of an assignment (Linear name -> format name) run with the exact weights
// the exporter writes for it (LinearEncoder) and the activation quantization vLLM on the
// encoder's target runs (exporter::serving_activations), against the source model's logits, in
// float32. Each Linear is decoded as the runtime loads it (EncodedLinears); with the encoder's
// render cache, layers are not kept resident and each is rendered once, stored for the export.
// With `kv_cache`, the figures are measured a second time with vLLM's FP8 KV cache simulated
// (MeasuredQuality::fp8_kv_cache); the first measurement keeps the default bf16 cache. With
// `resume_dir`, each pass keeps its layer boundaries below it (runtime::ForwardCheckpoint, under a
// fingerprint of the encoder, the assignment and the windows), so that a killed run measuring the
// same again resumes after its last finished layer; the directory is the caller's to remove.
exporter::MeasuredQuality measure_assignment(const model::ModelConfig& config,
                                             const io::Checkpoint& source,
                                             const exporter::LinearEncoder& encoder,
                                             const std::map<std::string, std::string>& format_of,
                                             const runtime::ReferenceLogits& reference,
                                             const runtime::Fp8KvCache* kv_cache = nullptr,
                                             const std::filesystem::path& resume_dir = {});

// The resumable pass of the source model over `windows` that a ReferenceLogits of the quantize
// pipeline runs (runtime::ForwardCheckpoint in `dir`), fingerprinted by the source checkpoint and
// the windows.
runtime::ForwardCheckpoint reference_pass(const std::filesystem::path& dir,
                                          const std::filesystem::path& model_dir,
                                          std::span<const std::vector<std::int32_t>> windows);

}  // namespace pq::pipeline
