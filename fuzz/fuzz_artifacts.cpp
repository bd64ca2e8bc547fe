// libFuzzer target: the stage artifacts that later stages and resumed runs read back. The first
// byte picks the reader, the rest is the file:
//   0: WORK/cost/cost.json through alloc::cost_table_from_json (read_cost_table's parser), as
//      allocate, scout and a reused cost stage read it;
//   1: WORK/alloc/assignment.json through alloc::assignment_from_json (read_assignment's parser),
//      as export reads it;
//   2: a probe directory through probe::ProbeResult::read, as cost, scout and export read it: the
//      bytes before the first NUL are probe.json, the bytes after it probe.layer-0000.safetensors;
//   3: a probe part file (the pass's probe.<part>.safetensors) through ProbeAccumulator::load
//      over a fixed one-layer Llama spec, as a resumed probe reads its finished parts.
// The readers must throw pq::Error or return something consistent (checked here, abort
// otherwise); every value an accepted probe exposes is read, so AddressSanitizer sees any span
// that points outside its file and UndefinedBehaviorSanitizer any misaligned float.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "alloc/assignment.h"
#include "alloc/cost_table.h"
#include "common/error.h"
#include "common/json_reader.h"
#include "model/model_spec.h"
#include "model/profile.h"
#include "probe/probe_accumulator.h"
#include "probe/probe_result.h"

namespace {

namespace fs = std::filesystem;

void write_file(const fs::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) std::abort();
}

const fs::path& directory() {
  static const fs::path path = [] {
    char pattern[] = "/tmp/fuzz_artifacts.XXXXXX";
    if (mkdtemp(pattern) == nullptr) std::abort();
    return fs::path(pattern);
  }();
  return path;
}

void cost_table(std::string_view text) {
  const auto table =
      pq::alloc::cost_table_from_json(pq::parse_json(text, "cost.json"), "cost.json");
  if (table.formats.empty() || table.linears.empty()) std::abort();
  for (std::size_t f = 0; f < table.formats.size(); ++f) {
    if (table.format_index(table.formats[f]) != f) std::abort();
  }
  for (const auto& linear : table.linears) {
    if (linear.shape.size() != 2 || linear.costs.size() != table.formats.size() ||
        linear.params != static_cast<std::uint64_t>(linear.shape[0]) *
                             static_cast<std::uint64_t>(linear.shape[1])) {
      std::abort();
    }
  }
  table.quantizable_params();
}

void assignment(std::string_view text) {
  const auto file =
      pq::alloc::assignment_from_json(pq::parse_json(text, "assignment.json"), "assignment.json");
  std::uint64_t params = 0;
  std::uint64_t linears = 0;
  for (const auto& linear : file.linears) params += linear.params;
  for (const auto& [format, tally] : file.totals.per_format) linears += tally.linears;
  if (params != file.totals.quantizable_params || linears != file.linears.size() ||
      file.totals.checkpoint_params < file.totals.quantizable_params) {
    std::abort();
  }
}

void check_probe(const pq::probe::ProbeResult& probe, float& sum) {
  for (const auto& linear : probe.linears()) {
    if (&probe.linear(linear.name) != &linear || linear.out_features <= 0 ||
        linear.in_features <= 0 || linear.tokens < 0 || !(linear.fisher_trace >= 0.0)) {
      std::abort();
    }
    const auto in = static_cast<std::uint64_t>(linear.in_features);
    const auto hessian = probe.hessian(linear.input_key);
    const auto moments = probe.act_second_moment(linear.input_key);
    if (hessian.size() != in * in || moments.size() != in ||
        probe.input_tokens(linear.input_key) < 0 || !(probe.input_amax(linear.input_key) >= 0.0f)) {
      std::abort();
    }
    for (const float value : hessian) sum += value;
    for (const float value : moments) sum += value;
  }
}

void probe_result(std::string_view bytes) {
  const fs::path dir = directory() / "probe";
  fs::create_directories(dir);
  const std::size_t split = std::min(bytes.find('\0'), bytes.size());
  write_file(dir / "probe.json", bytes.substr(0, split));
  write_file(dir / "probe.layer-0000.safetensors", bytes.substr(std::min(split + 1, bytes.size())));
  const auto probe = pq::probe::ProbeResult::read(dir);
  if (probe.sequences() < 0) std::abort();
  // read() promises every statistic the stages ask for, with the Linear's widths: an accessor that
  // throws after read() accepted the directory is a finding too.
  float sum = 0.0f;
  try {
    check_probe(probe, sum);
  } catch (const pq::Error&) {
    std::abort();
  }
  static volatile float sink;
  sink = sum;  // keeps the reads
}

// A one-layer Llama (hidden 8, two heads of 4, one KV head, MLP 8): seven candidate Linears over
// four distinct inputs, the spec fuzz/make_seeds.py writes part files for.
const pq::model::ModelSpec& part_spec() {
  static const pq::model::ModelSpec spec = [] {
    const auto config = pq::model::ModelConfig::from_json(
        {{"architectures", nlohmann::json::array({"LlamaForCausalLM"})},
         {"hidden_size", 8},
         {"intermediate_size", 8},
         {"num_hidden_layers", 1},
         {"num_attention_heads", 2},
         {"num_key_value_heads", 1},
         {"vocab_size", 16},
         {"tie_word_embeddings", true}},
        "part spec");
    const std::vector<pq::model::TensorDesc> tensors = {
        {"model.embed_tokens.weight", pq::io::DType::BF16, {16, 8}},
        {"model.norm.weight", pq::io::DType::BF16, {8}},
        {"model.layers.0.input_layernorm.weight", pq::io::DType::BF16, {8}},
        {"model.layers.0.post_attention_layernorm.weight", pq::io::DType::BF16, {8}},
        {"model.layers.0.self_attn.q_proj.weight", pq::io::DType::BF16, {8, 8}},
        {"model.layers.0.self_attn.k_proj.weight", pq::io::DType::BF16, {4, 8}},
        {"model.layers.0.self_attn.v_proj.weight", pq::io::DType::BF16, {4, 8}},
        {"model.layers.0.self_attn.o_proj.weight", pq::io::DType::BF16, {8, 8}},
        {"model.layers.0.mlp.gate_proj.weight", pq::io::DType::BF16, {8, 8}},
        {"model.layers.0.mlp.up_proj.weight", pq::io::DType::BF16, {8, 8}},
        {"model.layers.0.mlp.down_proj.weight", pq::io::DType::BF16, {8, 8}},
    };
    return pq::model::build_model_spec(config, tensors, "part spec");
  }();
  return spec;
}

void probe_part(std::string_view bytes) {
  const fs::path path = directory() / "probe.layer-0000.safetensors";
  write_file(path, bytes);
  const pq::io::SafetensorsFile file(path);
  pq::probe::ProbeAccumulator sums(part_spec());
  sums.load(file);
  for (const auto& input : sums.inputs()) {
    const auto in = static_cast<std::uint64_t>(input.in_features);
    if (input.hessian.size() != in * in) std::abort();
  }
  for (const auto& [layer, routing] : sums.routing()) {
    if (routing.layer != layer || routing.route_counts.size() != routing.probability_sums.size()) {
      std::abort();
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::string_view rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  try {
    switch (data[0] % 4) {
      case 0:
        cost_table(rest);
        break;
      case 1:
        assignment(rest);
        break;
      case 2:
        probe_result(rest);
        break;
      default:
        probe_part(rest);
        break;
    }
  } catch (const pq::Error&) {
    // Rejecting malformed input with a pq::Error is the expected outcome.
  }
  return 0;
}
