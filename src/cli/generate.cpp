// prismaquant generate: greedy decoding from a text prompt or from token ids.
#include <charconv>
#include <cstdio>
#include <memory>
#include <string>

#include "cli/commands.h"
#include "common/error.h"
#include "runtime/checkpoint_model.h"
#include "runtime/evaluate.h"
#include "tokenizer/tokenizer.h"

namespace pq::cli {

namespace {

struct GenerateArgs {
  std::string model;
  std::string prompt;
  std::string prompt_ids;
  std::int64_t new_tokens = 32;
  bool print_ids = false;
  bool bf16 = false;
};

// "1, 2 3" -> {1, 2, 3}: ids separated by commas and/or whitespace.
std::vector<std::int32_t> parse_ids(const std::string& text) {
  std::vector<std::int32_t> ids;
  const char* p = text.data();
  const char* end = p + text.size();
  while (p < end) {
    if (*p == ',' || std::isspace(static_cast<unsigned char>(*p))) {
      ++p;
      continue;
    }
    std::int32_t id = -1;
    const auto [stop, error] = std::from_chars(p, end, id);
    PQ_CHECK(error == std::errc() && id >= 0 &&
                 (stop == end || *stop == ',' || std::isspace(static_cast<unsigned char>(*stop))),
             "--prompt-ids: \"{}\" is not a list of token ids", text);
    ids.push_back(id);
    p = stop;
  }
  PQ_CHECK(!ids.empty(), "--prompt-ids: no token ids given");
  return ids;
}

void run_generate(const GenerateArgs& args) {
  PQ_CHECK(args.prompt.empty() != args.prompt_ids.empty(),
           "generate: give exactly one of --prompt TEXT or --prompt-ids IDS");
  const auto tokenizer_path = std::filesystem::path(args.model) / "tokenizer.json";
  std::unique_ptr<tokenizer::Tokenizer> tokenizer;
  if (std::filesystem::exists(tokenizer_path)) {
    tokenizer = std::make_unique<tokenizer::Tokenizer>(tokenizer::Tokenizer::load(tokenizer_path));
  }
  std::vector<std::int32_t> prompt;
  if (!args.prompt_ids.empty()) {
    prompt = parse_ids(args.prompt_ids);
  } else {
    PQ_CHECK(tokenizer != nullptr, "{}: no tokenizer.json to encode --prompt (use --prompt-ids)",
             args.model);
    // With special tokens (Llama-2: BOS first), as transformers' tokenizer(prompt) does.
    prompt = tokenizer->encode(args.prompt, /*add_special_tokens=*/true);
  }
  runtime::RuntimeOptions options;
  options.compute = args.bf16 ? runtime::ComputeType::kBF16 : runtime::ComputeType::kF32;
  // Every step runs every layer (for one token), so the decoded layers stay in memory.
  options.keep_layers_resident = true;
  runtime::CheckpointModel model(args.model, options);
  const auto generated = runtime::greedy_generate(model.model(), prompt, args.new_tokens,
                                                  model.model().config().eos_token_ids);
  if (args.print_ids || tokenizer == nullptr) {
    std::string line;
    for (std::int32_t id : generated) line += (line.empty() ? "" : " ") + std::to_string(id);
    std::printf("%s\n", line.c_str());
    return;
  }
  std::vector<std::int32_t> all = prompt;
  all.insert(all.end(), generated.begin(), generated.end());
  std::printf("%s\n", tokenizer->decode(all, /*skip_special_tokens=*/true).c_str());
}

}  // namespace

void register_generate(CLI::App& app) {
  auto args = std::make_shared<GenerateArgs>();
  CLI::App* cmd = app.add_subcommand("generate", "Greedy decoding with MODEL (fp32 by default)");
  cmd->add_option("model", args->model, "checkpoint directory (config.json + safetensors)")
      ->required();
  CLI::Option* text =
      cmd->add_option("--prompt", args->prompt, "prompt text, encoded with MODEL/tokenizer.json");
  CLI::Option* ids = cmd->add_option("--prompt-ids", args->prompt_ids,
                                     "prompt as token ids separated by commas or spaces");
  text->excludes(ids);
  cmd->add_option("-n,--new-tokens", args->new_tokens, "tokens to generate (stops early at EOS)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_flag("--print-ids", args->print_ids,
                "print the generated token ids instead of the decoded text");
  cmd->add_flag("--bf16", args->bf16, "bf16 GEMM inputs (fp32 accumulation)");
  cmd->callback([args] { run_generate(*args); });
}

}  // namespace pq::cli
