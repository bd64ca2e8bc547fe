#include "report/pareto_report.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "common/file_util.h"
#include "report/xml_escape.h"

namespace pq::report {

namespace {

// A CSV field: quoted when it holds a separator, quote or line break (RFC 4180).
std::string csv_field(std::string_view text) {
  if (text.find_first_of(",\"\r\n") == std::string_view::npos) return std::string(text);
  std::string out = "\"";
  for (char c : text) {
    if (c == '"') out.push_back('"');
    out.push_back(c);
  }
  return out + "\"";
}

// Axis range and tick step: steps of 1, 2 or 5 times a power of ten, about five ticks.
struct Axis {
  double low = 0.0;
  double high = 1.0;
  double step = 0.2;
};

Axis nice_axis(double low, double high) {
  if (!(high > low)) {
    low -= 0.5;
    high += 0.5;
  }
  const double raw = (high - low) / 5.0;
  const double magnitude = std::pow(10.0, std::floor(std::log10(raw)));
  double step = magnitude;
  for (double factor : {1.0, 2.0, 5.0, 10.0}) {
    step = factor * magnitude;
    if (step >= raw) break;
  }
  return {std::floor(low / step) * step, std::ceil(high / step) * step, step};
}

}  // namespace

std::string pareto_csv(const alloc::ParetoSweep& sweep) {
  std::string out =
      "target_bits,feasible,budget_bytes,achieved_bits,checkpoint_bits,quantizable_bytes,"
      "checkpoint_bytes,predicted_dloss,knee";
  for (const std::string& format : sweep.formats) out += ",linears_" + csv_field(format);
  for (const std::string& format : sweep.formats) out += ",params_" + csv_field(format);
  out += "\n";
  for (std::size_t i = 0; i < sweep.points.size(); ++i) {
    const alloc::ParetoPoint& point = sweep.points[i];
    out += fmt::format("{},{},{}", point.target.text, point.totals ? 1 : 0, point.budget_bytes);
    if (point.totals) {
      const alloc::AllocationTotals& t = *point.totals;
      out += fmt::format(",{},{},{},{},{},{}", t.bits_per_quantizable_param,
                         t.bits_per_checkpoint_param, t.quantizable_bytes, t.checkpoint_bytes,
                         t.predicted_dloss, sweep.knee == i ? 1 : 0);
      for (const std::string& format : sweep.formats) {
        out += fmt::format(",{}", t.per_format.at(format).linears);
      }
      for (const std::string& format : sweep.formats) {
        out += fmt::format(",{}", t.per_format.at(format).params);
      }
    } else {
      out += ",,,,,,0" + std::string(2 * sweep.formats.size(), ',');
    }
    out += "\n";
  }
  return out;
}

std::string pareto_svg(const alloc::ParetoSweep& sweep) {
  constexpr double kWidth = 960, kLeft = 100, kRight = 920, kTop = 70, kBottom = 400;
  constexpr double kRowHeight = 22, kTableTop = 494;
  const double height = kTableTop + kRowHeight * static_cast<double>(sweep.points.size() + 1) + 20;

  double x_low = INFINITY, x_high = -INFINITY, y_high = 0.0;
  for (const alloc::ParetoPoint& point : sweep.points) {
    if (!point.totals) continue;
    x_low = std::min(x_low, point.totals->bits_per_quantizable_param);
    x_high = std::max(x_high, point.totals->bits_per_quantizable_param);
    y_high = std::max(y_high, point.totals->predicted_dloss);
  }
  if (!(x_low <= x_high)) x_low = x_high = 0.0;
  const Axis x_axis = nice_axis(x_low, x_high);
  const Axis y_axis = nice_axis(0.0, y_high > 0.0 ? y_high : 1.0);
  const auto px = [&](double bits) {
    return kLeft + (bits - x_axis.low) / (x_axis.high - x_axis.low) * (kRight - kLeft);
  };
  const auto py = [&](double dloss) {
    return kBottom - (dloss - y_axis.low) / (y_axis.high - y_axis.low) * (kBottom - kTop);
  };

  std::string svg = fmt::format(
      "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" "
      "viewBox=\"0 0 {0} {1}\" font-family=\"sans-serif\" font-size=\"12\">\n"
      "<rect x=\"0\" y=\"0\" width=\"{0}\" height=\"{1}\" fill=\"white\"/>\n"
      "<text x=\"{2}\" y=\"28\" font-size=\"18\">Predicted loss increase vs size: {3}</text>\n"
      "<text x=\"{2}\" y=\"48\" fill=\"#555\">Each point: the knapsack optimum at one "
      "bits-per-parameter target (labelled); red ring: Kneedle knee.</text>\n",
      kWidth, height, kLeft, xml_escape(sweep.model));

  // Axes, grid and ticks.
  svg += fmt::format(
      "<g stroke=\"black\"><line x1=\"{0}\" y1=\"{2}\" x2=\"{1}\" y2=\"{2}\"/>"
      "<line x1=\"{0}\" y1=\"{3}\" x2=\"{0}\" y2=\"{2}\"/></g>\n",
      kLeft, kRight, kBottom, kTop);
  for (double x = x_axis.low; x <= x_axis.high + x_axis.step / 2; x += x_axis.step) {
    svg += fmt::format(
        "<line x1=\"{0:.2f}\" y1=\"{1}\" x2=\"{0:.2f}\" y2=\"{2}\" stroke=\"#ddd\"/>"
        "<text x=\"{0:.2f}\" y=\"{3}\" text-anchor=\"middle\">{4:g}</text>\n",
        px(x), kTop, kBottom, kBottom + 18, std::round(x / x_axis.step) * x_axis.step);
  }
  for (double y = y_axis.low; y <= y_axis.high + y_axis.step / 2; y += y_axis.step) {
    svg += fmt::format(
        "<line x1=\"{0}\" y1=\"{2:.2f}\" x2=\"{1}\" y2=\"{2:.2f}\" stroke=\"#ddd\"/>"
        "<text x=\"{3}\" y=\"{4:.2f}\" text-anchor=\"end\">{5:g}</text>\n",
        kLeft, kRight, py(y), kLeft - 6, py(y) + 4, std::round(y / y_axis.step) * y_axis.step);
  }
  svg += fmt::format(
      "<text x=\"{0}\" y=\"{1}\" text-anchor=\"middle\">achieved bits per quantizable "
      "parameter</text>\n"
      "<text x=\"24\" y=\"{2}\" text-anchor=\"middle\" transform=\"rotate(-90 24 {2})\">"
      "predicted dL (sum over Linears)</text>\n",
      (kLeft + kRight) / 2, kBottom + 40, (kTop + kBottom) / 2);

  // The curve, its points and their labels.
  std::string polyline;
  for (const alloc::ParetoPoint& point : sweep.points) {
    if (!point.totals) continue;
    polyline += fmt::format("{:.2f},{:.2f} ", px(point.totals->bits_per_quantizable_param),
                            py(point.totals->predicted_dloss));
  }
  if (!polyline.empty()) polyline.pop_back();
  svg += fmt::format(
      "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{}\"/>\n", polyline);
  for (std::size_t i = 0; i < sweep.points.size(); ++i) {
    const alloc::ParetoPoint& point = sweep.points[i];
    if (!point.totals) continue;
    const double x = px(point.totals->bits_per_quantizable_param);
    const double y = py(point.totals->predicted_dloss);
    svg += fmt::format(
        "<circle cx=\"{:.2f}\" cy=\"{:.2f}\" r=\"4\" fill=\"#1f77b4\"><title>target {}: {:.4f} "
        "bits/param, predicted dL {:.6g}</title></circle>\n"
        "<text x=\"{:.2f}\" y=\"{:.2f}\" text-anchor=\"middle\" font-size=\"11\">{}</text>\n",
        x, y, xml_escape(point.target.text), point.totals->bits_per_quantizable_param,
        point.totals->predicted_dloss, x, y - 9, xml_escape(point.target.text));
    if (sweep.knee == i) {
      svg += fmt::format(
          "<circle cx=\"{0:.2f}\" cy=\"{1:.2f}\" r=\"9\" fill=\"none\" stroke=\"#d62728\" "
          "stroke-width=\"2\"/>\n<text x=\"{2:.2f}\" y=\"{1:.2f}\" fill=\"#d62728\">knee</text>\n",
          x, y, x + 12);
    }
  }

  // The table: every target, its outcome and the number of Linears per format.
  const double column = (kRight - kLeft) / static_cast<double>(3 + sweep.formats.size());
  const auto cell = [&](std::size_t col, double y, std::string_view text, bool bold) {
    return fmt::format("<text x=\"{:.2f}\" y=\"{:.2f}\"{}>{}</text>", kLeft + column * col, y,
                       bold ? " font-weight=\"bold\"" : "", xml_escape(text));
  };
  svg += fmt::format(
      "<g>\n<text x=\"{}\" y=\"{}\" fill=\"#555\">Number of Linears in each format at every "
      "target:</text>\n",
      kLeft, kTableTop - 24);
  svg += cell(0, kTableTop, "target bits", true) + cell(1, kTableTop, "achieved bits", true) +
         cell(2, kTableTop, "predicted dL", true);
  for (std::size_t f = 0; f < sweep.formats.size(); ++f) {
    svg += cell(3 + f, kTableTop, sweep.formats[f], true);
  }
  svg += "\n";
  for (std::size_t i = 0; i < sweep.points.size(); ++i) {
    const alloc::ParetoPoint& point = sweep.points[i];
    const double y = kTableTop + kRowHeight * static_cast<double>(i + 1);
    svg += cell(0, y, point.target.text + (sweep.knee == i ? " (knee)" : ""), sweep.knee == i);
    if (point.totals) {
      svg += cell(1, y, fmt::format("{:.4f}", point.totals->bits_per_quantizable_param), false) +
             cell(2, y, fmt::format("{:.6g}", point.totals->predicted_dloss), false);
      for (std::size_t f = 0; f < sweep.formats.size(); ++f) {
        svg +=
            cell(3 + f, y, fmt::format("{}", point.totals->per_format.at(sweep.formats[f]).linears),
                 false);
      }
    } else {
      svg += cell(1, y, "infeasible: below the smallest formats", false);
    }
    svg += "\n";
  }
  svg += "</g>\n</svg>\n";
  return svg;
}

void write_pareto_report(const std::filesystem::path& directory, const alloc::ParetoSweep& sweep) {
  write_text_file_atomic(directory / "pareto.csv", pareto_csv(sweep));
  write_text_file_atomic(directory / "pareto.svg", pareto_svg(sweep));
}

}  // namespace pq::report
