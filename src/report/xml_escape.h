#pragma once

#include <string>
#include <string_view>

namespace pq::report {

// `text` safe inside SVG/XML text and attribute values: & < > " ' as entities.
std::string xml_escape(std::string_view text);

}  // namespace pq::report
