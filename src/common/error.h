#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace pq {

// Every failure the user can cause (bad files, bad arguments, unsupported models) is reported as a
// pq::Error carrying one line that names the offending file or object. The CLI prints it and exits
// non-zero; nothing is allowed to crash on user input.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw Error(fmt::format(format, std::forward<Args>(args)...));
}

// Checks a condition that user input controls; throws pq::Error with the formatted message.
#define PQ_CHECK(cond, ...)      \
  do {                           \
    if (!(cond)) {               \
      ::pq::fail(__VA_ARGS__);   \
    }                            \
  } while (0)

}  // namespace pq
