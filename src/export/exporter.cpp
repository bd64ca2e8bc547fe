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

#include "common/error.h"
#include "common/file_util.h"
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

bool is_w13_role(const std::string& role) {
  return role.ends_with("gate_proj") || role.ends_with("up_proj");
}

bool is_nvfp4(const formats::WeightFormat& format) {
  return format.name() == "NVFP4" || format.name() == "NVFP4A16";
}

// Linears whose NVFP4 weight_global_scale must be one value. Dense sibling groups (q/k/v,
// gate/up) are one vLLM module, which keeps only the max of its shards' global scales
// (format-facts.md A.3.2). A MoE sibling group spans every expert of a layer, but vLLM's fused MoE
// layer fuses only each expert's gate and up into w13; down_proj and other experts keep their own
// (method-facts.md §7, "Packed experts": each expert's global scale = max(gate, up)).
std::vector<std::vector<std::size_t>> global_scale_units(const model::ModelSpec& spec) {
  std::vector<std::vector<std::size_t>> units;
  std::vector<bool> placed(spec.linears.size(), false);
  for (const model::SiblingGroup& group : spec.groups) {
    std::map<std::int64_t, std::size_t> unit_of_expert;  // expert index, -1 for a dense group
    for (const std::size_t index : group.members) {
      const model::Linear& linear = spec.linears[index];
      placed[index] = true;
      if (linear.expert && !is_w13_role(linear.role)) {
        units.push_back({index});
        continue;
      }
      const auto [it, added] = unit_of_expert.try_emplace(linear.expert.value_or(-1), units.size());
      if (added) units.emplace_back();
      units[it->second].push_back(index);
    }
  }
  for (std::size_t index = 0; index < spec.linears.size(); ++index) {
    if (!placed[index]) units.push_back({index});
  }
  std::sort(units.begin(), units.end(),
            [](const auto& a, const auto& b) { return a.front() < b.front(); });
  return units;
}

// The source weight of one Linear decoded to f32, [out, in]; a slice of a packed 3-D tensor when
// the Linear shares its tensor (Qwen3.5 packed experts).
std::vector<float> read_weight(const io::Checkpoint& checkpoint, const model::Linear& linear) {
  const io::TensorView view = checkpoint.view(linear.weight_tensor);
  std::vector<float> weight(static_cast<std::size_t>(linear.numel()));
  std::span<const std::uint8_t> bytes = view.bytes;
  if (linear.slice) {
    const std::vector<std::int64_t>& shape = view.info->shape;
    PQ_CHECK(shape.size() == 3 && shape[2] == linear.in_features,
             "{}: tensor {} is not [E, rows, {}]", linear.name, linear.weight_tensor,
             linear.in_features);
    const std::size_t row_bytes =
        static_cast<std::size_t>(shape[2]) * io::dtype_size(view.info->dtype);
    const std::size_t first_row =
        static_cast<std::size_t>(linear.slice->index * shape[1] + linear.slice->row_begin);
    bytes = bytes.subspan(first_row * row_bytes,
                          static_cast<std::size_t>(linear.out_features) * row_bytes);
  }
  io::decode_to_f32(view.info->dtype, bytes, weight);
  return weight;
}

float max_abs(std::span<const float> values) {
  float amax = 0.0f;
  for (const float v : values) amax = std::max(amax, std::fabs(v));
  return amax;
}

// The checked assignment: a format for every candidate Linear of the spec.
struct Plan {
  std::vector<const formats::WeightFormat*> format_of;  // per ModelSpec::linears; null: passthrough
  std::map<std::string, std::string> format_name_of;    // candidate name -> format name
  std::map<std::size_t, float> input_global_scale;      // per W4A4 Linear
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
    PQ_CHECK(assigned.bytes == format.bytes(shape),
             "{}: Linear '{}' is charged {} bytes but {} stores {}", label, assigned.name,
             assigned.bytes, assigned.format, format.bytes(shape));
    plan.format_of[it->second] = &format;
    plan.format_name_of[assigned.name] = std::string(format.name());
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
  // W4A4 NVFP4: input_global_scale = 448*6/amax(calibration activations) (format-facts.md A.2).
  // Fused siblings read one input, so they share the max over members. The other formats that
  // quantize activations (MXFP4/MXFP8 W*A*, FP8) scale them dynamically and store nothing.
  for (const std::vector<std::size_t>& unit : global_scale_units(spec)) {
    const formats::WeightFormat* format = plan.format_of[unit.front()];
    if (format == nullptr || !format->quantizes_activations() || !is_nvfp4(*format)) continue;
    float amax = 0.0f;
    for (const std::size_t member : unit) {
      const std::string& name = spec.linears[member].name;
      const auto it = job.input_amax.find(name);
      PQ_CHECK(it != job.input_amax.end(),
               "{}: Linear '{}' is assigned {} (W4A4), whose input_global_scale needs the "
               "calibration activation amax; none was given for it",
               label, name, format->name());
      amax = std::max(amax, it->second);
    }
    for (const std::size_t member : unit) {
      plan.input_global_scale[member] = formats::nvfp4_global_scale(amax);
    }
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
                         const io::Checkpoint& checkpoint, const RoundingStrategy& rounding,
                         io::ShardedCheckpointWriter& writer) {
  const formats::WeightFormat& format = *plan.format_of[step.unit.front()];
  std::uint64_t written = 0;
  std::vector<std::vector<float>> weights;
  float amax = 0.0f;
  for (const std::size_t member : step.unit) {
    weights.push_back(read_weight(checkpoint, spec.linears[member]));
    amax = std::max(amax, max_abs(weights.back()));
  }
  for (std::size_t k = 0; k < step.unit.size(); ++k) {
    const model::Linear& linear = spec.linears[step.unit[k]];
    formats::QuantizeOptions options;
    if (is_nvfp4(format)) options.weight_global_scale = formats::nvfp4_global_scale(amax);
    if (const auto it = plan.input_global_scale.find(step.unit[k]);
        it != plan.input_global_scale.end()) {
      options.input_global_scale = it->second;
    }
    const LinearToEncode job{
        linear, format, {linear.out_features, linear.in_features}, weights[k], options};
    formats::EncodedWeight encoded;
    try {
      encoded = rounding.encode(job);
    } catch (const Error& e) {
      fail("{}: {}", linear.name, e.what());
    }
    for (const formats::EncodedTensor& tensor : encoded.tensors) {
      writer.add(linear.name + "." + tensor.spec.suffix, tensor.spec.dtype, tensor.spec.shape,
                 tensor.bytes);
      written += tensor.bytes.size();
    }
    checkpoint.release(linear.weight_tensor);
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

// README.md: what was exported and how to serve it. Measured quality (KL, perplexity) belongs to
// the validate stage and is not claimed here.
std::string model_card(const ExportJob& job, const model::ModelSpec& spec, const Plan& plan,
                       const ExportSummary& summary, std::uint64_t file_bytes,
                       std::uint64_t source_file_bytes) {
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
  card += fmt::format("\n## How it was made\n\n```\n{}\n```\n\n", job.command_line);
  card += fmt::format("## Serve\n\n```\nvllm serve {}\n```\n", job.out.string());
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

bool is_within(const fs::path& inner, const fs::path& outer) {
  const fs::path a = fs::weakly_canonical(inner);
  const fs::path b = fs::weakly_canonical(outer);
  auto [ai, bi] = std::mismatch(a.begin(), a.end(), b.begin(), b.end());
  return bi == b.end();
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

nlohmann::json quantization_config(const model::ModelSpec& spec,
                                   const std::map<std::string, std::string>& format_of) {
  std::vector<std::string> group_formats;  // in order of first use
  std::map<std::string, nlohmann::json> targets;
  nlohmann::json ignore = nlohmann::json::array();
  for (const model::Linear& linear : spec.linears) {
    const auto it = format_of.find(linear.name);
    if (!linear.is_candidate || it == format_of.end() || it->second == "BF16") {
      ignore.push_back(linear.name);
      continue;
    }
    if (!targets.contains(it->second)) group_formats.push_back(it->second);
    targets[it->second].push_back(linear.name);
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
          {"kv_cache_scheme", nullptr},
          {"global_compression_ratio", nullptr},
          {"sparsity_config", nlohmann::json::object()}};
}

std::map<std::string, float> read_input_amax(const std::filesystem::path& path) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_text_file(path));
  } catch (const nlohmann::json::exception& e) {
    fail("{}: not JSON: {}", path.string(), e.what());
  }
  PQ_CHECK(j.is_object(), "{}: expected an object {{\"<linear>\": amax}}", path.string());
  std::map<std::string, float> amax;
  for (const auto& [name, value] : j.items()) {
    PQ_CHECK(value.is_number() && std::isfinite(value.get<double>()) && value.get<double>() > 0,
             "{}: amax of '{}' must be a positive number", path.string(), name);
    amax[name] = value.get<float>();
  }
  return amax;
}

ExportSummary run_export(const ExportJob& requested, const RoundingStrategy& rounding) {
  // "DIR/" names DIR: staging and renames work on the directory's own name.
  ExportJob job = requested;
  job.out = job.out.lexically_normal();
  if (!job.out.has_filename()) job.out = job.out.parent_path();
  const alloc::AssignmentFile assignment = alloc::read_assignment(job.assignment);
  const bool lm_head_assigned =
      std::any_of(assignment.linears.begin(), assignment.linears.end(),
                  [](const alloc::AssignedLinear& l) { return l.name == "lm_head"; });
  const model::ModelSpec spec =
      model::load_model_spec(job.model_dir, {.quantize_lm_head = lm_head_assigned});
  const io::Checkpoint checkpoint = io::Checkpoint::open(job.model_dir);
  const Plan plan = make_plan(spec, assignment, job);

  PQ_CHECK(!job.out.empty(), "no output directory given");
  PQ_CHECK(!is_within(job.out, job.model_dir) && !is_within(job.model_dir, job.out),
           "output {} and source {} overlap; the source is never written to", job.out.string(),
           job.model_dir.string());
  const bool replace = fs::exists(job.out);
  PQ_CHECK(!replace || job.force, "{} already exists (use --force to replace it)",
           job.out.string());

  StagingDir staging(make_staging_dir(job.out, ".tmp-XXXXXX"));
  ExportSummary summary;
  summary.out = job.out;
  summary.params = static_cast<std::uint64_t>(spec.num_params());
  summary.source_tensor_bytes = checkpoint.total_tensor_bytes();
  {
    io::ShardedCheckpointWriter writer(staging.path(), {.max_shard_bytes = job.max_shard_bytes});
    for (const Step& step : stream_order(spec, plan)) {
      if (step.unit.empty()) {
        const io::TensorView view = checkpoint.view(step.passthrough);
        writer.add(step.passthrough, view.info->dtype, view.info->shape, view.bytes);
        summary.tensor_bytes += view.bytes.size();
        checkpoint.release(step.passthrough);
        continue;
      }
      summary.tensor_bytes += write_unit(step, spec, plan, checkpoint, rounding, writer);
    }
    writer.commit();
  }
  for (const model::Linear& linear : spec.linears) {
    if (const auto it = plan.format_name_of.find(linear.name); it != plan.format_name_of.end()) {
      summary.linears_per_format[it->second] += 1;
    }
  }

  nlohmann::json config = nlohmann::json::parse(read_text_file(job.model_dir / "config.json"));
  config["quantization_config"] = quantization_config(spec, plan.format_name_of);
  write_text_file_atomic(staging.path() / "config.json", config.dump(2) + "\n");
  copy_side_files(job.model_dir, staging.path());
  write_text_file_atomic(
      staging.path() / "README.md",
      model_card(job, spec, plan, summary, safetensors_file_bytes(staging.path()),
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
