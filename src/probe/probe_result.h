#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "io/safetensors.h"

namespace pq::probe {

// probe.json (docs/probe-artifacts.md): written last by run_probe, read by ProbeResult::read.
inline constexpr std::string_view kProbeSchema = "prismaquant.probe/2";
inline constexpr const char* kProbeJsonFile = "probe.json";

// One Linear of probe.json.
struct ProbedLinear {
  std::string name;
  std::string input_key;
  std::int64_t out_features = 0;
  std::int64_t in_features = 0;
  double fisher_trace = 0.0;  // mean over calibration sequences of ||dL_s/dW||_F^2, or 0 when
                              // the probe recorded none (ProbeResult::has_fisher)
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

// One attention layer's key/value cache over the calibration set (a probe run with --kv-cache):
// the largest |key| (after the k norm and RoPE) and |value| it cached. Layer num_hidden_layers is
// the MTP head's.
struct ProbedKvCache {
  std::int64_t layer = 0;
  std::int64_t tokens = 0;
  float key_amax = 0.0f;
  float value_amax = 0.0f;
};

// A finished probe, read back: probe.json in memory, its parts' safetensors files mapped.
class ProbeResult {
 public:
  // Reads probe_dir/probe.json and maps the files it lists. Its integers must be exact and within
  // bounds, its Linears and inputs listed once, and every Linear's input described in "inputs" with
  // a Hessian [in, in] (unless "hessians" is false) and second moments [in] (F32, 4-byte aligned)
  // in the files; anything else is a pq::Error naming probe.json, so the accessors below never fail
  // for a listed Linear.
  static ProbeResult read(const std::filesystem::path& probe_dir);

  const std::string& model() const { return model_; }
  const std::string& fingerprint() const { return fingerprint_; }
  std::int64_t sequences() const { return sequences_; }
  // False for a probe run without the Fisher traces (ProbeJob::fisher): every fisher_trace is 0.
  bool has_fisher() const { return has_fisher_; }
  // False for a probe run without Hessians (ProbeJob::hessians): hessian() is empty for every
  // input, the second moments are there.
  bool has_hessians() const { return has_hessians_; }
  // The calibration sample: sequences() of seqlen() tokens drawn with seed() from the data,
  // computed in compute() ("f32", "bf16"); absent where probe.json does not say.
  const std::optional<std::int64_t>& seqlen() const { return seqlen_; }
  const std::optional<std::uint64_t>& seed() const { return seed_; }
  const std::optional<std::string>& compute() const { return compute_; }
  const std::vector<ProbedLinear>& linears() const { return linears_; }
  const std::vector<ProbedRouting>& routing() const { return routing_; }
  // Absent unless the probe recorded the KV cache (ProbeJob::kv_cache); then one per attention
  // layer, by layer.
  const std::optional<std::vector<ProbedKvCache>>& kv_cache() const { return kv_cache_; }
  // pq::Error naming the Linear when the probe did not measure it.
  const ProbedLinear& linear(std::string_view name) const;
  // X^T X summed over the input's tokens, [in, in] row-major (empty without has_hessians());
  // tokens of the input.
  std::span<const float> hessian(std::string_view input_key) const;
  std::int64_t input_tokens(std::string_view input_key) const;
  // The Hessian and token count of the input's held-out rows alone (a probe with
  // ProbeJob::holdout_hessian; hessian() includes them): an empty span and 0 otherwise.
  std::span<const float> holdout_hessian(std::string_view input_key) const;
  std::int64_t holdout_tokens(std::string_view input_key) const;
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
  bool has_fisher_ = true;
  bool has_hessians_ = true;
  std::optional<std::int64_t> seqlen_;
  std::optional<std::uint64_t> seed_;
  std::optional<std::string> compute_;
  std::vector<ProbedLinear> linears_;
  std::map<std::string, std::size_t, std::less<>> linear_index_;
  std::map<std::string, std::int64_t, std::less<>> input_tokens_;
  std::map<std::string, std::int64_t, std::less<>> holdout_tokens_;  // inputs that have them
  std::map<std::string, float, std::less<>> input_amax_;
  std::vector<ProbedRouting> routing_;
  std::optional<std::vector<ProbedKvCache>> kv_cache_;
  std::vector<std::unique_ptr<io::SafetensorsFile>> tensors_;
  std::map<std::string, std::size_t, std::less<>> tensor_file_;  // tensor -> index in tensors_
};

}  // namespace pq::probe
