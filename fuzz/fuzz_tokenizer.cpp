// libFuzzer target: any byte string as tokenizer.json, loaded with Tokenizer::load from a file in
// a private temporary directory (without tokenizer_config.json). When it loads, a few fixed texts
// (ASCII, spaces, non-ASCII, added-token look-alikes) are encoded with and without special tokens;
// every id must be below vocab_size() and decode back through the file's decoder, and invalid
// UTF-8 must be refused. Anything but pq::Error escaping, or an id out of range, aborts.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <span>
#include <string_view>

#include "common/error.h"
#include "tokenizer/tokenizer.h"

namespace {

constexpr std::string_view kTexts[] = {
    "Hello world",
    "  two  spaces and a tab\there\n",
    "na\xC3\xAFve caf\xC3\xA9 \xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E \xF0\x9F\x8E\x89",
    "<s>[INST] it's 1234 </s><|endoftext|>",
    "\xE2\x96\x81x \xE2\x96\x81\xE2\x96\x81y",
};

const std::filesystem::path& tokenizer_file() {
  static const std::filesystem::path file = [] {
    char pattern[] = "/tmp/fuzz_tokenizer.XXXXXX";
    if (mkdtemp(pattern) == nullptr) std::abort();
    return std::filesystem::path(pattern) / "tokenizer.json";
  }();
  return file;
}

void check_ids(const pq::tokenizer::Tokenizer& tokenizer, std::span<const std::int32_t> ids) {
  for (const std::int32_t id : ids) {
    if (id < 0 || id >= tokenizer.vocab_size()) std::abort();
    tokenizer.id_to_token(id);
  }
  tokenizer.decode(ids);
  tokenizer.decode(ids, /*skip_special_tokens=*/true);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  {
    std::ofstream out(tokenizer_file(), std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
    if (!out) std::abort();
  }
  try {
    const auto tokenizer = pq::tokenizer::Tokenizer::load(tokenizer_file());
    for (const std::optional<std::int32_t> special : {tokenizer.bos_id(), tokenizer.eos_id()}) {
      if (special && (*special < 0 || *special >= tokenizer.vocab_size())) std::abort();
    }
    for (const std::string_view text : kTexts) {
      check_ids(tokenizer, tokenizer.encode(text, /*add_special_tokens=*/false));
      check_ids(tokenizer, tokenizer.encode(text, /*add_special_tokens=*/true));
    }
    try {
      tokenizer.encode("bad \xFF utf-8", false);
      std::abort();
    } catch (const pq::Error&) {
      // Invalid UTF-8 must be refused.
    }
  } catch (const pq::Error&) {
    // Rejecting malformed input with a pq::Error is the expected outcome.
  }
  return 0;
}
