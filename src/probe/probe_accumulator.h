#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "io/safetensors_writer.h"
#include "model/model_spec.h"
#include "runtime/model.h"
#include "runtime/observer.h"

namespace pq::probe {

// Running sums for one quantizable Linear.
struct LinearSums {
  std::string name;
  std::string input_key;
  std::int64_t out_features = 0;
  std::int64_t in_features = 0;
  // Sum over calibration sequences s of ||G_s||_F^2, G_s = dL_s/dW = sum over s's rows of dY^T X.
  double fisher_sum = 0.0;
  std::int64_t tokens = 0;  // rows seen (for a MoE expert: rows routed to it)
};

// Running sums for one distinct Linear input.
struct InputSums {
  std::string key;
  std::int64_t in_features = 0;
  std::vector<float> hessian;  // X^T X, [in, in]; empty with ProbeAccumulator::skip_hessians
  // sum over the rows of x_j^2, [in]: the Hessian's diagonal alone, with skip_hessians
  std::vector<double> square_sums{};
  std::int64_t tokens = 0;
  // X^T X over the held-out sequences' rows only (ProbeAccumulator::record_holdout), which
  // `hessian` includes; empty unless recorded.
  std::vector<float> holdout_hessian{};
  std::int64_t holdout_tokens = 0;
  float amax = 0.0f;  // max |x|: NVFP4 W4A4's input_global_scale is 448*6/amax
};

// Router statistics of one MoE layer.
struct RoutingSums {
  std::int64_t layer = 0;
  std::int64_t top_k = 0;
  std::int64_t tokens = 0;
  std::vector<std::int64_t> route_counts;  // [experts], tokens routed to each expert
  std::vector<double> probability_sums;    // [experts], summed router softmax probabilities
};

// What one attention layer put in its key/value cache over the calibration set (after the k norm
// and RoPE, as vLLM caches them): the FP8 KV cache scales are amax / 448 (runtime::Fp8KvCache).
struct KvCacheSums {
  std::int64_t layer = 0;
  std::int64_t tokens = 0;
  float key_amax = 0.0f;
  float value_amax = 0.0f;
};

// Observes backward passes and accumulates, for every candidate Linear of the spec, the empirical
// Fisher trace numerator (per sequence, not of the batch gradient: method-facts.md §2 shows the
// upstream probe squares the summed batch gradient instead) and, per distinct input (input_key),
// the Hessian X^T X; for every MoE layer, route counts and router probabilities. Batches must be
// framed by begin_batch()/end_batch().
class ProbeAccumulator final : public runtime::LinearObserver {
 public:
  // Accumulates the spec's candidate Linears for which `keep` is true (default: all); the probe
  // keeps one decoder layer's at a time, so only that layer's Hessians are in memory.
  // With ComputeType::kBF16 the per-sequence weight gradients dY^T X take bf16 inputs (fp32
  // accumulation and squares in double, as in fp32); the Hessians are always fp32.
  explicit ProbeAccumulator(const model::ModelSpec& spec,
                            const std::function<bool(const model::Linear&)>& keep = {},
                            runtime::ComputeType compute = runtime::ComputeType::kF32);

  void begin_batch();
  // Counts the batch's sequences, checks that Linears sharing an input saw the same rows and
  // completes the Hessians (accumulated in their upper triangles) to full symmetric matrices.
  void end_batch(std::int64_t sequences);

  void on_linear(const runtime::LinearActivity& activity) override;
  void on_routing(const runtime::RoutingActivity& routing) override;
  void on_kv_cache(const runtime::KvCacheActivity& kv) override;

  // Also records each attention layer's key/value amax (KvCacheSums), saved with the other sums.
  // Off by default, so a probe without --kv-cache writes exactly what it wrote before.
  void record_kv_cache() { record_kv_cache_ = true; }
  const std::map<std::int64_t, KvCacheSums>& kv_cache() const { return kv_cache_; }

  // Also sums each input's X^T X over the rows of sequences numbered `first_sequence` and later
  // (the held-out calibration rows, ProbeJob::holdout_hessian) into InputSums::holdout_hessian,
  // saved with the other sums. Off by default, so other probes write what they wrote before.
  void record_holdout(std::int64_t first_sequence);
  bool records_holdout() const { return holdout_from_ >= 0; }

  // Sums only what a forward pass shows (Hessians, amax, routing, KV cache): the Linears may be
  // reported without output gradients, and the Fisher sums stay 0 (ProbeJob::fisher off).
  void skip_fisher() { fisher_ = false; }

  // Sums each input's x_j^2 (InputSums::square_sums) instead of its Hessian X^T X: in^2 x 4
  // bytes an input are what the Hessians of a model take on disk (121 GB for the experts of a
  // Qwen3-30B-A3B, terabytes for a DeepSeek-V3), so a probe whose Hessians the cost's KL-Fisher
  // pass measures itself, a layer at a time, stores none (ProbeJob::hessians). Before any
  // accumulation; not with record_holdout.
  void skip_hessians();
  bool records_hessians() const { return hessians_; }

  std::int64_t sequences() const { return sequences_; }
  const std::vector<LinearSums>& linears() const { return linears_; }
  const std::vector<InputSums>& inputs() const { return inputs_; }
  const std::map<std::int64_t, RoutingSums>& routing() const { return routing_; }
  const InputSums& input(const std::string& key) const;

  // Stores every sum as tensors (the resumable probe's checkpoint) and reads them back; load()
  // requires a file written by an accumulator over the same spec.
  void save(io::SafetensorsWriter& writer) const;
  void load(const io::SafetensorsFile& file);

 private:
  void accumulate_fisher(const runtime::LinearActivity& activity, LinearSums& linear);

  runtime::ComputeType compute_;
  std::vector<LinearSums> linears_;
  std::map<std::string, std::size_t, std::less<>> linear_index_;
  std::vector<InputSums> inputs_;
  std::map<std::string, std::size_t, std::less<>> input_index_;
  std::map<std::int64_t, RoutingSums> routing_;
  bool record_kv_cache_ = false;
  std::map<std::int64_t, KvCacheSums> kv_cache_;
  std::int64_t holdout_from_ = -1;  // the first held-out sequence; -1: none recorded
  bool fisher_ = true;
  bool hessians_ = true;
  std::int64_t sequences_ = 0;
  // Per batch: which Linear accumulates each input's Hessian (the first to report it).
  std::map<std::size_t, std::size_t> input_owner_;
  std::vector<std::int64_t> batch_rows_linear_;
  std::vector<std::int64_t> batch_rows_input_;
  std::vector<float> gradient_;                  // scratch G_s
  std::vector<std::uint16_t> dy_bf16_, x_bf16_;  // scratch: one sequence's rows in bf16
};

}  // namespace pq::probe
