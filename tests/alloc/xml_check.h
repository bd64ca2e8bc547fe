#pragma once

#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace pq::alloc::test {

// A strict reader for the XML subset our reports write (prolog, comments, elements, quoted
// attributes, text, the five predefined entities and character references). Anything else that
// a browser's XML parser would reject -- unbalanced tags, bare '&' or '<', unquoted or duplicate
// attributes, content after the root -- throws std::runtime_error naming the byte offset.
struct XmlElement {
  std::string name;
  std::map<std::string, std::string> attributes;
  std::vector<XmlElement> children;
  std::string text;  // the element's own character data, entities decoded

  // Every descendant (and this element) with the given name, in document order.
  std::vector<const XmlElement*> find_all(std::string_view element_name) const;
  // Text of this element and all descendants, concatenated.
  std::string all_text() const;
};

XmlElement parse_xml(std::string_view document);

}  // namespace pq::alloc::test
