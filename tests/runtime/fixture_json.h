#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

// Reading the float64 reference fixtures of ../shared/fixtures (their "about" keys describe the
// fields), shared by the runtime's fixture tests.
namespace pq::runtime {

// Little-endian float32 values written as base64 (the fixtures' gradient probe directions V).
inline std::vector<float> decode_base64_f32(const std::string& text) {
  std::vector<std::uint8_t> bytes;
  std::uint32_t buffer = 0;
  int bits = 0;
  for (const char ch : text) {
    int value;
    if (ch >= 'A' && ch <= 'Z') {
      value = ch - 'A';
    } else if (ch >= 'a' && ch <= 'z') {
      value = ch - 'a' + 26;
    } else if (ch >= '0' && ch <= '9') {
      value = ch - '0' + 52;
    } else if (ch == '+') {
      value = 62;
    } else if (ch == '/') {
      value = 63;
    } else {
      continue;  // '=' padding
    }
    buffer = (buffer << 6) | static_cast<std::uint32_t>(value);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      bytes.push_back(static_cast<std::uint8_t>((buffer >> bits) & 0xff));
    }
  }
  std::vector<float> values(bytes.size() / 4);
  std::memcpy(values.data(), bytes.data(), values.size() * 4);
  return values;
}

// max|a - ref| / max|ref| over rows [rows, width] of `actual` against reference[t][j].
inline double relative_max_error(const float* actual, const nlohmann::json& reference) {
  double diff = 0.0, scale = 0.0;
  const std::size_t width = reference[0].size();
  for (std::size_t t = 0; t < reference.size(); ++t) {
    for (std::size_t j = 0; j < width; ++j) {
      const double ref = reference[t][j].get<double>();
      scale = std::max(scale, std::abs(ref));
      diff = std::max(diff, std::abs(actual[t * width + j] - ref));
    }
  }
  return diff / scale;
}

}  // namespace pq::runtime
