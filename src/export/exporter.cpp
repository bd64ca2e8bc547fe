// The export stage: an assignment (one format per Linear) applied to a source checkpoint, written
// as a compressed-tensors checkpoint that vLLM serves.
#include "export/exporter.h"

#include <fmt/format.h>
#include <stdlib.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstring>
#include <set>
#include <system_error>

#include "common/disk_space.h"
#include "common/error.h"
#include "common/file_util.h"
#include "common/interrupt.h"
#include "common/json_reader.h"
#include "common/location_lock.h"
#include "io/safetensors.h"
#include "io/safetensors_writer.h"
#include "model/config.h"

namespace pq::exporter {
namespace {

namespace fs = std::filesystem;

// Files of an HF checkpoint that vLLM or transformers read besides config.json and the weights.
constexpr const char* kCopiedFiles[] = {"tokenizer.json", "tokenizer_config.json",
                                        "tokenizer.model", "generation_config.json",
                                        "special_tokens_map.json"};

bool is_nvfp4(const formats::WeightFormat& format) {
  return format.name() == "NVFP4" || format.name() == "NVFP4A16";
}

// The checked assignment: a format for every candidate Linear of the spec.
struct Plan {
  std::vector<const formats::WeightFormat*> format_of;  // per ModelSpec::linears; null: passthrough
  std::map<std::string, std::string> format_name_of;    // candidate name -> format name
};

Plan make_plan(const model::ModelSpec& spec, const alloc::AssignmentFile& assignment,
               const ExportJob& job) {
  const std::string label = job.assignment.string();
  Plan plan;
  plan.format_of.assign(spec.linears.size(), nullptr);
  std::map<std::string, std::size_t> index_of;
  for (std::size_t i = 0; i < spec.linears.size(); ++i) index_of[spec.linears[i].name] = i;

  for (const alloc::AssignedLinear& assigned : assignment.linears) {
    const auto it = index_of.find(assigned.name);
    PQ_CHECK(it != index_of.end(), "{}: Linear '{}' is not in the model {}", label, assigned.name,
             job.model_dir.string());
    const model::Linear& linear = spec.linears[it->second];
    PQ_CHECK(linear.is_candidate, "{}: Linear '{}' (role {}) is not quantizable", label,
             assigned.name, linear.role);
    PQ_CHECK(linear.allows(assigned.format),
             "{}: Linear '{}' is assigned {}, which vLLM cannot serve for it (it serves {})", label,
             assigned.name, assigned.format, fmt::join(linear.formats, ", "));
    const formats::WeightFormat& format = formats::format_by_name(assigned.format);
    PQ_CHECK(format.exportable(),
             "{}: Linear '{}' is assigned {}, which has no compressed-tensors format (research "
             "only, not exportable)",
             label, assigned.name, assigned.format);
    const formats::Shape2D shape{linear.out_features, linear.in_features};
    if (auto why = format.rejects(shape)) {
      fail("{}: Linear '{}' [{}, {}] cannot take {}: {}", label, assigned.name, shape.out, shape.in,
           assigned.format, *why);
    }
    if (!formats::serves(format, linear.layer_kind(), job.serve_on)) {
      const formats::ServingBehaviour& cell =
          formats::serving_behaviour(format, linear.layer_kind(), job.serve_on);
      fail("{}: Linear '{}' is assigned {}, which vLLM on {} does not load for {} layers ({})",
           label, assigned.name, assigned.format, formats::serving_target_name(job.serve_on),
           formats::layer_kind_name(linear.layer_kind()), cell.note);
    }
    PQ_CHECK(assigned.bytes == format.bytes(shape),
             "{}: Linear '{}' is charged {} bytes but {} stores {}", label, assigned.name,
             assigned.bytes, assigned.format, format.bytes(shape));
    plan.format_of[it->second] = &format;
    plan.format_name_of[assigned.name] = std::string(format.name());
  }
  if (!job.vision_format.empty() && job.vision_format != "BF16") {
    const formats::WeightFormat& format = formats::format_by_name(job.vision_format);
    PQ_CHECK(format.exportable(), "--vision-format {} has no compressed-tensors format",
             job.vision_format);
    for (std::size_t i = 0; i < spec.linears.size(); ++i) {
      const model::Linear& linear = spec.linears[i];
      if (linear.component != model::Component::kVision) continue;
      const formats::Shape2D shape{linear.out_features, linear.in_features};
      if (auto why = format.rejects(shape)) {
        fail("--vision-format {}: vision Linear '{}' [{}, {}] cannot take it: {}",
             job.vision_format, linear.name, shape.out, shape.in, *why);
      }
      plan.format_of[i] = &format;
      plan.format_name_of[linear.name] = std::string(format.name());
    }
  }
  for (std::size_t i = 0; i < spec.linears.size(); ++i) {
    const model::Linear& linear = spec.linears[i];
    PQ_CHECK(!linear.is_candidate || plan.format_of[i] != nullptr,
             "{}: Linear '{}' has no format (assignment made for another model?)", label,
             linear.name);
  }
  // vLLM loads fused siblings as one module with one scheme (format-facts.md A.3.1).
  for (const model::SiblingGroup& group : spec.groups) {
    const formats::WeightFormat* first = plan.format_of[group.members.front()];
    for (const std::size_t member : group.members) {
      PQ_CHECK(plan.format_of[member] == first,
               "{}: sibling group {} mixes formats ({} is {}, {} is {}); vLLM needs one scheme",
               label, group.name, spec.linears[group.members.front()].name,
               first ? first->name() : "unquantized", spec.linears[member].name,
               plan.format_of[member] ? plan.format_of[member]->name() : "unquantized");
    }
  }
  // W4A4 NVFP4 needs the calibration amax of its input (format-facts.md A.2): fail before
  // anything is written, naming the first Linear that lacks it.
  for (std::size_t i = 0; i < spec.linears.size(); ++i) {
    const formats::WeightFormat* format = plan.format_of[i];
    if (format == nullptr || !format->quantizes_activations() || !is_nvfp4(*format)) continue;
    PQ_CHECK(job.input_amax.contains(spec.linears[i].name),
             "{}: Linear '{}' is assigned {} (W4A4), whose input_global_scale needs the "
             "calibration activation amax; none was given for it",
             label, spec.linears[i].name, format->name());
  }
  return plan;
}

// A step of the layer-by-layer stream: a passthrough tensor or a unit of Linears.
struct Step {
  std::int64_t layer;
  std::string passthrough;  // tensor name, or empty
  std::vector<std::size_t> unit;
};

std::vector<Step> stream_order(const model::ModelSpec& spec, const Plan& plan) {
  std::vector<Step> steps;
  std::set<std::string> seen;
  auto add_passthrough = [&](const std::string& name, std::optional<std::int64_t> layer,
                             std::int64_t no_layer) {
    if (seen.insert(name).second) steps.push_back({layer.value_or(no_layer), name, {}});
  };
  // Embeddings and other layer-less tensors open the file, lm_head closes it.
  for (const model::OtherTensor& other : spec.others) add_passthrough(other.name, other.layer, -1);
  for (const std::vector<std::size_t>& unit : global_scale_units(spec)) {
    const model::Linear& first = spec.linears[unit.front()];
    if (plan.format_of[unit.front()] == nullptr) {
      for (const std::size_t member : unit) {
        add_passthrough(spec.linears[member].weight_tensor, first.layer, LLONG_MAX);
        if (spec.linears[member].scale_tensor) {
          add_passthrough(*spec.linears[member].scale_tensor, first.layer, LLONG_MAX);
        }
      }
    } else {
      steps.push_back({first.layer.value_or(LLONG_MAX), "", unit});
    }
  }
  std::stable_sort(steps.begin(), steps.end(),
                   [](const Step& a, const Step& b) { return a.layer < b.layer; });
  return steps;
}

// Encodes and writes one unit of Linears; returns the tensor bytes written.
std::uint64_t write_unit(const Step& step, const model::ModelSpec& spec, const Plan& plan,
                         const io::Checkpoint& checkpoint, const LinearEncoder& encoder,
                         io::ShardedCheckpointWriter& writer) {
  const formats::WeightFormat& format = *plan.format_of[step.unit.front()];
  std::uint64_t written = 0;
  for (const std::size_t member : step.unit) {
    const model::Linear& linear = spec.linears[member];
    const formats::EncodedWeight encoded = encoder.encode(member, format);
    for (const formats::EncodedTensor& tensor : encoded.tensors) {
      writer.add(linear.name + "." + tensor.spec.suffix, tensor.spec.dtype, tensor.spec.shape,
                 tensor.bytes);
      written += tensor.bytes.size();
    }
    checkpoint.release(linear.weight_tensor);
    if (linear.scale_tensor) checkpoint.release(*linear.scale_tensor);
  }
  return written;
}

std::uint64_t safetensors_file_bytes(const fs::path& dir) {
  std::uint64_t total = 0;
  for (const fs::directory_entry& entry : fs::directory_iterator(dir)) {
    if (entry.path().extension() == ".safetensors") total += entry.file_size();
  }
  return total;
}

std::string human_bytes(std::uint64_t bytes) {
  return fmt::format("{:.2f} MiB", static_cast<double>(bytes) / (1024.0 * 1024.0));
}

// The Pareto sweep the allocator wrote (alloc's pareto.csv), as a Markdown table of its feasible
// rows; empty when there is none.
std::string pareto_table(const fs::path& csv) {
  if (!fs::exists(csv)) return {};
  std::vector<std::vector<std::string>> rows;
  std::string text = read_text_file(csv);
  std::size_t begin = 0;
  while (begin < text.size()) {
    std::size_t end = text.find('\n', begin);
    if (end == std::string::npos) end = text.size();
    std::vector<std::string> cells;
    std::size_t cell = begin;
    while (cell <= end) {
      std::size_t comma = text.find(',', cell);
      if (comma == std::string::npos || comma > end) comma = end;
      cells.push_back(text.substr(cell, comma - cell));
      cell = comma + 1;
    }
    if (!cells.empty()) rows.push_back(std::move(cells));
    begin = end + 1;
  }
  if (rows.size() < 2) return {};
  const std::vector<std::string>& header = rows.front();
  auto column = [&](std::string_view name) -> std::optional<std::size_t> {
    const auto it = std::find(header.begin(), header.end(), name);
    if (it == header.end()) return std::nullopt;
    return static_cast<std::size_t>(it - header.begin());
  };
  const auto target = column("target_bits");
  const auto feasible = column("feasible");
  const auto achieved = column("achieved_bits");
  const auto dloss = column("predicted_dloss");
  const auto knee = column("knee");
  if (!target || !feasible || !achieved || !dloss || !knee) return {};
  // One column per format: how many Linears each point gives it.
  std::vector<std::size_t> mix_columns;
  std::string mix_header;
  std::string mix_rule;
  for (std::size_t c = 0; c < header.size(); ++c) {
    if (!header[c].starts_with("linears_")) continue;
    mix_columns.push_back(c);
    mix_header += fmt::format(" {} |", header[c].substr(8));
    mix_rule += "---|";
  }
  std::string table = fmt::format(
      "| target bits | bits per quantizable param | predicted dL | knee |{}\n|---|---|---|---|{}\n",
      mix_header, mix_rule);
  for (std::size_t r = 1; r < rows.size(); ++r) {
    const std::vector<std::string>& row = rows[r];
    if (row.size() != header.size() || row[*feasible] != "1") continue;
    std::string mix;
    for (const std::size_t c : mix_columns) mix += fmt::format(" {} |", row[c]);
    table +=
        fmt::format("| {} | {:.4f} | {:.4g} | {} |{}\n", row[*target], std::stod(row[*achieved]),
                    std::stod(row[*dloss]), row[*knee] == "1" ? "knee" : "", mix);
  }
  return table;
}

// README.md: what was exported, how well it does where that was measured, and how to serve it.
std::string model_card(const ExportJob& job, const model::ModelSpec& spec, const Plan& plan,
                       const RoundingStrategy& rounding, const ExportSummary& summary,
                       std::uint64_t file_bytes, std::uint64_t source_file_bytes) {
  std::string card =
      fmt::format("# {} (prismaquant mixed precision)\n\n", job.model_dir.filename().string());
  card += fmt::format(
      "Quantized from `{}` with prismaquant {}: one format per Linear, chosen under a size "
      "budget, stored as a compressed-tensors checkpoint.\n\n",
      job.model_dir.filename().string(), PQ_VERSION);
  card += "## Size\n\n| | source | this checkpoint |\n|---|---|---|\n";
  card += fmt::format("| safetensors files | {} | {} |\n", human_bytes(source_file_bytes),
                      human_bytes(file_bytes));
  card += fmt::format("| tensor data | {} | {} |\n", human_bytes(summary.source_tensor_bytes),
                      human_bytes(summary.tensor_bytes));
  const double params = static_cast<double>(summary.params);
  card += fmt::format("| bits per parameter (tensor data) | {:.3f} | {:.3f} |\n\n",
                      8.0 * static_cast<double>(summary.source_tensor_bytes) / params,
                      8.0 * static_cast<double>(summary.tensor_bytes) / params);
  card += fmt::format("{} parameters. Ratio on disk: {:.3f}.\n\n", summary.params,
                      static_cast<double>(file_bytes) / static_cast<double>(source_file_bytes));

  auto format_label = [&](std::size_t i) -> std::string {
    if (plan.format_of[i] != nullptr) return std::string(plan.format_of[i]->name());
    return fmt::format("{} (not a candidate)", io::dtype_name(spec.linears[i].dtype));
  };
  std::map<std::string, std::map<std::string, std::pair<std::uint64_t, std::uint64_t>>> by_role;
  std::map<std::int64_t, std::map<std::string, std::uint64_t>> by_layer;
  for (std::size_t i = 0; i < spec.linears.size(); ++i) {
    const model::Linear& linear = spec.linears[i];
    auto& cell = by_role[linear.role][format_label(i)];
    cell.first += 1;
    cell.second += static_cast<std::uint64_t>(linear.numel());
    by_layer[linear.layer.value_or(-1)][format_label(i)] += 1;
  }
  card += "## Precision by role\n\n| role | format | Linears | parameters |\n|---|---|---|---|\n";
  for (const auto& [role, cells] : by_role) {
    for (const auto& [format, cell] : cells) {
      card += fmt::format("| {} | {} | {} | {} |\n", role, format, cell.first, cell.second);
    }
  }
  card += "\n## Precision by layer\n\n| layer | Linears per format |\n|---|---|\n";
  for (const auto& [layer, counts] : by_layer) {
    std::string cells;
    for (const auto& [format, count] : counts) {
      cells += fmt::format("{}{} x{}", cells.empty() ? "" : ", ", format, count);
    }
    card += fmt::format("| {} | {} |\n", layer < 0 ? std::string("(none)") : std::to_string(layer),
                        cells);
  }
  card += "\n## Measured quality\n\n";
  if (job.quality) {
    const MeasuredQuality& q = *job.quality;
    card += fmt::format(
        "Measured before export with the exact weights written here, on {} ({} windows of {} "
        "tokens, {} next-token predictions), against the source model in float32:\n\n"
        "| | source | this checkpoint |\n|---|---|---|\n"
        "| perplexity | {:.4f} | {:.4f} |\n"
        "| mean KL(source \\|\\| quantized), nats per token | 0 | {:.6f} |\n"
        "| top-1 agreement with the source | 1 | {:.4f} |\n\n"
        "`prismaquant validate` reloads this directory and measures the same figures.\n\n",
        q.data, q.windows, q.seqlen, q.predictions, q.source_perplexity, q.perplexity, q.mean_kl,
        q.top1_agreement);
    if (q.fp8_kv_cache) {
      const KvCacheQuality& kv = *q.fp8_kv_cache;
      card += fmt::format(
          "With the FP8 KV cache (`--kv-cache-dtype fp8`, keys and values stored as E4M3 under "
          "this checkpoint's calibrated k_scale / v_scale), measured the same way:\n\n"
          "| | bf16 KV cache | FP8 KV cache |\n|---|---|---|\n"
          "| perplexity | {:.4f} | {:.4f} |\n"
          "| mean KL(source \\|\\| quantized), nats per token | {:.6f} | {:.6f} |\n"
          "| top-1 agreement with the source | {:.4f} | {:.4f} |\n\n",
          q.perplexity, kv.perplexity, q.mean_kl, kv.mean_kl, q.top1_agreement, kv.top1_agreement);
    }
    if (job.uniform && job.uniform->quality) {
      const UniformBaseline& u = *job.uniform;
      card += fmt::format(
          "Against uniform {} (the {} Linears that can take it, the others as here; the same "
          "rounding, the same windows), which this checkpoint must not lose to:\n\n"
          "| | uniform {} | this checkpoint |\n|---|---|---|\n"
          "| Linear bytes | {} | {} |\n"
          "| perplexity | {:.4f} | {:.4f} |\n"
          "| mean KL(source \\|\\| quantized), nats per token | {:.6f} | {:.6f} |\n"
          "| top-1 agreement with the source | {:.4f} | {:.4f} |\n\n",
          u.format, u.linears, u.format, u.bytes, u.shipped_bytes, u.quality->perplexity,
          q.perplexity, u.quality->mean_kl, q.mean_kl, u.quality->top1_agreement, q.top1_agreement);
    } else if (job.uniform) {
      card += fmt::format(
          "Uniform {} takes {} bytes of Linears, more than this checkpoint's {}: not compared.\n\n",
          job.uniform->format, job.uniform->bytes, job.uniform->shipped_bytes);
    }
  } else {
    card +=
        "Not measured by this export. `prismaquant validate DIR --reference SOURCE --data TEXT` "
        "reports held-out KL, perplexity and top-1 agreement.\n\n";
  }
  if (const std::string table = pareto_table(
          job.pareto_csv.empty() ? job.assignment.parent_path() / "pareto.csv" : job.pareto_csv);
      !table.empty()) {
    card += "## Size / predicted-loss trade-off (allocator's Pareto sweep)\n\n" + table + "\n";
  }
  card += fmt::format("## How it was made\n\n```\n{}\n```\n\n{}\n\n", job.command_line,
                      rounding.describe(plan.format_name_of));
  const std::string_view target = formats::serving_target_name(job.serve_on);
  card += fmt::format(
      "## Serve\n\nExported for vLLM on {} GPUs (`--serve-on {}`): every quantized Linear's "
      "scheme is one stock vLLM loads there for its kind of layer.\n\n",
      target, target);
  std::set<std::string_view> needs;
  for (std::size_t i = 0; i < spec.linears.size(); ++i) {
    if (plan.format_of[i] == nullptr) continue;
    const std::string_view versions =
        formats::serving_behaviour(*plan.format_of[i], spec.linears[i].layer_kind(), job.serve_on)
            .min_versions;
    if (!versions.empty()) needs.insert(versions);
  }
  for (const std::string_view versions : needs) card += fmt::format("- Needs {}.\n", versions);
  if (!needs.empty()) card += "\n";
  if (job.kv_cache.empty()) {
    card += fmt::format("```\nvllm serve {}\n```\n", job.out.string());
  } else {
    std::vector<float> scales;
    for (const auto& [layer, s] : job.kv_cache) scales.insert(scales.end(), {s.key, s.value});
    const auto [low, high] = std::minmax_element(scales.begin(), scales.end());
    card += fmt::format(
        "The {} attention layers carry calibrated FP8 KV cache scales (k_scale / v_scale from "
        "the keys and values the calibration set put in the cache, {:.4g} to {:.4g}); vLLM uses "
        "them with an FP8 KV cache:\n\n```\nvllm serve {} --kv-cache-dtype fp8\n```\n",
        job.kv_cache.size(), *low, *high, job.out.string());
  }
  return card;
}

void copy_side_files(const fs::path& from, const fs::path& to) {
  for (const char* name : kCopiedFiles) {
    if (!fs::exists(from / name)) continue;
    std::error_code ec;
    fs::copy_file(from / name, to / name, ec);
    PQ_CHECK(!ec, "cannot copy {} to {}: {}", (from / name).string(), to.string(), ec.message());
  }
}

// A fresh directory beside `out` (same filesystem, so the final rename is atomic).
fs::path make_staging_dir(const fs::path& out, const char* tag) {
  std::string pattern = out.string() + tag;
  // WORK/export/NAME may be the first thing under WORK/export; mkdtemp reports what still fails.
  std::error_code ignored;
  if (out.has_parent_path()) fs::create_directories(out.parent_path(), ignored);
  if (mkdtemp(pattern.data()) == nullptr) {
    fail("cannot create a directory beside {}: {}", out.string(), std::strerror(errno));
  }
  // mkdtemp makes it private (0700); the checkpoint is for serving, so give it the usual
  // world-readable directory mode.
  fs::permissions(pattern, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                               fs::perms::others_read | fs::perms::others_exec);
  return pattern;
}

// Removes a staging directory on every path out of run_export that did not hand it over.
class StagingDir {
 public:
  explicit StagingDir(fs::path path) : path_(std::move(path)) {}
  ~StagingDir() {
    std::error_code ec;
    if (!path_.empty()) fs::remove_all(path_, ec);
  }
  StagingDir(const StagingDir&) = delete;
  StagingDir& operator=(const StagingDir&) = delete;
  const fs::path& path() const { return path_; }
  void release() { path_.clear(); }

 private:
  fs::path path_;
};

}  // namespace

nlohmann::json fp8_kv_cache_scheme() {
  return {{"num_bits", 8},         {"type", "float"},
          {"symmetric", true},     {"strategy", "tensor"},
          {"group_size", nullptr}, {"dynamic", false},
          {"actorder", nullptr},   {"block_structure", nullptr},
          {"observer", "minmax"},  {"observer_kwargs", nlohmann::json::object()}};
}

std::map<std::int64_t, runtime::KvCacheScales> kv_cache_scales_from_probe(
    const model::ModelSpec& spec, const probe::ProbeResult& probe) {
  PQ_CHECK(probe.kv_cache().has_value(),
           "the probe did not record the KV cache: run it with --kv-cache fp8 (quantize does so "
           "when given --kv-cache fp8)");
  std::map<std::int64_t, const probe::ProbedKvCache*> probed;
  for (const probe::ProbedKvCache& kv : *probe.kv_cache()) probed.emplace(kv.layer, &kv);
  std::map<std::int64_t, runtime::KvCacheScales> scales;
  for (const auto& [layer, module] : spec.kv_cache_modules()) {
    const auto it = probed.find(layer);
    PQ_CHECK(it != probed.end(), "the probe recorded no key/value amax for {}", module);
    try {
      scales[layer] = {runtime::fp8_kv_cache_scale(it->second->key_amax),
                       runtime::fp8_kv_cache_scale(it->second->value_amax)};
    } catch (const Error& e) {
      fail("{}: {}", module, e.what());
    }
  }
  return scales;
}

nlohmann::json quantization_config(const model::ModelSpec& spec,
                                   const std::map<std::string, std::string>& format_of,
                                   bool fp8_kv_cache) {
  std::vector<std::string> group_formats;  // in order of first use
  std::map<std::string, nlohmann::json> targets;
  nlohmann::json ignore = nlohmann::json::array();
  for (const model::Linear& linear : spec.linears) {
    const auto it = format_of.find(linear.name);
    // vLLM matches targets and ignore against its own module names (LinearRule::serving_module).
    if (it == format_of.end() || it->second == "BF16") {
      ignore.push_back(linear.serving_name);
      if (linear.serving_alias) ignore.push_back(*linear.serving_alias);
      continue;
    }
    if (!targets.contains(it->second)) group_formats.push_back(it->second);
    targets[it->second].push_back(linear.serving_name);
    if (linear.serving_alias) targets[it->second].push_back(*linear.serving_alias);
  }
  nlohmann::json groups = nlohmann::json::object();
  std::set<std::string> storage_formats;
  for (std::size_t i = 0; i < group_formats.size(); ++i) {
    nlohmann::json group = formats::format_by_name(group_formats[i]).config_group();
    group["targets"] = targets[group_formats[i]];
    storage_formats.insert(group.at("format").get<std::string>());
    groups[fmt::format("group_{}", i)] = std::move(group);
  }
  // One storage format names itself; several make the model "mixed-precision", each group then
  // carrying its own (format-facts.md A.0, A.4). No quantized Linear at all is "dense".
  const std::string model_format = storage_formats.empty()       ? "dense"
                                   : storage_formats.size() == 1 ? *storage_formats.begin()
                                                                 : "mixed-precision";
  return {{"quant_method", "compressed-tensors"},
          {"format", model_format},
          {"quantization_status", "compressed"},
          {"config_groups", groups},
          {"ignore", ignore},
          {"kv_cache_scheme", fp8_kv_cache ? fp8_kv_cache_scheme() : nlohmann::json(nullptr)},
          {"global_compression_ratio", nullptr},
          {"sparsity_config", nlohmann::json::object()}};
}

void remove_interrupted_exports(const fs::path& location) {
  fs::path out = location.lexically_normal();
  if (!out.has_filename()) out = out.parent_path();
  const fs::path parent = out.has_parent_path() ? out.parent_path() : fs::path(".");
  const std::string name = out.filename().string();
  // mkdtemp's names: the tag and six characters (make_staging_dir).
  const auto is_leftover = [&](const std::string& entry) {
    return entry.size() == name.size() + 11 && entry.starts_with(name) &&
           (entry.compare(name.size(), 5, ".tmp-") == 0 ||
            entry.compare(name.size(), 5, ".old-") == 0);
  };
  std::error_code ec;
  std::vector<fs::path> found;
  for (fs::directory_iterator it(parent, ec), end; !ec && it != end; it.increment(ec)) {
    if (it->is_directory(ec) && is_leftover(it->path().filename().string())) {
      found.push_back(it->path());
    }
  }
  for (const fs::path& dir : found) {
    if (!fs::exists(out, ec) && fs::is_directory(dir / "previous", ec)) {
      fs::rename(dir / "previous", out, ec);
      PQ_CHECK(!ec, "cannot restore {} from {}: {}", out.string(), dir.string(), ec.message());
      fmt::print(stderr, "prismaquant: restored {} from {}, left by an interrupted export\n",
                 out.string(), dir.string());
    }
    fs::remove_all(dir, ec);
    PQ_CHECK(!ec, "cannot remove {}, left by an interrupted export: {}", dir.string(),
             ec.message());
  }
}

std::uint64_t export_disk_need(std::uint64_t tensor_bytes, std::uint64_t max_shard_bytes) {
  // io::SafetensorsWriter stages the open shard's data in a spool and copies it behind the header
  // on commit, so one shard exists twice for a moment; an existing checkpoint being replaced stays
  // until the new one is complete. Headers, config and model card fit in the 64 MiB allowance.
  constexpr std::uint64_t kAllowance = 64ull << 20;
  return tensor_bytes + std::min(tensor_bytes, max_shard_bytes) + kAllowance;
}

ExportSummary run_export(const ExportJob& requested, const RoundingStrategy& rounding) {
  // "DIR/" names DIR: staging and renames work on the directory's own name.
  ExportJob job = requested;
  job.out = job.out.lexically_normal();
  if (!job.out.has_filename()) job.out = job.out.parent_path();
  const alloc::AssignmentFile assignment = alloc::read_assignment(job.assignment);
  // Its formats were costed with the codecs of the target's kernels (NVFP4's scale rule).
  const std::string_view target = formats::serving_target_name(job.serve_on);
  PQ_CHECK(!assignment.serve_on || *assignment.serve_on == target,
           "{}: the assignment was chosen for {} (--serve-on), not for {}; export it with "
           "--serve-on {} or rerun cost and allocate for {}",
           job.assignment.string(), assignment.serve_on.value_or(""), target,
           assignment.serve_on.value_or(""), target);
  const bool lm_head_assigned =
      std::any_of(assignment.linears.begin(), assignment.linears.end(),
                  [](const alloc::AssignedLinear& l) { return l.name == "lm_head"; });
  const model::ModelSpec spec =
      model::load_model_spec(job.model_dir, {.quantize_lm_head = lm_head_assigned});
  const io::Checkpoint checkpoint = io::Checkpoint::open(job.model_dir);
  const Plan plan = make_plan(spec, assignment, job);
  const std::map<std::int64_t, std::string> kv_modules = spec.kv_cache_modules();
  if (!job.kv_cache.empty()) {
    for (const auto& [layer, module] : kv_modules) {
      PQ_CHECK(job.kv_cache.contains(layer), "--kv-cache fp8: no KV cache scales for {}", module);
    }
    for (const auto& [layer, scales] : job.kv_cache) {
      PQ_CHECK(kv_modules.contains(layer),
               "--kv-cache fp8: scales given for layer {}, which has no KV cache", layer);
    }
  }
  const LinearEncoder encoder(spec, checkpoint, rounding, job.input_amax, job.serve_on,
                              job.render_cache);
  // The vision tower is rounded to nearest whatever the text model's strategy: it has no
  // calibration statistics. Its renders stay out of the render cache, which holds one rounding.
  const NearestRounding nearest;
  const LinearEncoder vision_encoder(spec, checkpoint, nearest, {}, job.serve_on);

  PQ_CHECK(!job.out.empty(), "no output directory given");
  PQ_CHECK(!is_within(job.out, job.model_dir) && !is_within(job.model_dir, job.out),
           "output {} and source {} overlap; the source is never written to", job.out.string(),
           job.model_dir.string());
  const LocationLock lock(job.out);
  remove_interrupted_exports(job.out);
  const bool replace = fs::exists(job.out);
  PQ_CHECK(!replace || job.force, "{} already exists (use --force to replace it)",
           job.out.string());
  require_disk_space(job.out,
                     export_disk_need(assignment.totals.checkpoint_bytes, job.max_shard_bytes),
                     "the checkpoint (its tensors, one shard's data staged while that shard is "
                     "written, and headers)");

  StagingDir staging(make_staging_dir(job.out, ".tmp-XXXXXX"));
  ExportSummary summary;
  summary.out = job.out;
  summary.params = static_cast<std::uint64_t>(spec.num_params());
  summary.source_tensor_bytes = checkpoint.total_tensor_bytes();
  {
    io::ShardedCheckpointWriter writer(staging.path(), {.max_shard_bytes = job.max_shard_bytes});
    for (const Step& step : stream_order(spec, plan)) {
      throw_if_interrupted();
      if (step.unit.empty()) {
        const io::TensorView view = checkpoint.view(step.passthrough);
        writer.add(step.passthrough, view.info->dtype, view.info->shape, view.bytes);
        summary.tensor_bytes += view.bytes.size();
        checkpoint.release(step.passthrough);
        continue;
      }
      const bool vision = spec.linears[step.unit.front()].component == model::Component::kVision;
      summary.tensor_bytes +=
          write_unit(step, spec, plan, checkpoint, vision ? vision_encoder : encoder, writer);
    }
    // vLLM loads "<layer>.self_attn.k_scale" into the layer's Attention (maybe_remap_kv_scale_name,
    // vllm/model_executor/model_loader/weight_utils.py: ".k_scale" -> ".attn.k_scale") through
    // default_weight_loader, which fills its scalar float32 parameter from any one-element tensor;
    // compressed-tensors stores them with shape [1] (initialize_attn_qparams, strategy tensor).
    // float32 keeps the exact scale the measurement simulated.
    for (const auto& [layer, scales] : job.kv_cache) {
      for (const auto& [suffix, scale] :
           {std::pair{"k_scale", scales.key}, std::pair{"v_scale", scales.value}}) {
        writer.add(kv_modules.at(layer) + "." + suffix, io::DType::F32,
                   std::vector<std::int64_t>{1},
                   {reinterpret_cast<const std::uint8_t*>(&scale), sizeof(float)});
        summary.tensor_bytes += sizeof(float);
      }
    }
    writer.commit();
  }
  for (const model::Linear& linear : spec.linears) {
    if (const auto it = plan.format_name_of.find(linear.name); it != plan.format_name_of.end()) {
      summary.linears_per_format[it->second] += 1;
    }
  }

  nlohmann::json config = read_json_file(job.model_dir / "config.json");
  config["quantization_config"] =
      quantization_config(spec, plan.format_name_of, !job.kv_cache.empty());
  write_text_file_atomic(staging.path() / "config.json", config.dump(2) + "\n");
  copy_side_files(job.model_dir, staging.path());
  write_text_file_atomic(
      staging.path() / "README.md",
      model_card(job, spec, plan, rounding, summary, safetensors_file_bytes(staging.path()),
                 safetensors_file_bytes(job.model_dir)));

  // Hand the finished directory over: an existing one moves aside first and goes only after the
  // new one is in place, so a failure leaves one complete checkpoint at `out`.
  std::error_code ec;
  if (replace) {
    const fs::path old = make_staging_dir(job.out, ".old-XXXXXX");
    fs::rename(job.out, old / "previous", ec);
    PQ_CHECK(!ec, "cannot move {} aside: {}", job.out.string(), ec.message());
    fs::rename(staging.path(), job.out, ec);
    if (ec) {
      fs::rename(old / "previous", job.out);
      fs::remove(old);
      fail("cannot rename {} to {}: {}", staging.path().string(), job.out.string(), ec.message());
    }
    fs::remove_all(old, ec);
  } else {
    fs::rename(staging.path(), job.out, ec);
    PQ_CHECK(!ec, "cannot rename {} to {}: {}", staging.path().string(), job.out.string(),
             ec.message());
  }
  staging.release();
  for (const fs::directory_entry& entry : fs::directory_iterator(job.out)) {
    summary.files.push_back(entry.path().filename().string());
  }
  std::sort(summary.files.begin(), summary.files.end());
  return summary;
}

}  // namespace pq::exporter
