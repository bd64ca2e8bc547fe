#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "model/model_spec.h"
#include "runtime/weights.h"

namespace pq::probe {

// A probe of the quantized model rather than the source: the Linears run with these weights and
// activation quantization, so the statistics describe the activations an assignment produces
// (scout's perturbed fixed point, docs/scout.md). Neither pointer is owned.
struct QuantizedRun {
  const runtime::WeightTransform* weights = nullptr;
  const runtime::ActivationQuantizer* activations = nullptr;
  // Identifies the weights and activations (assignment and rounding) in the probe's fingerprint.
  std::string tag;
};

// What `prismaquant probe` was asked to do.
struct ProbeJob {
  std::filesystem::path
      model;                   // HF checkpoint directory (config.json, safetensors, tokenizer.json)
  std::filesystem::path data;  // calibration text (plain text or JSONL, src/data)
  std::filesystem::path out;   // WORK/probe; created when missing
  std::size_t nsamples = 32;
  std::size_t seqlen = 1024;
  std::uint64_t seed = 42;
  bool importance_weighting = true;
  // Sequences per micro-batch: the probe is one layer-major pass over all nsamples sequences,
  // which go through each layer batch_size at a time.
  std::size_t batch_size = 4;
  model::SpecOptions spec_options;
  // Peak memory the run may use, in bytes (0: 80% of the memory available when it starts); the
  // probe refuses to start, with its estimate, when it cannot fit.
  std::int64_t max_memory = 0;
  // Run at most this many steps (a layer's forward, the head, a layer's backward) and keep the
  // pass for a later run (time-sliced runs on shared machines); unset: run to completion.
  std::optional<std::size_t> stop_after_steps;
  // Unset: probe the source model.
  std::optional<QuantizedRun> quantized;
};

struct ProbeOutcome {
  bool complete = false;         // probe.json and its parts' files are written
  bool reused = false;           // they already existed for the same fingerprint
  std::size_t resumed_from = 0;  // steps found finished in the pass directory
  std::size_t steps_done = 0;
  std::size_t steps_total = 0;  // 2 x layers + 1
  std::string fingerprint;
};

// Digest of everything the probe's result depends on: the checkpoint (config.json and the
// safetensors headers), tokenizer.json, the calibration file's content and every option.
std::string probe_fingerprint(const ProbeJob& job);

// Runs the probe (docs/probe-artifacts.md): one layer-major pass over every calibration sequence,
// each layer read once forward and once backward, with the layer-boundary activations in
// out/pass/ on disk, so memory holds about one layer whatever the model size. Resumable: every
// finished step is recorded in out/pass/state.json with the fingerprint; a later run with the
// same fingerprint continues from there, and the final artifacts equal those of an uninterrupted
// run. With complete artifacts of the same fingerprint already in `out`, nothing is recomputed.
ProbeOutcome run_probe(const ProbeJob& job);

// One Linear of probe.json.
struct ProbedLinear {
  std::string name;
  std::string input_key;
  std::int64_t out_features = 0;
  std::int64_t in_features = 0;
  double fisher_trace = 0.0;  // mean over calibration sequences of ||dL_s/dW||_F^2
  std::int64_t tokens = 0;
};

// One MoE layer's router statistics.
struct ProbedRouting {
  std::int64_t layer = 0;
  std::int64_t top_k = 0;
  std::int64_t tokens = 0;
  std::vector<std::int64_t> route_counts;
  std::vector<double> mean_probability;
};

// A finished probe, read back: probe.json in memory, its parts' safetensors files mapped.
class ProbeResult {
 public:
  static ProbeResult read(const std::filesystem::path& probe_dir);

  const std::string& model() const { return model_; }
  const std::string& fingerprint() const { return fingerprint_; }
  std::int64_t sequences() const { return sequences_; }
  const std::vector<ProbedLinear>& linears() const { return linears_; }
  const std::vector<ProbedRouting>& routing() const { return routing_; }
  // pq::Error naming the Linear when the probe did not measure it.
  const ProbedLinear& linear(std::string_view name) const;
  // X^T X summed over the input's tokens, [in, in] row-major; tokens of the input.
  std::span<const float> hessian(std::string_view input_key) const;
  std::int64_t input_tokens(std::string_view input_key) const;
  // max |x| over the input's tokens.
  float input_amax(std::string_view input_key) const;
  // E[x_j^2] over the input's tokens, [in].
  std::span<const float> act_second_moment(std::string_view input_key) const;

 private:
  std::span<const float> f32_tensor(const std::string& name) const;

  std::filesystem::path dir_;
  std::string model_;
  std::string fingerprint_;
  std::int64_t sequences_ = 0;
  std::vector<ProbedLinear> linears_;
  std::map<std::string, std::size_t, std::less<>> linear_index_;
  std::map<std::string, std::int64_t, std::less<>> input_tokens_;
  std::map<std::string, float, std::less<>> input_amax_;
  std::vector<ProbedRouting> routing_;
  std::vector<std::unique_ptr<io::SafetensorsFile>> tensors_;
  std::map<std::string, std::size_t, std::less<>> tensor_file_;  // tensor -> index in tensors_
};

// The model identifier stages copy into their artifacts: the checkpoint directory's name.
std::string model_label(const std::filesystem::path& model_dir);

}  // namespace pq::probe
