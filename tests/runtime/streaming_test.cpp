#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <random>
#include <string>

#include "io/safetensors.h"
#include "io/safetensors_writer.h"
#include "runtime/kernels/gemm.h"
#include "runtime/model.h"
#include "runtime/tiny_models.h"
#include "support/test_support.h"

namespace pq::runtime {
namespace {

// A field of /proc/self/status in kB (VmRSS, VmHWM).
std::int64_t status_kb(const std::string& field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::stoll(line.substr(field.size() + 1));
  }
  ADD_FAILURE() << field << " not in /proc/self/status";
  return 0;
}

// Resets VmHWM to the current RSS (proc(5), /proc/pid/clear_refs, value 5).
bool reset_peak_rss() {
  std::ofstream out("/proc/self/clear_refs");
  out << "5";
  return static_cast<bool>(out.flush());
}

// Writes a BF16 checkpoint of `config` with small random weights, tensor by tensor, without
// holding the model in memory.
void write_random_checkpoint(const nlohmann::json& config_json, const std::filesystem::path& dir) {
  const auto config = model::ModelConfig::from_json(config_json, "synthetic");
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "config.json") << config_json.dump(2);
  io::SafetensorsWriter writer(dir / "model.safetensors");
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> uniform(-0.05f, 0.05f);
  const auto add = [&](const std::string& name, std::vector<std::int64_t> shape, float offset) {
    std::int64_t numel = 1;
    for (auto d : shape) numel *= d;
    std::vector<float> values(numel);
    for (float& v : values) v = offset + uniform(rng);
    std::vector<std::uint16_t> bits(numel);
    convert_f32_to_bf16(values, bits);
    writer.add(name, io::DType::BF16, shape,
               {reinterpret_cast<const std::uint8_t*>(bits.data()), bits.size() * 2});
  };
  const std::int64_t h = config.hidden_size, i = config.intermediate_size;
  const std::int64_t q = config.num_attention_heads * config.head_dim;
  const std::int64_t kv = config.num_key_value_heads * config.head_dim;
  add("model.embed_tokens.weight", {config.vocab_size, h}, 0.0f);
  add("model.norm.weight", {h}, 1.0f);
  for (std::int64_t l = 0; l < config.num_hidden_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    add(p + "input_layernorm.weight", {h}, 1.0f);
    add(p + "post_attention_layernorm.weight", {h}, 1.0f);
    add(p + "self_attn.q_proj.weight", {q, h}, 0.0f);
    add(p + "self_attn.k_proj.weight", {kv, h}, 0.0f);
    add(p + "self_attn.v_proj.weight", {kv, h}, 0.0f);
    add(p + "self_attn.o_proj.weight", {h, q}, 0.0f);
    add(p + "mlp.gate_proj.weight", {i, h}, 0.0f);
    add(p + "mlp.up_proj.weight", {i, h}, 0.0f);
    add(p + "mlp.down_proj.weight", {h, i}, 0.0f);
  }
  writer.commit();
}

// AddressSanitizer's quarantine keeps freed blocks resident for a while (61.8 MB of growth seen
// against 21.8 MB uninstrumented), so under it the test only shows that far less than the model
// is resident; the one-layer bound applies to the uninstrumented build.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kAllocatorQuarantine = true;
#else
constexpr bool kAllocatorQuarantine = false;
#endif

// Streaming: a 16-layer checkpoint (about 200 MB as decoded float32) run forward and backward
// from its memory map must keep the peak resident set near one decoded layer (12.6 MB), not the
// model: each layer is decoded when reached, its mapped pages dropped, and the decoded copy
// freed when the layer is done.
TEST(Streaming, PeakResidentMemoryStaysNearOneLayer) {
  test::TempDir tmp;
  const nlohmann::json config_json =
      synthetic::tiny_config("LlamaForCausalLM", {{"hidden_size", 512},
                                                  {"intermediate_size", 1536},
                                                  {"num_hidden_layers", 16},
                                                  {"num_attention_heads", 8},
                                                  {"num_key_value_heads", 4},
                                                  {"head_dim", 64},
                                                  {"vocab_size", 256},
                                                  {"tie_word_embeddings", true}});
  write_random_checkpoint(config_json, tmp.path() / "model");
  const auto config = model::ModelConfig::from_json(config_json, "synthetic");
  const std::int64_t layer_bytes =
      4 * (2 * 512 * 512 + 2 * 256 * 512 + 3 * 512 * 1536);  // decoded f32 Linears of a layer
  const std::int64_t model_bytes = layer_bytes * config.num_hidden_layers;

  const auto checkpoint = io::Checkpoint::open(tmp.path() / "model");
  const CheckpointWeightSource weights(checkpoint);
  std::vector<Sequence> batch(2);
  for (int t = 0; t < 64; ++t) {
    batch[0].tokens.push_back((t * 31 + 7) % 256);
    batch[1].tokens.push_back((t * 17 + 3) % 256);
  }
  Model model(config, weights);
  ASSERT_TRUE(reset_peak_rss()) << "cannot write /proc/self/clear_refs";
  const std::int64_t before_kb = status_kb("VmRSS");
  struct : LinearObserver {
    void on_linear(const LinearActivity&) override {}
  } observer;
  const double loss = model.backward(batch, observer);
  const std::int64_t peak_kb = status_kb("VmHWM");
  const std::int64_t growth = (peak_kb - before_kb) * 1024;
  std::printf(
      "streaming: loss %.3f; peak RSS growth during forward+backward %.1f MB; one decoded "
      "layer %.1f MB; whole decoded model %.1f MB\n",
      loss, growth / 1e6, layer_bytes / 1e6, model_bytes / 1e6);
  EXPECT_TRUE(std::isfinite(loss));
  EXPECT_LT(growth, kAllocatorQuarantine ? model_bytes / 2 : 3 * layer_bytes);
}

}  // namespace
}  // namespace pq::runtime
