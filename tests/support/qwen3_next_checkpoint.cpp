#include "support/qwen3_next_checkpoint.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "common/json_reader.h"
#include "io/safetensors_writer.h"
#include "support/test_support.h"

namespace pq::test {

using json = nlohmann::json;

std::vector<std::uint8_t> rows_of(const io::Checkpoint& checkpoint, const std::string& name,
                                  std::int64_t begin, std::int64_t end, std::int64_t index) {
  const io::TensorView view = checkpoint.view(name);
  const std::vector<std::int64_t>& shape = view.info->shape;
  const std::size_t row_bytes =
      static_cast<std::size_t>(shape.back()) * io::dtype_size(view.info->dtype);
  const std::int64_t rows = shape[shape.size() - 2];
  const std::size_t first = static_cast<std::size_t>(index * rows + begin) * row_bytes;
  return {view.bytes.begin() + first,
          view.bytes.begin() + first + static_cast<std::size_t>(end - begin) * row_bytes};
}

namespace {

void append(std::vector<std::uint8_t>& out, const std::vector<std::uint8_t>& more) {
  out.insert(out.end(), more.begin(), more.end());
}

}  // namespace

// Writes `dir` as a Qwen3NextForCausalLM checkpoint holding the source's text model and MTP head:
// flat config, "model." prefix, no vision tower, experts one tensor per expert (the inverse of
// transformers' qwen3_next conversion, §6.3), and the GDN projections fused and interleaved per
// key-head group g (§4.1): in_proj_qkvz rows [q_g | k_g | v_g | z_g], v_g and z_g holding value
// heads g*r .. g*r+r-1, and in_proj_ba rows [b_g | a_g]. A dense source lists every layer in
// mlp_only_layers and has no experts, which makes every Qwen3-Next MLP, the MTP layer's included,
// dense (transformers Qwen3NextDecoderLayer).
void write_qwen3_next(const std::filesystem::path& dir, const std::string& source_model) {
  const auto source_dir = shared_dir() / "models" / source_model;
  const io::Checkpoint source = io::Checkpoint::open(source_dir);
  const json source_config = read_json_file(source_dir / "config.json");
  const json& text = source_config.at("text_config");
  json config = text;
  for (const char* key : {"layer_types", "attn_output_gate", "mtp_num_hidden_layers",
                          "mtp_use_dedicated_embeddings", "rope_parameters", "dtype"}) {
    config.erase(key);
  }
  const bool moe = text.value("num_experts", 0) > 0;
  config["architectures"] = {"Qwen3NextForCausalLM"};
  config["model_type"] = "qwen3_next";
  config["rope_theta"] = text.at("rope_parameters").at("rope_theta");
  config["decoder_sparse_step"] = 1;
  config["mlp_only_layers"] = json::array();
  if (moe) {
    config["norm_topk_prob"] = true;
    config["intermediate_size"] = 128;
  } else {
    for (std::int64_t l = 0; l < text.at("num_hidden_layers").get<std::int64_t>(); ++l) {
      config["mlp_only_layers"].push_back(l);
    }
  }
  std::ofstream(dir / "config.json") << config.dump(2);

  const std::int64_t key_heads = text.at("linear_num_key_heads"),
                     key_head_dim = text.at("linear_key_head_dim"),
                     value_head_dim = text.at("linear_value_head_dim"),
                     ratio = text.at("linear_num_value_heads").get<std::int64_t>() / key_heads,
                     num_experts = text.value("num_experts", 0),
                     width = text.value("moe_intermediate_size", 0),
                     hidden = text.at("hidden_size");
  io::ShardedCheckpointWriter writer(dir);
  const auto add = [&](const std::string& name, io::DType dtype, std::vector<std::int64_t> shape,
                       const std::vector<std::uint8_t>& bytes) {
    writer.add(name, dtype, shape, bytes);
  };
  const std::string text_prefix = "model.language_model.";
  for (const std::string& name : source.tensor_names()) {
    if (name.starts_with("model.visual.")) continue;
    const io::TensorView view = source.view(name);
    const std::string renamed =
        name.starts_with(text_prefix) ? "model." + name.substr(text_prefix.size()) : name;
    // The module's parent: "...linear_attn." or "...mlp.experts.".
    const auto parent = [](const std::string& tensor, std::string_view leaf) {
      return tensor.substr(0, tensor.rfind(leaf));
    };
    if (name.ends_with("linear_attn.in_proj_qkv.weight")) {
      const std::string z = parent(name, "in_proj_qkv") + "in_proj_z.weight";
      std::vector<std::uint8_t> fused;
      const std::int64_t key_dim = key_heads * key_head_dim;
      const std::int64_t group_values = ratio * value_head_dim;
      for (std::int64_t g = 0; g < key_heads; ++g) {
        append(fused, rows_of(source, name, g * key_head_dim, (g + 1) * key_head_dim));
        append(fused,
               rows_of(source, name, key_dim + g * key_head_dim, key_dim + (g + 1) * key_head_dim));
        append(fused, rows_of(source, name, 2 * key_dim + g * group_values,
                              2 * key_dim + (g + 1) * group_values));
        append(fused, rows_of(source, z, g * group_values, (g + 1) * group_values));
      }
      add(parent(renamed, "in_proj_qkv") + "in_proj_qkvz.weight", io::DType::BF16,
          {2 * key_dim + 2 * key_heads * group_values, hidden}, fused);
    } else if (name.ends_with("linear_attn.in_proj_b.weight")) {
      const std::string a = parent(name, "in_proj_b") + "in_proj_a.weight";
      std::vector<std::uint8_t> fused;
      for (std::int64_t g = 0; g < key_heads; ++g) {
        append(fused, rows_of(source, name, g * ratio, (g + 1) * ratio));
        append(fused, rows_of(source, a, g * ratio, (g + 1) * ratio));
      }
      add(parent(renamed, "in_proj_b") + "in_proj_ba.weight", io::DType::BF16,
          {2 * key_heads * ratio, hidden}, fused);
    } else if (name.ends_with("in_proj_z.weight") || name.ends_with("in_proj_a.weight")) {
      continue;  // fused above
    } else if (name.ends_with("mlp.experts.gate_up_proj")) {
      const std::string experts = parent(renamed, "gate_up_proj");
      for (std::int64_t e = 0; e < num_experts; ++e) {
        const std::string prefix = experts + std::to_string(e) + ".";
        add(prefix + "gate_proj.weight", io::DType::BF16, {width, hidden},
            rows_of(source, name, 0, width, e));
        add(prefix + "up_proj.weight", io::DType::BF16, {width, hidden},
            rows_of(source, name, width, 2 * width, e));
      }
    } else if (name.ends_with("mlp.experts.down_proj")) {
      const std::string experts = parent(renamed, "down_proj");
      for (std::int64_t e = 0; e < num_experts; ++e) {
        add(experts + std::to_string(e) + ".down_proj.weight", io::DType::BF16, {hidden, width},
            rows_of(source, name, 0, hidden, e));
      }
    } else {
      add(renamed, view.info->dtype, view.info->shape,
          std::vector<std::uint8_t>(view.bytes.begin(), view.bytes.end()));
    }
  }
  writer.commit();
}

}  // namespace pq::test
