#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

struct pcre2_real_code_8;

namespace pq::tokenizer {

// A compiled PCRE2 pattern in UTF + UCP mode (\p{L}, \s and \w follow Unicode properties, as in
// the Oniguruma engine the Hugging Face tokenizers library uses), JIT-compiled when available.
// Immutable after construction, so one instance may be shared by threads.
class Regex {
 public:
  // Throws pq::Error naming the pattern and PCRE2's reason when it does not compile.
  explicit Regex(std::string_view pattern);
  ~Regex();
  Regex(Regex&& other) noexcept;
  Regex& operator=(Regex&& other) noexcept;
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // [begin, end) byte ranges of the successive non-overlapping matches in `subject`, which must
  // be valid UTF-8. After an empty match the search resumes one character later.
  std::vector<std::pair<std::size_t, std::size_t>> find_all(std::string_view subject) const;

 private:
  pcre2_real_code_8* code_ = nullptr;
  std::string pattern_;
};

}  // namespace pq::tokenizer
