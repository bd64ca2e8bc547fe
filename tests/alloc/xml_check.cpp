#include "xml_check.h"

#include <fmt/format.h>

#include <cctype>
#include <stdexcept>

namespace pq::alloc::test {

namespace {

class Parser {
 public:
  explicit Parser(std::string_view text) : text_(text) {}

  XmlElement document() {
    if (starts_with("<?xml")) skip_past("?>");
    skip_misc();
    XmlElement root = element();
    skip_misc();
    if (pos_ != text_.size()) error("content after the root element");
    return root;
  }

 private:
  [[noreturn]] void error(std::string_view what) const {
    throw std::runtime_error(fmt::format("XML error at byte {}: {}", pos_, what));
  }
  bool starts_with(std::string_view s) const { return text_.substr(pos_).starts_with(s); }
  void skip_past(std::string_view end) {
    const std::size_t at = text_.find(end, pos_);
    if (at == std::string_view::npos) error(fmt::format("missing \"{}\"", end));
    pos_ = at + end.size();
  }
  void skip_space() {
    while (pos_ < text_.size() && std::isspace(static_cast<unsigned char>(text_[pos_]))) ++pos_;
  }
  void skip_misc() {
    while (true) {
      skip_space();
      if (!starts_with("<!--")) return;
      skip_past("-->");
    }
  }
  void expect(char c) {
    if (pos_ >= text_.size() || text_[pos_] != c) error(fmt::format("expected '{}'", c));
    ++pos_;
  }
  std::string name() {
    const std::size_t begin = pos_;
    const auto first = [](char c) {
      return std::isalpha(static_cast<unsigned char>(c)) || c == '_' || c == ':';
    };
    const auto rest = [&](char c) {
      return first(c) || std::isdigit(static_cast<unsigned char>(c)) || c == '-' || c == '.';
    };
    if (pos_ >= text_.size() || !first(text_[pos_])) error("expected a name");
    while (pos_ < text_.size() && rest(text_[pos_])) ++pos_;
    return std::string(text_.substr(begin, pos_ - begin));
  }
  // Decodes one reference after '&'.
  std::string reference() {
    const std::size_t end = text_.find(';', pos_);
    if (end == std::string_view::npos || end - pos_ > 10) error("bare '&'");
    const std::string_view ref = text_.substr(pos_, end - pos_);
    pos_ = end + 1;
    if (ref == "amp") return "&";
    if (ref == "lt") return "<";
    if (ref == "gt") return ">";
    if (ref == "quot") return "\"";
    if (ref == "apos") return "'";
    if (ref.size() > 1 && ref[0] == '#') {
      const bool hex = ref[1] == 'x';
      const std::string digits(ref.substr(hex ? 2 : 1));
      if (digits.empty()) error("empty character reference");
      for (char c : digits) {
        if (!(hex ? std::isxdigit(static_cast<unsigned char>(c))
                  : std::isdigit(static_cast<unsigned char>(c)))) {
          error("bad character reference");
        }
      }
      const unsigned long code = std::stoul(digits, nullptr, hex ? 16 : 10);
      if (code >= 0x80) return "?";  // the checks here only need ASCII
      return std::string(1, static_cast<char>(code));
    }
    error(fmt::format("unknown entity \"&{};\"", ref));
  }
  std::string attribute_value() {
    if (pos_ >= text_.size() || (text_[pos_] != '"' && text_[pos_] != '\'')) {
      error("attribute value must be quoted");
    }
    const char quote = text_[pos_++];
    std::string value;
    while (true) {
      if (pos_ >= text_.size()) error("unterminated attribute value");
      const char c = text_[pos_++];
      if (c == quote) return value;
      if (c == '<') error("'<' in an attribute value");
      value += c == '&' ? reference() : std::string(1, c);
    }
  }
  XmlElement element() {
    expect('<');
    XmlElement e;
    e.name = name();
    while (true) {
      const std::size_t before = pos_;
      skip_space();
      if (starts_with("/>")) {
        pos_ += 2;
        return e;
      }
      if (starts_with(">")) {
        ++pos_;
        break;
      }
      if (pos_ == before) error("expected whitespace before an attribute");
      const std::string key = name();
      skip_space();
      expect('=');
      skip_space();
      if (!e.attributes.emplace(key, attribute_value()).second) {
        error(fmt::format("duplicate attribute \"{}\"", key));
      }
    }
    while (true) {
      if (pos_ >= text_.size()) error(fmt::format("unclosed <{}>", e.name));
      if (starts_with("<!--")) {
        skip_past("-->");
      } else if (starts_with("</")) {
        pos_ += 2;
        if (name() != e.name) error(fmt::format("mismatched closing tag for <{}>", e.name));
        skip_space();
        expect('>');
        return e;
      } else if (text_[pos_] == '<') {
        e.children.push_back(element());
      } else if (text_[pos_] == '&') {
        ++pos_;
        e.text += reference();
      } else {
        if (starts_with("]]>")) error("\"]]>\" in text");
        e.text += text_[pos_++];
      }
    }
  }

  std::string_view text_;
  std::size_t pos_ = 0;
};

void collect(const XmlElement& e, std::string_view name, std::vector<const XmlElement*>& out) {
  if (e.name == name) out.push_back(&e);
  for (const XmlElement& child : e.children) collect(child, name, out);
}

}  // namespace

std::vector<const XmlElement*> XmlElement::find_all(std::string_view element_name) const {
  std::vector<const XmlElement*> out;
  collect(*this, element_name, out);
  return out;
}

std::string XmlElement::all_text() const {
  std::string out = text;
  for (const XmlElement& child : children) out += child.all_text();
  return out;
}

XmlElement parse_xml(std::string_view document) {
  return Parser(document).document();
}

}  // namespace pq::alloc::test
