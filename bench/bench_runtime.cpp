// Runtime throughput: forward and forward+backward tokens/s of pq::runtime::Model, fp32 and
// bf16, on ../shared/models/qwen3-dense-tiny and on a synthetic model with 1B-class layer shapes
// (Qwen3 layout, hidden 2048, intermediate 6144, 16 heads, 8 kv heads, head_dim 128; random
// weights in memory). Achieved GFLOP/s counts model FLOPs only (2 per multiply-add of every
// Linear, attention over visible pairs; backward = 2x forward; the runtime's recomputation of
// each layer during backward is not counted), and is set against the bf16 GEMM peak measured
// first in the same run (BM_Bf16GemmPeak, its fastest iteration).
//
// Rates are per second of the main thread's CPU time (Google Benchmark's default clock), not
// wall time: the main thread works in every OpenMP region, so on an idle machine the two agree,
// and on a shared machine CPU time leaves out the time the process waited for a core. Run with
// OMP_NUM_THREADS=1 for per-core figures that other load cannot distort.
//
// Layers stay resident (RuntimeOptions::keep_layers_resident) so that weight decoding is not
// timed. The backward observer computes every weight gradient dW = dY^T X in the compute type:
// the third GEMM of each Linear, which the runtime leaves to its observer.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <ctime>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "model/config.h"
#include "runtime/kernels/gemm.h"
#include "runtime/model.h"
#include "runtime/observer.h"
#include "runtime/weights.h"

namespace {

namespace rt = pq::runtime;

// CPU time of the calling thread, the clock Google Benchmark's rates use (see the file comment).
double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

// Measured by BM_Bf16GemmPeak, which runs first.
double g_bf16_peak_gflops = 0.0;

void BM_Bf16GemmPeak(benchmark::State& state) {
  // The 1B-class forward GEMM with the most work: x [2048, 2048] times gate/up W^T [2048, 6144].
  const std::int64_t m = 2048, n = 6144, k = 2048;
  std::vector<std::uint16_t> a(m * k, 0x3f80), b(n * k, 0x3c00);  // 1.0 and 2^-7
  std::vector<float> c(m * n);
  const double gflop = 2.0 * m * n * k / 1e9;
  for (auto _ : state) {
    const double start = thread_cpu_seconds();
    rt::gemm_bf16(rt::Transpose::kNo, rt::Transpose::kYes, m, n, k, 1.0f, a.data(), k, b.data(), k,
                  0.0f, c.data(), n);
    benchmark::DoNotOptimize(c.data());
    g_bf16_peak_gflops = std::max(g_bf16_peak_gflops, gflop / (thread_cpu_seconds() - start));
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(gflop, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["best GFLOP/s"] = g_bf16_peak_gflops;
}

// dW = dY^T X for every Linear, in the model's compute type; gradients of earlier calls are
// overwritten (only the work matters here).
class WeightGradientWork final : public rt::LinearObserver {
 public:
  explicit WeightGradientWork(rt::ComputeType compute) : compute_(compute) {}

  void on_linear(const rt::LinearActivity& a) override {
    if (a.output_grad == nullptr || a.rows == 0) return;
    std::vector<float>& dw = gradients_[std::string(a.name)];
    dw.resize(a.out_features * a.in_features);
    if (compute_ == rt::ComputeType::kF32) {
      rt::gemm_f32(rt::Transpose::kYes, rt::Transpose::kNo, a.out_features, a.in_features, a.rows,
                   1.0f, a.output_grad, a.out_features, a.input, a.in_features, 0.0f, dw.data(),
                   a.in_features);
      return;
    }
    dy_.resize(a.rows * a.out_features);
    x_.resize(a.rows * a.in_features);
    rt::convert_f32_to_bf16({a.output_grad, dy_.size()}, dy_);
    rt::convert_f32_to_bf16({a.input, x_.size()}, x_);
    rt::gemm_bf16(rt::Transpose::kYes, rt::Transpose::kNo, a.out_features, a.in_features, a.rows,
                  1.0f, dy_.data(), a.out_features, x_.data(), a.in_features, 0.0f, dw.data(),
                  a.in_features);
  }

 private:
  rt::ComputeType compute_;
  std::vector<std::uint16_t> dy_, x_;
  std::map<std::string, std::vector<float>> gradients_;
};

// Model FLOPs of one forward pass over `batch` (see the file comment).
double forward_flops(const pq::model::ModelConfig& c, std::span<const rt::Sequence> batch) {
  const double heads_dim = double(c.num_attention_heads) * c.head_dim;
  const double kv_dim = double(c.num_key_value_heads) * c.head_dim;
  const double linear_params = c.hidden_size * (heads_dim + 2 * kv_dim) +
                               heads_dim * c.hidden_size +
                               3.0 * c.hidden_size * c.intermediate_size;
  double tokens = 0, pairs = 0;
  for (const rt::Sequence& s : batch) {
    const double t = double(s.tokens.size());
    tokens += t;
    pairs += t * (t + 1) / 2;
  }
  const double per_layer =
      2 * tokens * linear_params + 4 * c.head_dim * c.num_attention_heads * pairs;
  return c.num_hidden_layers * per_layer + 2 * tokens * c.hidden_size * double(c.vocab_size);
}

std::vector<rt::Sequence> random_batch(std::int64_t sequences, std::int64_t length,
                                       std::int64_t vocab) {
  std::mt19937 rng(42);
  std::uniform_int_distribution<std::int32_t> token(0, static_cast<std::int32_t>(vocab - 1));
  std::vector<rt::Sequence> batch(sequences);
  for (rt::Sequence& s : batch) {
    s.tokens.resize(length);
    for (std::int32_t& t : s.tokens) t = token(rng);
  }
  return batch;
}

// A Qwen3 model with 1B-class layers (Qwen3-1.7B's hidden/heads, 6144 intermediate) and a small
// vocabulary so that the decoder layers dominate.
struct SyntheticModel {
  pq::model::ModelConfig config;
  rt::InMemoryWeightSource weights;

  SyntheticModel() {
    const nlohmann::json json = {{"architectures", {"Qwen3ForCausalLM"}},
                                 {"model_type", "qwen3"},
                                 {"hidden_size", 2048},
                                 {"intermediate_size", 6144},
                                 {"num_hidden_layers", 2},
                                 {"num_attention_heads", 16},
                                 {"num_key_value_heads", 8},
                                 {"head_dim", 128},
                                 {"vocab_size", 8192},
                                 {"max_position_embeddings", 4096},
                                 {"rms_norm_eps", 1e-6},
                                 {"rope_theta", 1000000.0},
                                 {"tie_word_embeddings", true},
                                 {"hidden_act", "silu"},
                                 {"torch_dtype", "bfloat16"}};
    config = pq::model::ModelConfig::from_json(json, "synthetic 1B-class config");
    std::mt19937 rng(7);
    std::normal_distribution<float> dist(0.0f, 0.02f);
    auto add = [&](const std::string& name, std::vector<std::int64_t> shape, bool ones) {
      std::int64_t size = 1;
      for (std::int64_t d : shape) size *= d;
      std::vector<float> values(size, 1.0f);
      if (!ones) std::generate(values.begin(), values.end(), [&] { return dist(rng); });
      weights.set(name, std::move(shape), std::move(values));
    };
    const std::int64_t h = config.hidden_size, i = config.intermediate_size, d = config.head_dim;
    const std::int64_t q = config.num_attention_heads * d, kv = config.num_key_value_heads * d;
    add("model.embed_tokens.weight", {config.vocab_size, h}, false);
    add("model.norm.weight", {h}, true);
    for (std::int64_t l = 0; l < config.num_hidden_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      add(p + "input_layernorm.weight", {h}, true);
      add(p + "post_attention_layernorm.weight", {h}, true);
      add(p + "self_attn.q_norm.weight", {d}, true);
      add(p + "self_attn.k_norm.weight", {d}, true);
      add(p + "self_attn.q_proj.weight", {q, h}, false);
      add(p + "self_attn.k_proj.weight", {kv, h}, false);
      add(p + "self_attn.v_proj.weight", {kv, h}, false);
      add(p + "self_attn.o_proj.weight", {h, q}, false);
      add(p + "mlp.gate_proj.weight", {i, h}, false);
      add(p + "mlp.up_proj.weight", {i, h}, false);
      add(p + "mlp.down_proj.weight", {h, i}, false);
    }
  }
};

const SyntheticModel& synthetic_model() {
  static const SyntheticModel model;
  return model;
}

// ../shared/models/qwen3-dense-tiny, or nullptr when ../shared is absent.
struct TinyModel {
  pq::io::Checkpoint checkpoint;
  pq::model::ModelConfig config;
  rt::CheckpointWeightSource weights;
  explicit TinyModel(const std::filesystem::path& dir)
      : checkpoint(pq::io::Checkpoint::open(dir)),
        config(pq::model::ModelConfig::load(dir)),
        weights(checkpoint) {}
};

const TinyModel* tiny_model() {
  static const std::unique_ptr<TinyModel> model = []() -> std::unique_ptr<TinyModel> {
    const char* env = std::getenv("PQ_SHARED_DIR");
    const std::filesystem::path dir =
        std::filesystem::path(env != nullptr ? env : PQ_BENCH_SHARED_DIR) / "models" /
        "qwen3-dense-tiny";
    if (!std::filesystem::exists(dir / "config.json")) return nullptr;
    return std::make_unique<TinyModel>(dir);
  }();
  return model.get();
}

enum class Pass { kForward, kForwardBackward };

// Arguments: compute (0 = f32, 1 = bf16), pass (0 = forward, 1 = forward+backward), sequences,
// sequence length.
void run_model(benchmark::State& state, const pq::model::ModelConfig& config,
               const rt::WeightSource& weights) {
  const auto compute = state.range(0) == 0 ? rt::ComputeType::kF32 : rt::ComputeType::kBF16;
  const auto pass = state.range(1) == 0 ? Pass::kForward : Pass::kForwardBackward;
  rt::RuntimeOptions options;
  options.compute = compute;
  options.keep_layers_resident = true;
  rt::Model model(config, weights, options);
  const std::vector<rt::Sequence> batch =
      random_batch(state.range(2), state.range(3), config.vocab_size);
  WeightGradientWork observer(compute);
  model.loss(batch);  // loads the layers and creates the GEMM primitives outside the timing
  if (pass == Pass::kForwardBackward) model.backward(batch, observer);
  for (auto _ : state) {
    const double loss =
        pass == Pass::kForward ? model.loss(batch) : model.backward(batch, observer);
    benchmark::DoNotOptimize(loss);
  }
  const double tokens = double(state.range(2) * state.range(3));
  const double gflop = forward_flops(config, batch) * (pass == Pass::kForward ? 1 : 3) / 1e9;
  using benchmark::Counter;
  state.counters["tokens/s"] = Counter(tokens, Counter::kIsIterationInvariantRate);
  state.counters["GFLOP/s"] = Counter(gflop, Counter::kIsIterationInvariantRate);
  state.counters["%bf16_peak"] =
      Counter(100.0 * gflop / g_bf16_peak_gflops, Counter::kIsIterationInvariantRate);
}

void BM_Synthetic1B(benchmark::State& state) {
  const SyntheticModel& model = synthetic_model();
  run_model(state, model.config, model.weights);
}

void BM_Qwen3DenseTiny(benchmark::State& state) {
  const TinyModel* model = tiny_model();
  if (model == nullptr) return state.SkipWithError("../shared/models/qwen3-dense-tiny not found");
  run_model(state, model->config, model->weights);
}

void runtime_args(benchmark::internal::Benchmark* bench, std::int64_t sequences,
                  std::int64_t length) {
  bench->ArgNames({"bf16", "backward", "seqs", "len"});
  for (int compute : {0, 1})
    for (int pass : {0, 1}) bench->Args({compute, pass, sequences, length});
  bench->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_Bf16GemmPeak)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Qwen3DenseTiny)->Apply([](auto* b) { runtime_args(b, 8, 512); });
BENCHMARK(BM_Synthetic1B)->Apply([](auto* b) { runtime_args(b, 4, 512); });
BENCHMARK(BM_Synthetic1B)->Apply([](auto* b) { runtime_args(b, 1, 2048); });

}  // namespace

BENCHMARK_MAIN();
