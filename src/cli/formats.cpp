// `prismaquant formats`: the weight format menu for one Linear shape.

#include <fmt/format.h>

#include <charconv>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "cli/commands.h"
#include "common/error.h"
#include "formats/serving.h"
#include "formats/weight_format.h"

namespace pq::cli {
namespace {

struct FormatsOptions {
  bool json = false;
  std::string shape = "4096x4096";
};

formats::Shape2D parse_shape(const std::string& text) {
  const auto x = text.find('x');
  formats::Shape2D shape;
  const auto parse = [](std::string_view part, std::int64_t& out) {
    const auto [end, ec] = std::from_chars(part.data(), part.data() + part.size(), out);
    return ec == std::errc() && end == part.data() + part.size() && out > 0;
  };
  PQ_CHECK(x != std::string::npos && parse(std::string_view(text).substr(0, x), shape.out) &&
               parse(std::string_view(text).substr(x + 1), shape.in),
           "--shape: expected OUTxIN with positive integers (e.g. 4096x4096), got '{}'", text);
  return shape;
}

std::string tensor_list(const formats::WeightFormat& f, formats::Shape2D shape) {
  std::string out;
  for (const auto& t : f.tensors(shape)) {
    out += fmt::format("{}{} {} [{}]", out.empty() ? "" : ", ", t.suffix, io::dtype_name(t.dtype),
                       fmt::join(t.shape, ", "));
  }
  return out;
}

// What stock vLLM does with the format, by target then layer kind (docs/formats.md
// "Serving model"); null for research-only formats.
nlohmann::json serving_json(const formats::WeightFormat& f) {
  if (!f.exportable()) return nullptr;
  nlohmann::json out = nlohmann::json::object();
  for (const formats::ServingTarget target : formats::all_serving_targets()) {
    nlohmann::json by_layer = nlohmann::json::object();
    for (const formats::LayerKind kind : formats::all_layer_kinds()) {
      const formats::ServingBehaviour& b = formats::serving_behaviour(f, kind, target);
      by_layer[std::string(formats::layer_kind_name(kind))] = {
          {"loads", b.loads},
          {"activations", formats::activation_path_name(b.activations)},
          {"kernel", b.kernel},
          {"marlin", b.marlin},
          {"global_scale_bf16", b.global_scale_bf16},
          {"flushes_subnormal_scales", b.flushes_subnormal_scales},
          {"min_versions", b.min_versions},
          {"source", b.source},
          {"note", b.note},
          {"confirmed", b.confirmed()},
          {"unconfirmed", b.unconfirmed}};
    }
    out[std::string(formats::serving_target_name(target))] = std::move(by_layer);
  }
  return out;
}

void run_formats(const FormatsOptions& options) {
  const formats::Shape2D shape = parse_shape(options.shape);
  if (options.json) {
    nlohmann::json out = nlohmann::json::array();
    for (const formats::WeightFormat* f : formats::all_formats()) {
      const auto rejection = f->rejects(shape);
      nlohmann::json tensors = nlohmann::json::array();
      for (const auto& t : f->tensors(shape)) {
        tensors.push_back({{"suffix", t.suffix},
                           {"dtype", io::dtype_name(t.dtype)},
                           {"shape", t.shape},
                           {"bytes", t.byte_size()}});
      }
      out.push_back({{"name", f->name()},
                     {"summary", f->summary()},
                     {"shape", {shape.out, shape.in}},
                     {"bytes", f->bytes(shape)},
                     {"bits_per_param", f->bits_per_param(shape)},
                     {"accepts_shape", !rejection.has_value()},
                     {"constraint", rejection ? nlohmann::json(*rejection) : nullptr},
                     {"exportable", f->exportable()},
                     {"vllm_servable", f->exportable() && !rejection.has_value()},
                     {"quantizes_activations", f->quantizes_activations()},
                     {"tensors", tensors},
                     {"serving", serving_json(*f)}});
    }
    std::printf("%s\n", out.dump(2).c_str());
    return;
  }
  std::printf("Weight formats for a [%lld, %lld] Linear (out x in):\n\n",
              static_cast<long long>(shape.out), static_cast<long long>(shape.in));
  std::printf("%-16s %9s  %-5s  %s\n", "format", "bits/par", "vLLM", "what");
  for (const formats::WeightFormat* f : formats::all_formats()) {
    const auto rejection = f->rejects(shape);
    const char* serving = !f->exportable() ? "no*" : rejection ? "no" : "yes";
    std::printf("%-16s %9.4f  %-5s  %s\n", std::string(f->name()).c_str(), f->bits_per_param(shape),
                serving, std::string(f->summary()).c_str());
    if (rejection) std::printf("%-16s %9s         constraint: %s\n", "", "", rejection->c_str());
    std::printf("%-16s %9s         tensors: %s\n", "", "", tensor_list(*f, shape).c_str());
  }
  std::printf("\nno* = research only: no compressed-tensors format, never exported.\n");
}

}  // namespace

void register_formats(CLI::App& app) {
  auto options = std::make_shared<FormatsOptions>();
  CLI::App* cmd = app.add_subcommand(
      "formats",
      "List the weight formats: bits per parameter for a shape, constraints, whether "
      "vLLM can serve it, the tensors it writes");
  cmd->add_flag("--json", options->json, "Print JSON instead of a table");
  cmd->add_option("--shape", options->shape, "Linear weight shape OUTxIN")->capture_default_str();
  cmd->callback([options] { run_formats(*options); });
}

}  // namespace pq::cli
