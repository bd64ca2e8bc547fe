// prismaquant eval: perplexity of a checkpoint on text or token ids, optionally compared with a
// reference checkpoint (KL divergence and top-1 agreement per predicted token).
#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>

#include "cli/commands.h"
#include "common/error.h"
#include "data/token_dataset.h"
#include "runtime/checkpoint_model.h"
#include "runtime/evaluate.h"
#include "tokenizer/tokenizer.h"

namespace pq::cli {

namespace {

struct EvalArgs {
  std::string model;
  std::string data;
  std::string token_ids;
  std::string reference;
  std::int64_t seqlen = 512;
  std::int64_t max_seqs = 0;
  bool bf16 = false;
};

// Decoded float32 weights of checkpoints up to this size stay in memory across forward passes;
// larger ones are streamed layer by layer on every pass.
constexpr std::uint64_t kResidentCheckpointBytes = 1ull << 30;
// Tokens per forward pass, and memory for the reference's logits kept during a pass.
constexpr std::int64_t kTokensPerPass = 2048;
constexpr std::int64_t kReferenceLogitsBytes = 256ll << 20;

std::vector<std::int32_t> load_tokens(const EvalArgs& args) {
  if (!args.token_ids.empty()) {
    const auto dataset = data::TokenDataset::from_token_id_file(args.token_ids);
    return {dataset.tokens().begin(), dataset.tokens().end()};
  }
  const auto tokenizer_path = std::filesystem::path(args.model) / "tokenizer.json";
  PQ_CHECK(std::filesystem::exists(tokenizer_path),
           "{}: no tokenizer.json to tokenize --data with (use --token-ids)", args.model);
  const auto tokenizer = tokenizer::Tokenizer::load(tokenizer_path);
  // No BOS/EOS: the text is one running stream cut into windows, as the reference perplexities
  // of the shared checkpoints were measured (their README, "no BOS added").
  std::vector<std::int32_t> tokens;
  for (const std::string& document : data::read_documents(args.data, data::TextFormat::kAuto)) {
    const auto ids = tokenizer.encode(document, /*add_special_tokens=*/false);
    tokens.insert(tokens.end(), ids.begin(), ids.end());
  }
  return tokens;
}

runtime::RuntimeOptions options_for(const std::string& directory, bool bf16) {
  PQ_CHECK(std::filesystem::is_directory(directory), "{}: not a checkpoint directory", directory);
  std::uint64_t stored_bytes = 0;
  for (const auto& entry : std::filesystem::directory_iterator(directory)) {
    if (entry.path().extension() == ".safetensors") stored_bytes += entry.file_size();
  }
  runtime::RuntimeOptions options;
  options.compute = bf16 ? runtime::ComputeType::kBF16 : runtime::ComputeType::kF32;
  options.keep_layers_resident = stored_bytes <= kResidentCheckpointBytes;
  return options;
}

void run_eval(const EvalArgs& args) {
  PQ_CHECK(!args.data.empty() || !args.token_ids.empty(),
           "eval: give the evaluation data with --data FILE or --token-ids FILE");
  const std::vector<std::int32_t> tokens = load_tokens(args);
  const auto windows = runtime::token_windows(tokens, args.seqlen, args.max_seqs);

  runtime::CheckpointModel model(args.model, options_for(args.model, args.bf16));
  std::unique_ptr<runtime::CheckpointModel> reference;
  std::int64_t windows_per_pass = std::max<std::int64_t>(1, kTokensPerPass / args.seqlen);
  if (!args.reference.empty()) {
    reference = std::make_unique<runtime::CheckpointModel>(args.reference,
                                                           options_for(args.reference, false));
    const std::int64_t window_logits_bytes =
        args.seqlen * model.model().config().vocab_size * static_cast<std::int64_t>(sizeof(float));
    windows_per_pass =
        std::clamp<std::int64_t>(kReferenceLogitsBytes / window_logits_bytes, 1, windows_per_pass);
  }
  const runtime::EvalResult r = runtime::evaluate(
      model.model(), windows, reference ? &reference->model() : nullptr, windows_per_pass);
  std::printf("windows: %lld x %lld tokens (%lld predictions)\n", static_cast<long long>(r.windows),
              static_cast<long long>(args.seqlen), static_cast<long long>(r.predictions));
  std::printf("perplexity: %.6f\n", r.perplexity());
  if (reference) {
    std::printf("mean KL(reference || model): %.6g nats\n", r.mean_kl());
    std::printf("top-1 agreement: %.6f\n", r.top1_agreement());
  }
}

}  // namespace

void register_eval(CLI::App& app) {
  auto args = std::make_shared<EvalArgs>();
  CLI::App* cmd =
      app.add_subcommand("eval",
                         "Perplexity of MODEL on --data or --token-ids; with --reference, mean "
                         "KL(reference || model) and top-1 agreement");
  cmd->add_option("model", args->model, "checkpoint directory (config.json + safetensors)")
      ->required();
  CLI::Option* data =
      cmd->add_option("--data", args->data,
                      "text file (plain text, or .jsonl), tokenized with MODEL/tokenizer.json");
  CLI::Option* ids =
      cmd->add_option("--token-ids", args->token_ids, "file of whitespace-separated token ids");
  data->excludes(ids);
  cmd->add_option("--seqlen", args->seqlen, "tokens per window (each window is scored alone)")
      ->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--max-seqs", args->max_seqs, "at most this many windows (0: all)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--reference", args->reference, "reference checkpoint directory");
  cmd->add_flag("--bf16", args->bf16, "bf16 GEMM inputs for MODEL (fp32 accumulation)");
  cmd->callback([args] { run_eval(*args); });
}

}  // namespace pq::cli
