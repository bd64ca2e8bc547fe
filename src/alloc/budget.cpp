#include "alloc/budget.h"

#include <array>
#include <cctype>
#include <limits>

#include "common/error.h"

namespace pq::alloc {

namespace {

using u128 = unsigned __int128;

// A non-negative decimal number held exactly: mantissa / 10^decimals.
struct Decimal {
  std::uint64_t mantissa = 0;
  unsigned decimals = 0;
};

u128 pow10(unsigned exponent) {
  u128 p = 1;
  for (unsigned i = 0; i < exponent; ++i) p *= 10;
  return p;
}

// Reads digits[.digits] from the front of `text`, returning how many characters were used (0 when
// there is no number). 18 significant digits fit a uint64 mantissa and are more than any budget
// needs.
std::size_t read_decimal(std::string_view text, Decimal& out, std::string_view what) {
  std::size_t i = 0;
  bool any_digit = false;
  bool seen_point = false;
  unsigned digits = 0;
  for (; i < text.size(); ++i) {
    const char c = text[i];
    if (c == '.' && !seen_point) {
      seen_point = true;
      continue;
    }
    if (!std::isdigit(static_cast<unsigned char>(c))) break;
    any_digit = true;
    PQ_CHECK(++digits <= 18, "{} \"{}\": too many digits", what, text);
    out.mantissa = out.mantissa * 10 + static_cast<std::uint64_t>(c - '0');
    if (seen_point) ++out.decimals;
  }
  return any_digit ? i : 0;
}

}  // namespace

std::uint64_t BitsTarget::budget_bytes(std::uint64_t params) const {
  const u128 bytes = static_cast<u128>(mantissa) * params / (pow10(decimals) * 8);
  PQ_CHECK(bytes <= std::numeric_limits<std::uint64_t>::max(),
           "target {} bits/param overflows the byte budget", text);
  return static_cast<std::uint64_t>(bytes);
}

BitsTarget parse_bits_target(std::string_view text) {
  Decimal d;
  const std::size_t used = read_decimal(text, d, "bits per parameter");
  PQ_CHECK(used > 0 && used == text.size(),
           "invalid bits per parameter \"{}\": expected a decimal number like 4.75", text);
  PQ_CHECK(d.mantissa > 0, "bits per parameter must be positive, got \"{}\"", text);
  BitsTarget target;
  target.text = std::string(text);
  target.mantissa = d.mantissa;
  target.decimals = d.decimals;
  target.value = static_cast<double>(d.mantissa) / static_cast<double>(pow10(d.decimals));
  return target;
}

std::vector<BitsTarget> parse_bits_targets(std::string_view list) {
  std::vector<BitsTarget> targets;
  std::size_t begin = 0;
  while (true) {
    const std::size_t comma = list.find(',', begin);
    std::string_view item =
        list.substr(begin, comma == std::string_view::npos ? list.npos : comma - begin);
    while (!item.empty() && item.front() == ' ') item.remove_prefix(1);
    while (!item.empty() && item.back() == ' ') item.remove_suffix(1);
    targets.push_back(parse_bits_target(item));
    if (comma == std::string_view::npos) break;
    begin = comma + 1;
  }
  return targets;
}

std::uint64_t parse_byte_size(std::string_view text) {
  Decimal d;
  const std::size_t used = read_decimal(text, d, "size");
  PQ_CHECK(used > 0, "invalid size \"{}\": expected a number with an optional unit like 24GB",
           text);
  std::string unit;
  for (char c : text.substr(used)) {
    if (c != ' ') unit.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(c))));
  }
  struct Unit {
    std::string_view name;
    u128 multiplier;
  };
  const std::array<Unit, 10> units = {{{"", 1},
                                       {"b", 1},
                                       {"kb", pow10(3)},
                                       {"mb", pow10(6)},
                                       {"gb", pow10(9)},
                                       {"tb", pow10(12)},
                                       {"kib", u128{1} << 10},
                                       {"mib", u128{1} << 20},
                                       {"gib", u128{1} << 30},
                                       {"tib", u128{1} << 40}}};
  for (const Unit& u : units) {
    if (unit != u.name) continue;
    const u128 bytes = static_cast<u128>(d.mantissa) * u.multiplier / pow10(d.decimals);
    PQ_CHECK(bytes > 0, "size \"{}\" is zero bytes", text);
    PQ_CHECK(bytes <= std::numeric_limits<std::uint64_t>::max(), "size \"{}\" is too large", text);
    return static_cast<std::uint64_t>(bytes);
  }
  fail("invalid size \"{}\": unknown unit; use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB", text);
}

}  // namespace pq::alloc
