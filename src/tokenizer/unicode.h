#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

// UTF-8 and Unicode helpers shared by the tokenizer pipeline stages.
namespace pq::tokenizer {

// One step of UTF-8 decoding. An invalid sequence yields valid=false and length = the size of its
// "maximal subpart" (Unicode 15, section 3.9, U+FFFD substitution of maximal subparts), which is
// also what Rust's String::from_utf8_lossy replaces with one U+FFFD, so lossy decoding here
// matches the Hugging Face tokenizers library byte for byte.
struct Utf8Step {
  char32_t code_point;
  std::uint8_t length;
  bool valid;
};
Utf8Step decode_utf8(std::string_view text, std::size_t pos);

bool is_valid_utf8(std::string_view text);
void append_utf8(std::string& out, char32_t code_point);
// Replaces every invalid sequence by U+FFFD.
std::string to_valid_utf8(std::string_view bytes);

enum class NormalizationForm { kNfc, kNfd, kNfkc, kNfkd };
// Unicode normalization through utf8proc. The input must be valid UTF-8.
std::string normalize(std::string_view text, NormalizationForm form);

// The GPT-2 byte-to-character table used by byte-level BPE (openai/gpt-2 src/encoder.py
// bytes_to_unicode; tokenizers/src/pre_tokenizers/byte_level.rs bytes_char): printable bytes
// '!'..'~', U+00A1..U+00AC and U+00AE..U+00FF map to themselves, the other 68 bytes map to
// U+0100, U+0101, ... in increasing byte order, so every byte becomes one visible character.
class ByteLevelAlphabet {
 public:
  static const ByteLevelAlphabet& instance();

  // The UTF-8 encoding of the character standing for `byte`.
  std::string_view encode(std::uint8_t byte) const { return encoded_[byte]; }
  // Appends the characters for every byte of `bytes`.
  void encode(std::string_view bytes, std::string& out) const;
  // The byte a character stands for, or -1 when the character is not in the alphabet.
  int decode(char32_t code_point) const {
    return code_point < byte_of_.size() ? byte_of_[code_point] : -1;
  }

 private:
  ByteLevelAlphabet();
  std::array<std::string, 256> encoded_;
  std::array<std::int16_t, 324> byte_of_;  // the largest character is U+0143 (256 + 67)
};

}  // namespace pq::tokenizer
