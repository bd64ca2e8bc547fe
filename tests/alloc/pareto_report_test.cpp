#include "report/pareto_report.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <sstream>

#include "alloc/assignment.h"
#include "alloc/pareto.h"
#include "common/error.h"
#include "common/file_util.h"
#include "random_instances.h"
#include "support/test_support.h"
#include "xml_check.h"

namespace pq::alloc {
namespace {

using test::decoder_cost_table;

std::vector<BitsTarget> targets_from(std::initializer_list<const char*> texts) {
  std::vector<BitsTarget> targets;
  for (const char* text : texts) targets.push_back(parse_bits_target(text));
  return targets;
}

void expect_monotone(const ParetoSweep& sweep, const CostTable& table) {
  const ParetoPoint* previous = nullptr;
  for (const ParetoPoint& point : sweep.points) {
    ASSERT_EQ(point.allocation.has_value(), point.totals.has_value());
    if (!point.totals) {
      EXPECT_EQ(previous, nullptr) << "a feasible point precedes infeasible " << point.target.text;
      continue;
    }
    EXPECT_LE(point.allocation->bytes, point.budget_bytes) << point.target.text;
    EXPECT_EQ(point.budget_bytes, point.target.budget_bytes(table.quantizable_params()));
    if (previous) {
      EXPECT_GT(point.target.value, previous->target.value);
      EXPECT_LE(point.totals->predicted_dloss, previous->totals->predicted_dloss)
          << previous->target.text << " -> " << point.target.text;
    }
    previous = &point;
  }
}

TEST(ParetoTest, SweepIsMonotoneOnExactAndCoarseAxes) {
  std::mt19937_64 rng(42);
  const CostTable table = decoder_cost_table(24, 256, 768, rng);
  const auto targets = targets_from({"5.0", "4.0", "4.6", "4.75", "4.85", "5.25", "5.5", "6.0",
                                     "7.0", "8.25", "12", "16", "4.3"});
  for (std::uint64_t max_units : {std::uint64_t{1} << 16, std::uint64_t{64}, std::uint64_t{3}}) {
    AllocatorOptions options;
    options.max_units = max_units;
    const KnapsackAllocator allocator(table, options);
    const ParetoSweep sweep = sweep_pareto(allocator, targets);
    ASSERT_EQ(sweep.points.size(), targets.size());
    EXPECT_EQ(sweep.points.front().target.text, "4.0");
    EXPECT_FALSE(sweep.points.front().totals.has_value());  // below MXFP4's 4.25 bits
    EXPECT_TRUE(sweep.points[1].totals.has_value());
    expect_monotone(sweep, table);
    // 16 bits buys BF16 everywhere: predicted dL 0.
    EXPECT_EQ(sweep.points.back().totals->predicted_dloss, 0.0);
    EXPECT_EQ(sweep.points.back().totals->per_format.at("BF16").linears, table.linears.size());
  }
}

TEST(ParetoTest, RandomInstancesStayMonotone) {
  std::mt19937_64 rng(99);
  for (int trial = 0; trial < 30; ++trial) {
    test::InstanceSpec spec;
    spec.linears = 50 + rng() % 150;
    spec.formats = 2 + rng() % 3;
    spec.groups = rng() % 20;
    spec.forbidden_probability = 0.2;
    spec.integer_dloss = trial % 2 == 0;
    spec.max_bytes = 1000;
    const CostTable table = test::random_cost_table(spec, rng);
    AllocatorOptions options;
    options.max_units = trial % 3 == 0 ? 100 : std::uint64_t{1} << 16;
    std::optional<KnapsackAllocator> allocator;
    try {
      allocator.emplace(table, options);
    } catch (const pq::Error&) {
      continue;  // a group without a common format
    }
    const double params = static_cast<double>(table.quantizable_params());
    const double low = 8.0 * static_cast<double>(allocator->min_bytes()) / params;
    const double high = 8.0 * static_cast<double>(allocator->saturation_bytes()) / params;
    std::vector<BitsTarget> targets;
    for (int k = 0; k < 12; ++k) {
      targets.push_back(
          parse_bits_target(fmt::format("{:.4f}", low - 0.1 + (high - low + 0.2) * k / 11)));
    }
    expect_monotone(sweep_pareto(*allocator, targets), table);
  }
}

TEST(ParetoTest, RepeatedTargetIsAnError) {
  std::mt19937_64 rng(1);
  const CostTable table = decoder_cost_table(2, 64, 128, rng);
  const KnapsackAllocator allocator(table);
  EXPECT_THROW(sweep_pareto(allocator, targets_from({"5", "4.5", "5.0"})), pq::Error);
}

TEST(KneedleTest, FindsTheElbow) {
  const std::vector<double> x = {4.5, 4.75, 5.0, 6.0, 8.25};
  const std::vector<double> y = {4.282, 2.355, 1.184, 0.860, 0.0};
  // Normalised, (1 - x_n) - y_n is 0, 0.38, 0.59, 0.40, 0: the knee is 5.0 bits.
  EXPECT_EQ(kneedle(x, y), std::optional<std::size_t>(2));
  const std::vector<double> elbow_x = {0, 1, 2, 3, 4}, elbow_y = {10, 1, 0.5, 0.2, 0};
  EXPECT_EQ(kneedle(elbow_x, elbow_y), std::optional<std::size_t>(1));
}

TEST(KneedleTest, NoKneeWithoutACurve) {
  const std::vector<double> line_x = {1, 2, 3, 4}, line_y = {3, 2, 1, 0};
  EXPECT_FALSE(kneedle(line_x, line_y).has_value());  // every point on the chord
  const std::vector<double> concave_y = {3, 2.9, 2.5, 0};
  EXPECT_FALSE(kneedle(line_x, concave_y).has_value());
  const std::vector<double> two_x = {1, 2}, two_y = {1, 0};
  EXPECT_FALSE(kneedle(two_x, two_y).has_value());
  const std::vector<double> flat_y = {1, 1, 1, 1};
  EXPECT_FALSE(kneedle(line_x, flat_y).has_value());
}

std::vector<std::string> split(const std::string& line, char separator) {
  std::vector<std::string> fields;
  std::stringstream stream(line);
  std::string field;
  while (std::getline(stream, field, separator)) fields.push_back(field);
  if (!line.empty() && line.back() == separator) fields.emplace_back();
  return fields;
}

ParetoSweep example_sweep(CostTable& table) {
  std::mt19937_64 rng(5);
  table = decoder_cost_table(12, 128, 384, rng);
  table.model = "tiny <model> & \"friends\"";
  const KnapsackAllocator allocator(table);
  return sweep_pareto(allocator,
                      targets_from({"4.1", "4.5", "4.75", "5", "5.5", "6", "7", "8.25", "10"}));
}

TEST(ParetoReportTest, CsvHasTheDocumentedColumnsAndValues) {
  CostTable table;
  const ParetoSweep sweep = example_sweep(table);
  std::vector<std::string> lines = split(report::pareto_csv(sweep), '\n');
  ASSERT_EQ(lines.back(), "");  // the file ends with a line break
  lines.pop_back();
  ASSERT_EQ(lines.size(), 1 + sweep.points.size());
  const std::vector<std::string> header = split(lines[0], ',');
  const std::vector<std::string> expected = {
      "target_bits",      "feasible",        "budget_bytes",
      "achieved_bits",    "checkpoint_bits", "quantizable_bytes",
      "checkpoint_bytes", "predicted_dloss", "knee",
      "linears_MXFP4",    "linears_NVFP4",   "linears_MXFP8",
      "linears_BF16",     "params_MXFP4",    "params_NVFP4",
      "params_MXFP8",     "params_BF16"};
  EXPECT_EQ(header, expected);
  int knees = 0;
  for (std::size_t i = 0; i < sweep.points.size(); ++i) {
    const std::vector<std::string> row = split(lines[i + 1], ',');
    ASSERT_EQ(row.size(), header.size()) << lines[i + 1];
    const ParetoPoint& point = sweep.points[i];
    EXPECT_EQ(row[0], point.target.text);
    EXPECT_EQ(std::stoull(row[2]), point.budget_bytes);
    if (!point.totals) {
      EXPECT_EQ(row[1], "0");
      EXPECT_EQ(row[3], "");
      continue;
    }
    EXPECT_EQ(row[1], "1");
    EXPECT_DOUBLE_EQ(std::stod(row[3]), point.totals->bits_per_quantizable_param);
    EXPECT_DOUBLE_EQ(std::stod(row[4]), point.totals->bits_per_checkpoint_param);
    EXPECT_EQ(std::stoull(row[5]), point.totals->quantizable_bytes);
    EXPECT_EQ(std::stoull(row[6]), point.totals->checkpoint_bytes);
    EXPECT_DOUBLE_EQ(std::stod(row[7]), point.totals->predicted_dloss);
    knees += row[8] == "1";
    std::uint64_t linears = 0, params = 0;
    for (std::size_t f = 0; f < 4; ++f) {
      linears += std::stoull(row[9 + f]);
      params += std::stoull(row[13 + f]);
      EXPECT_EQ(std::stoull(row[9 + f]), point.totals->per_format.at(table.formats[f]).linears);
    }
    EXPECT_EQ(linears, table.linears.size());
    EXPECT_EQ(params, table.quantizable_params());
  }
  EXPECT_EQ(knees, sweep.knee ? 1 : 0);
  ASSERT_TRUE(sweep.knee.has_value());
  EXPECT_FALSE(sweep.points.front().totals.has_value());  // 4.1 < MXFP4's 4.25
}

TEST(ParetoReportTest, SvgIsWellFormedAndLabelsEveryTarget) {
  CostTable table;
  const ParetoSweep sweep = example_sweep(table);
  const std::string svg = report::pareto_svg(sweep);
  const test::XmlElement root = test::parse_xml(svg);
  EXPECT_EQ(root.name, "svg");
  EXPECT_EQ(root.attributes.at("xmlns"), "http://www.w3.org/2000/svg");
  std::vector<std::string> texts;
  for (const test::XmlElement* text : root.find_all("text")) texts.push_back(text->all_text());
  const auto has_text = [&](const std::string& wanted) {
    return std::find(texts.begin(), texts.end(), wanted) != texts.end();
  };
  EXPECT_NE(root.all_text().find("tiny <model> & \"friends\""), std::string::npos);
  std::size_t feasible = 0;
  for (std::size_t i = 0; i < sweep.points.size(); ++i) {
    const ParetoPoint& point = sweep.points[i];
    // Table row label, and for feasible targets also the point's own label.
    const std::string row_label = point.target.text + (sweep.knee == i ? " (knee)" : "");
    EXPECT_TRUE(has_text(row_label)) << row_label;
    if (point.totals) {
      ++feasible;
      EXPECT_GE(std::count(texts.begin(), texts.end(), point.target.text), 1) << point.target.text;
      for (const std::string& format : table.formats) {
        EXPECT_TRUE(has_text(fmt::format("{}", point.totals->per_format.at(format).linears)));
      }
    }
  }
  EXPECT_TRUE(has_text("knee"));
  // One dot per feasible point, plus the knee's ring.
  EXPECT_EQ(root.find_all("circle").size(), feasible + 1);
  EXPECT_EQ(root.find_all("polyline").size(), 1u);
}

TEST(ParetoReportTest, XmlCheckerRejectsMalformedDocuments) {
  for (const char* bad :
       {"<svg><text>a & b</text></svg>", "<svg><g></svg>", "<svg x=1/>", "<svg a=\"1\" a=\"2\"/>",
        "<svg/><svg/>", "<svg><text>x</txet></svg>", "<svg a=\"<\"/>", "<svg>&bogus;</svg>"}) {
    EXPECT_THROW(test::parse_xml(bad), std::runtime_error) << bad;
  }
  EXPECT_EQ(
      test::parse_xml("<?xml version=\"1.0\"?>\n<a b='&lt;'>x&amp;y<!-- c --><c/></a>").all_text(),
      "x&y");
}

TEST(ParetoReportTest, WritesBothFiles) {
  CostTable table;
  const ParetoSweep sweep = example_sweep(table);
  pq::test::TempDir dir;
  report::write_pareto_report(dir.path(), sweep);
  EXPECT_EQ(read_text_file(dir / "pareto.csv"), report::pareto_csv(sweep));
  EXPECT_EQ(read_text_file(dir / "pareto.svg"), report::pareto_svg(sweep));
}

TEST(AssignmentTest, JsonRoundTrip) {
  std::mt19937_64 rng(11);
  const CostTable table = decoder_cost_table(6, 128, 384, rng);
  const KnapsackAllocator allocator(table);
  const BitsTarget target = parse_bits_target("5.25");
  const Allocation allocation = allocator.solve(target.budget_bytes(table.quantizable_params()));
  const AssignmentFile file = make_assignment_file(
      table, allocation, {"bits_per_param", target.text, allocation.budget_bytes});
  pq::test::TempDir dir;
  write_assignment(dir / "assignment.json", file);
  const AssignmentFile back = read_assignment(dir.path());
  EXPECT_EQ(assignment_to_json(back), assignment_to_json(file));
  ASSERT_EQ(back.linears.size(), table.linears.size());
  for (std::size_t l = 0; l < table.linears.size(); ++l) {
    EXPECT_EQ(back.linears[l].name, table.linears[l].name);
    EXPECT_EQ(back.linears[l].format, table.formats[allocation.format_of_linear[l]]);
  }
  EXPECT_EQ(back.totals.quantizable_bytes, allocation.bytes);
  EXPECT_EQ(back.totals.checkpoint_bytes, allocation.bytes + table.passthrough_bytes);
  EXPECT_DOUBLE_EQ(back.totals.bits_per_quantizable_param,
                   8.0 * static_cast<double>(allocation.bytes) /
                       static_cast<double>(table.quantizable_params()));
  EXPECT_LE(back.totals.bits_per_quantizable_param, 5.25);
  EXPECT_EQ(back.budget.kind, "bits_per_param");
  EXPECT_EQ(back.budget.value, "5.25");
}

TEST(AssignmentTest, InconsistentFileIsAnError) {
  std::mt19937_64 rng(12);
  const CostTable table = decoder_cost_table(2, 64, 128, rng);
  const KnapsackAllocator allocator(table);
  const Allocation allocation = allocator.solve(allocator.saturation_bytes());
  nlohmann::json j = assignment_to_json(make_assignment_file(
      table, allocation, {"checkpoint_bytes", "1GB", allocation.budget_bytes}));
  j["linears"][3]["bytes"] = j["linears"][3]["bytes"].get<std::uint64_t>() + 1;
  EXPECT_THROW(assignment_from_json(j, "assignment.json"), pq::Error);
  j = assignment_to_json(make_assignment_file(
      table, allocation, {"checkpoint_bytes", "1GB", allocation.budget_bytes}));
  j["linears"][0]["format"] = "NVFP5";
  EXPECT_THROW(assignment_from_json(j, "assignment.json"), pq::Error);
  j["schema"] = "other";
  EXPECT_THROW(assignment_from_json(j, "assignment.json"), pq::Error);
}

}  // namespace
}  // namespace pq::alloc
