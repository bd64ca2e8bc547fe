#include <cstdio>
#include <memory>
#include <string>

#include "cli/commands.h"
#include "model/inspect_report.h"
#include "model/model_spec.h"

namespace pq::cli {

void register_inspect(CLI::App& app) {
  struct Options {
    std::string model_dir;
    bool json = false;
    bool quantize_lm_head = false;
  };
  auto options = std::make_shared<Options>();
  CLI::App* command = app.add_subcommand(
      "inspect", "List the Linears of a checkpoint, their roles, sibling groups and parameters");
  command
      ->add_option("MODEL_DIR", options->model_dir,
                   "Hugging Face checkpoint directory (config.json + safetensors)")
      ->required();
  command->add_flag("--json", options->json, "Print a JSON object (see docs/inspect-json.md)");
  command->add_flag("--quantize-lm-head", options->quantize_lm_head,
                    "Count an untied lm_head as a quantization candidate");
  command->callback([options] {
    model::SpecOptions spec_options;
    spec_options.quantize_lm_head = options->quantize_lm_head;
    const model::ModelSpec spec = model::load_model_spec(options->model_dir, spec_options);
    const std::string text =
        options->json ? model::inspect_json(spec).dump(2) + "\n" : model::inspect_text(spec);
    std::fwrite(text.data(), 1, text.size(), stdout);
  });
}

}  // namespace pq::cli
