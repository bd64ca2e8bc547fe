#include "tokenizer/regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <memory>

#include "common/error.h"
#include "common/json_reader.h"
#include "tokenizer/unicode.h"

namespace pq::tokenizer {
namespace {

std::string pcre2_message(int code) {
  PCRE2_UCHAR buffer[256];
  pcre2_get_error_message(code, buffer, sizeof(buffer));
  return reinterpret_cast<const char*>(buffer);
}

struct MatchDataDeleter {
  void operator()(pcre2_match_data* data) const { pcre2_match_data_free(data); }
};
struct MatchContextDeleter {
  void operator()(pcre2_match_context* context) const { pcre2_match_context_free(context); }
};
struct JitStackDeleter {
  void operator()(pcre2_jit_stack* stack) const { pcre2_jit_stack_free(stack); }
};

}  // namespace

Regex::Regex(std::string_view pattern) : pattern_(pattern) {
  int error = 0;
  PCRE2_SIZE offset = 0;
  code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                        PCRE2_UTF | PCRE2_UCP, &error, &offset, nullptr);
  PQ_CHECK(code_ != nullptr, "regex {} does not compile at offset {}: {}",
           quoted_json_string(pattern_), offset, pcre2_message(error));
  // Without JIT support (some builds lack it) the interpreter gives the same matches, slower.
  pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);
}

Regex::~Regex() {
  pcre2_code_free(code_);
}

Regex::Regex(Regex&& other) noexcept
    : code_(std::exchange(other.code_, nullptr)), pattern_(std::move(other.pattern_)) {}

Regex& Regex::operator=(Regex&& other) noexcept {
  if (this != &other) {
    pcre2_code_free(code_);
    code_ = std::exchange(other.code_, nullptr);
    pattern_ = std::move(other.pattern_);
  }
  return *this;
}

std::vector<std::pair<std::size_t, std::size_t>> Regex::find_all(std::string_view subject) const {
  std::vector<std::pair<std::size_t, std::size_t>> matches;
  if (subject.empty()) return matches;
  const std::unique_ptr<pcre2_match_data, MatchDataDeleter> data(
      pcre2_match_data_create_from_pattern(code_, nullptr));
  // Patterns like \s+(?!\S) backtrack over long whitespace runs; the default 32 KiB JIT stack
  // can be too small for them, so allow up to 8 MiB.
  const std::unique_ptr<pcre2_match_context, MatchContextDeleter> context(
      pcre2_match_context_create(nullptr));
  const std::unique_ptr<pcre2_jit_stack, JitStackDeleter> stack(
      pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr));
  PQ_CHECK(data && context && stack, "out of memory matching regex '{}'", pattern_);
  pcre2_jit_stack_assign(context.get(), nullptr, stack.get());

  const auto* bytes = reinterpret_cast<PCRE2_SPTR>(subject.data());
  std::size_t start = 0;
  while (start < subject.size()) {
    // The caller validated the UTF-8 once; re-checking it at every match would be quadratic.
    const int rc = pcre2_match(code_, bytes, subject.size(), start, PCRE2_NO_UTF_CHECK, data.get(),
                               context.get());
    if (rc == PCRE2_ERROR_NOMATCH) break;
    PQ_CHECK(rc > 0, "regex '{}' failed: {}", pattern_, pcre2_message(rc));
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data.get());
    const std::size_t begin = ovector[0];
    const std::size_t end = ovector[1];
    if (end > begin) {
      matches.emplace_back(begin, end);
      start = end;
    } else {
      start = begin + decode_utf8(subject, begin).length;
    }
  }
  return matches;
}

}  // namespace pq::tokenizer
