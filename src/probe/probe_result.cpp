#include "probe/probe_result.h"

#include <fmt/format.h>

#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "common/error.h"
#include "common/json_reader.h"

namespace pq::probe {

namespace {

using nlohmann::json;

// Bounds of probe.json's integers: input widths as config.json's (src/model/config.cpp), output
// widths up to the vocabulary (lm_head), counts of tokens far beyond any calibration run. They
// keep in_features^2 and the readers' other products inside 64 bits.
constexpr std::int64_t kMaxInFeatures = std::int64_t{1} << 20;
constexpr std::int64_t kMaxOutFeatures = std::int64_t{1} << 24;
constexpr std::int64_t kMaxCount = std::int64_t{1} << 53;

const json& field(const json& object, const char* key, std::string_view where) {
  PQ_CHECK(object.is_object(), "{} is not an object", where);
  const auto it = object.find(key);
  PQ_CHECK(it != object.end(), "{} has no \"{}\"", where, key);
  return *it;
}

const json& array_field(const json& object, const char* key, std::string_view where) {
  const json& value = field(object, key, where);
  PQ_CHECK(value.is_array(), "{}: \"{}\" is not an array", where, key);
  return value;
}

std::string string_field(const json& object, const char* key, std::string_view where) {
  const json& value = field(object, key, where);
  PQ_CHECK(value.is_string(), "{}: \"{}\" is not a string", where, key);
  return value.get<std::string>();
}

// A JSON integer in [lo, hi]: never a float (nlohmann converts 1e300 to an integer with undefined
// behaviour, and 2.5 by truncation) nor a value out of range.
std::int64_t integer(const json& value, std::string_view what, std::int64_t lo, std::int64_t hi) {
  PQ_CHECK(value.is_number_integer(), "{} is a {}, not an integer", what, value.type_name());
  const bool in_range = value.is_number_unsigned()
                            ? value.get<std::uint64_t>() <= static_cast<std::uint64_t>(hi)
                            : value.get<std::int64_t>() >= lo && value.get<std::int64_t>() <= hi;
  PQ_CHECK(in_range, "{} is {}, outside [{}, {}]", what, value.dump(), lo, hi);
  return value.get<std::int64_t>();
}

// A finite number in [0, hi]: the probe writes sums of squares, maxima of |x| and probabilities.
double non_negative(const json& value, std::string_view what, double hi) {
  PQ_CHECK(value.is_number(), "{} is a {}, not a number", what, value.type_name());
  const double x = value.get<double>();
  PQ_CHECK(x >= 0.0 && x <= hi, "{} is {}, outside [0, {}]", what, x, hi);
  return x;
}

}  // namespace

ProbeResult ProbeResult::read(const std::filesystem::path& probe_dir) {
  const std::filesystem::path json_path = probe_dir / kProbeJsonFile;
  PQ_CHECK(std::filesystem::exists(json_path), "{}: no probe.json (run `prismaquant probe`)",
           probe_dir.string());
  ProbeResult result;
  result.dir_ = probe_dir;
  std::vector<std::string> files;
  try {
    const json j = read_json_file(json_path);
    PQ_CHECK(string_field(j, "schema", "probe.json") == kProbeSchema, "schema is not {}",
             kProbeSchema);
    result.model_ = string_field(j, "model", "probe.json");
    result.fingerprint_ = string_field(j, "fingerprint", "probe.json");
    const json& calibration = field(j, "calibration", "probe.json");
    result.sequences_ = integer(field(calibration, "sequences", "calibration"),
                                "calibration.sequences", 0, kMaxCount);
    if (calibration.contains("fisher")) {
      PQ_CHECK(calibration["fisher"].is_boolean(), "calibration.fisher is not true or false");
      result.has_fisher_ = calibration["fisher"].get<bool>();
    }
    if (calibration.contains("hessians")) {
      PQ_CHECK(calibration["hessians"].is_boolean(), "calibration.hessians is not true or false");
      result.has_hessians_ = calibration["hessians"].get<bool>();
    }
    if (calibration.contains("seqlen")) {
      result.seqlen_ = integer(calibration["seqlen"], "calibration.seqlen", 0, kMaxCount);
    }
    if (calibration.contains("seed")) {
      PQ_CHECK(calibration["seed"].is_number_unsigned(),
               "calibration.seed is not an unsigned integer");
      result.seed_ = calibration["seed"].get<std::uint64_t>();
    }
    if (calibration.contains("compute")) {
      result.compute_ = string_field(calibration, "compute", "calibration");
    }
    std::set<std::string> listed;
    for (const json& name : array_field(j, "files", "probe.json")) {
      PQ_CHECK(name.is_string(), "files: an entry is a {}, not a file name", name.type_name());
      const auto& file = name.get_ref<const std::string&>();
      PQ_CHECK(!file.empty() && file.find('/') == std::string::npos && file != "." &&
                   file != ".." && listed.insert(file).second,
               "files: {} is not a file name in the probe directory, or is listed twice",
               quoted_json_string(file));
      files.push_back(file);
    }
    for (const json& l : array_field(j, "linears", "probe.json")) {
      ProbedLinear linear;
      linear.name = string_field(l, "name", "a linear");
      const std::string where = "linear " + quoted_json_string(linear.name);
      linear.input_key = string_field(l, "input_key", where);
      const json& shape = array_field(l, "shape", where);
      PQ_CHECK(shape.size() == 2, "{}: \"shape\" is not [out, in]", where);
      linear.out_features = integer(shape[0], where + " out_features", 1, kMaxOutFeatures);
      linear.in_features = integer(shape[1], where + " in_features", 1, kMaxInFeatures);
      if (result.has_fisher_) {
        linear.fisher_trace = non_negative(field(l, "fisher_trace", where), where + " fisher_trace",
                                           std::numeric_limits<double>::max());
      }
      linear.tokens = integer(field(l, "tokens", where), where + " tokens", 0, kMaxCount);
      PQ_CHECK(result.linear_index_.emplace(linear.name, result.linears_.size()).second,
               "{} is listed twice", where);
      result.linears_.push_back(std::move(linear));
    }
    for (const json& i : array_field(j, "inputs", "probe.json")) {
      const std::string key = string_field(i, "key", "an input");
      const std::string where = "input " + quoted_json_string(key);
      PQ_CHECK(
          result.input_tokens_
              .emplace(key, integer(field(i, "tokens", where), where + " tokens", 0, kMaxCount))
              .second,
          "{} is listed twice", where);
      result.input_amax_.emplace(
          key, static_cast<float>(non_negative(field(i, "amax", where), where + " amax",
                                               std::numeric_limits<float>::max())));
      if (i.contains("holdout_tokens")) {
        const std::int64_t held =
            integer(field(i, "holdout_tokens", where), where + " holdout_tokens", 0, kMaxCount);
        PQ_CHECK(held <= result.input_tokens_.at(key), "{}: {} held-out tokens of {}", where, held,
                 result.input_tokens_.at(key));
        result.holdout_tokens_.emplace(key, held);
      }
    }
    for (const json& m : array_field(j, "moe", "probe.json")) {
      ProbedRouting routing;
      routing.layer = integer(field(m, "layer", "a moe entry"), "moe layer", 0, kMaxCount);
      const std::string where = fmt::format("moe layer {}", routing.layer);
      routing.top_k = integer(field(m, "top_k", where), where + " top_k", 0, kMaxCount);
      routing.tokens = integer(field(m, "tokens", where), where + " tokens", 0, kMaxCount);
      for (const json& count : array_field(m, "route_counts", where)) {
        routing.route_counts.push_back(integer(count, where + " route count", 0, kMaxCount));
      }
      for (const json& p : array_field(m, "mean_probability", where)) {
        routing.mean_probability.push_back(non_negative(p, where + " mean probability", 1.0));
      }
      PQ_CHECK(routing.route_counts.size() == routing.mean_probability.size(),
               "{}: {} route counts but {} mean probabilities", where, routing.route_counts.size(),
               routing.mean_probability.size());
      result.routing_.push_back(std::move(routing));
    }
    if (j.contains("kv_cache")) {
      result.kv_cache_.emplace();
      for (const json& k : array_field(j, "kv_cache", "probe.json")) {
        ProbedKvCache kv;
        kv.layer = integer(field(k, "layer", "a kv_cache entry"), "kv_cache layer", 0, kMaxCount);
        const std::string where = fmt::format("kv_cache layer {}", kv.layer);
        PQ_CHECK(result.kv_cache_->empty() || result.kv_cache_->back().layer < kv.layer,
                 "{} is out of order or listed twice", where);
        kv.tokens = integer(field(k, "tokens", where), where + " tokens", 0, kMaxCount);
        kv.key_amax = static_cast<float>(non_negative(
            field(k, "key_amax", where), where + " key_amax", std::numeric_limits<float>::max()));
        kv.value_amax =
            static_cast<float>(non_negative(field(k, "value_amax", where), where + " value_amax",
                                            std::numeric_limits<float>::max()));
        result.kv_cache_->push_back(kv);
      }
    }
  } catch (const Error& e) {
    fail("{}: {}", json_path.string(), e.what());
  }
  for (const std::string& name : files) {
    auto file = std::make_unique<io::SafetensorsFile>(probe_dir / name);
    for (const io::TensorInfo& info : file->tensors()) {
      if (info.name.starts_with("hessian.") || info.name.starts_with("holdout_hessian.") ||
          info.name.starts_with("act_second_moment.")) {
        PQ_CHECK(result.tensor_file_.emplace(info.name, result.tensors_.size()).second,
                 "{}: tensor {} is in two of the probe's files", json_path.string(),
                 quoted_json_string(info.name));
      }
    }
    result.tensors_.push_back(std::move(file));
  }
  // What the stages read for each Linear: its input's Hessian [in, in], second moments [in],
  // token count and amax.
  for (const ProbedLinear& linear : result.linears_) {
    const auto in = static_cast<std::size_t>(linear.in_features);
    PQ_CHECK((!result.has_hessians_ || result.hessian(linear.input_key).size() == in * in) &&
                 result.act_second_moment(linear.input_key).size() == in,
             "{}: the statistics of input {} do not match {}'s input width {}", json_path.string(),
             quoted_json_string(linear.input_key), quoted_json_string(linear.name), in);
    PQ_CHECK(!result.holdout_tokens_.contains(linear.input_key) ||
                 result.holdout_hessian(linear.input_key).size() == in * in,
             "{}: the held-out Hessian of input {} does not match {}'s input width {}",
             json_path.string(), quoted_json_string(linear.input_key),
             quoted_json_string(linear.name), in);
    PQ_CHECK(result.input_tokens_.contains(linear.input_key),
             "{}: input {} of {} is not in \"inputs\"", json_path.string(),
             quoted_json_string(linear.input_key), quoted_json_string(linear.name));
  }
  return result;
}

const ProbedLinear& ProbeResult::linear(std::string_view name) const {
  const auto it = linear_index_.find(name);
  PQ_CHECK(it != linear_index_.end(), "{}: the probe did not measure Linear {}",
           (dir_ / kProbeJsonFile).string(), name);
  return linears_[it->second];
}

std::span<const float> ProbeResult::f32_tensor(const std::string& name) const {
  const auto found = tensor_file_.find(name);
  PQ_CHECK(found != tensor_file_.end(), "{}: no tensor {} in the probe's files",
           (dir_ / kProbeJsonFile).string(), quoted_json_string(name));
  const io::SafetensorsFile& file = *tensors_[found->second];
  const io::TensorView view = file.view(name);
  PQ_CHECK(view.info->dtype == io::DType::F32, "{}: tensor {} is not F32", file.path().string(),
           quoted_json_string(name));
  // The view points into the mapped file; the writer pads the header to 8 bytes, but a file
  // written otherwise could place the floats at any byte.
  PQ_CHECK(reinterpret_cast<std::uintptr_t>(view.bytes.data()) % alignof(float) == 0,
           "{}: tensor {} is not aligned to 4 bytes in the file", file.path().string(),
           quoted_json_string(name));
  return {reinterpret_cast<const float*>(view.bytes.data()), view.bytes.size() / sizeof(float)};
}

std::span<const float> ProbeResult::hessian(std::string_view input_key) const {
  if (!has_hessians_) return {};
  return f32_tensor("hessian." + std::string(input_key));
}

std::span<const float> ProbeResult::holdout_hessian(std::string_view input_key) const {
  if (!holdout_tokens_.contains(input_key)) return {};
  return f32_tensor("holdout_hessian." + std::string(input_key));
}

std::int64_t ProbeResult::holdout_tokens(std::string_view input_key) const {
  const auto it = holdout_tokens_.find(input_key);
  return it == holdout_tokens_.end() ? 0 : it->second;
}

std::span<const float> ProbeResult::act_second_moment(std::string_view input_key) const {
  return f32_tensor("act_second_moment." + std::string(input_key));
}

float ProbeResult::input_amax(std::string_view input_key) const {
  const auto it = input_amax_.find(input_key);
  PQ_CHECK(it != input_amax_.end(), "{}: no probed input {}", (dir_ / kProbeJsonFile).string(),
           input_key);
  return it->second;
}

std::int64_t ProbeResult::input_tokens(std::string_view input_key) const {
  const auto it = input_tokens_.find(input_key);
  PQ_CHECK(it != input_tokens_.end(), "{}: no probed input {}", (dir_ / kProbeJsonFile).string(),
           input_key);
  return it->second;
}

}  // namespace pq::probe
