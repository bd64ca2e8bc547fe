#include "report/scout_report.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <map>

#include "report/xml_escape.h"

namespace pq::report {

namespace {

// Decades covering [low, high] (both positive).
std::pair<int, int> decades(double low, double high) {
  int first = static_cast<int>(std::floor(std::log10(low)));
  int last = static_cast<int>(std::ceil(std::log10(high)));
  if (last == first) ++last;
  return {first, last};
}

std::string stage_colour(std::string_view stage) {
  static const std::map<std::string_view, std::string_view> colours = {{"L1", "#1f77b4"},
                                                                       {"L2", "#ff7f0e"},
                                                                       {"L3", "#2ca02c"},
                                                                       {"bisect", "#9467bd"},
                                                                       {"polish", "#d62728"}};
  const auto it = colours.find(stage);
  return std::string(it == colours.end() ? "#7f7f7f" : it->second);
}

}  // namespace

std::string scout_svg(std::span<const ScoutPlotPoint> points) {
  constexpr double kWidth = 960, kLeft = 100, kRight = 900, kTop = 70, kBottom = 470;
  constexpr double kRowHeight = 18, kTableTop = 540;
  const double height = kTableTop + kRowHeight * static_cast<double>(points.size() + 1) + 20;
  double x_low = INFINITY, x_high = 0.0, y_low = INFINITY, y_high = 0.0;
  for (const ScoutPlotPoint& p : points) {
    if (p.predicted_dloss <= 0.0 || p.measured_kl <= 0.0) continue;
    x_low = std::min(x_low, p.predicted_dloss);
    x_high = std::max(x_high, p.predicted_dloss);
    y_low = std::min(y_low, p.measured_kl);
    y_high = std::max(y_high, p.measured_kl);
  }
  if (!(x_low <= x_high)) x_low = x_high = 1.0;
  if (!(y_low <= y_high)) y_low = y_high = 1.0;
  const auto [x_first, x_last] = decades(x_low, x_high);
  const auto [y_first, y_last] = decades(y_low, y_high);
  const auto px = [&](double v) {
    return kLeft + (std::log10(v) - x_first) / (x_last - x_first) * (kRight - kLeft);
  };
  const auto py = [&](double v) {
    return kBottom - (std::log10(v) - y_first) / (y_last - y_first) * (kBottom - kTop);
  };
  std::string svg = fmt::format(
      "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" "
      "viewBox=\"0 0 {0} {1}\" font-family=\"sans-serif\" font-size=\"12\">\n"
      "<rect x=\"0\" y=\"0\" width=\"{0}\" height=\"{1}\" fill=\"white\"/>\n"
      "<text x=\"{2}\" y=\"28\" font-size=\"18\">Measured held-out KL vs predicted dL</text>\n"
      "<text x=\"{2}\" y=\"48\" fill=\"#555\">Each point: one candidate assignment (log axes); "
      "colour: the scout step that made it; red ring: the shipped choice.</text>\n",
      kWidth, height, kLeft);
  svg += fmt::format(
      "<g stroke=\"black\"><line x1=\"{0}\" y1=\"{2}\" x2=\"{1}\" y2=\"{2}\"/>"
      "<line x1=\"{0}\" y1=\"{3}\" x2=\"{0}\" y2=\"{2}\"/></g>\n",
      kLeft, kRight, kBottom, kTop);
  for (int d = x_first; d <= x_last; ++d) {
    const double x = px(std::pow(10.0, d));
    svg += fmt::format(
        "<line x1=\"{0:.2f}\" y1=\"{1}\" x2=\"{0:.2f}\" y2=\"{2}\" stroke=\"#ddd\"/>"
        "<text x=\"{0:.2f}\" y=\"{3}\" text-anchor=\"middle\">1e{4}</text>\n",
        x, kTop, kBottom, kBottom + 18, d);
  }
  for (int d = y_first; d <= y_last; ++d) {
    const double y = py(std::pow(10.0, d));
    svg += fmt::format(
        "<line x1=\"{0}\" y1=\"{2:.2f}\" x2=\"{1}\" y2=\"{2:.2f}\" stroke=\"#ddd\"/>"
        "<text x=\"{3}\" y=\"{4:.2f}\" text-anchor=\"end\">1e{5}</text>\n",
        kLeft, kRight, y, kLeft - 6, y + 4, d);
  }
  svg += fmt::format(
      "<text x=\"{0}\" y=\"{1}\" text-anchor=\"middle\">predicted dL (surrogate, sum over "
      "Linears)</text>\n"
      "<text x=\"24\" y=\"{2}\" text-anchor=\"middle\" transform=\"rotate(-90 24 {2})\">"
      "measured KL(reference || quantized), nats per token</text>\n",
      (kLeft + kRight) / 2, kBottom + 40, (kTop + kBottom) / 2);
  for (const ScoutPlotPoint& p : points) {
    if (p.predicted_dloss <= 0.0 || p.measured_kl <= 0.0) continue;
    const double x = px(p.predicted_dloss), y = py(p.measured_kl);
    svg += fmt::format(
        "<circle cx=\"{:.2f}\" cy=\"{:.2f}\" r=\"4\" fill=\"{}\"><title>{}</title></circle>\n", x,
        y, stage_colour(p.stage), xml_escape(p.label));
    if (p.chosen) {
      svg += fmt::format(
          "<circle cx=\"{:.2f}\" cy=\"{:.2f}\" r=\"9\" fill=\"none\" stroke=\"red\" "
          "stroke-width=\"2\"/>\n",
          x, y);
    }
  }
  // The table of every candidate.
  svg += fmt::format(
      "<text x=\"{0}\" y=\"{1}\" font-weight=\"bold\">candidate</text>"
      "<text x=\"{2}\" y=\"{1}\" font-weight=\"bold\" text-anchor=\"end\">bits</text>"
      "<text x=\"{3}\" y=\"{1}\" font-weight=\"bold\" text-anchor=\"end\">predicted dL</text>"
      "<text x=\"{4}\" y=\"{1}\" font-weight=\"bold\" text-anchor=\"end\">measured KL</text>\n",
      kLeft, kTableTop, kLeft + 260, kLeft + 400, kLeft + 540);
  double row = kTableTop + kRowHeight;
  for (const ScoutPlotPoint& p : points) {
    svg += fmt::format(
        "<text x=\"{0}\" y=\"{1}\" fill=\"{2}\">{3}{4}</text>"
        "<text x=\"{5}\" y=\"{1}\" text-anchor=\"end\">{6:.4f}</text>"
        "<text x=\"{7}\" y=\"{1}\" text-anchor=\"end\">{8:.4g}</text>"
        "<text x=\"{9}\" y=\"{1}\" text-anchor=\"end\">{10:.4g}</text>\n",
        kLeft, row, stage_colour(p.stage), xml_escape(p.label), p.chosen ? " (shipped)" : "",
        kLeft + 260, p.bits, kLeft + 400, p.predicted_dloss, kLeft + 540, p.measured_kl);
    row += kRowHeight;
  }
  svg += "</svg>\n";
  return svg;
}

}  // namespace pq::report
