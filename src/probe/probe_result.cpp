#include "probe/probe_result.h"

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/json_reader.h"

namespace pq::probe {

ProbeResult ProbeResult::read(const std::filesystem::path& probe_dir) {
  const std::filesystem::path json_path = probe_dir / kProbeJsonFile;
  PQ_CHECK(std::filesystem::exists(json_path), "{}: no probe.json (run `prismaquant probe`)",
           probe_dir.string());
  ProbeResult result;
  result.dir_ = probe_dir;
  std::vector<std::string> files;
  try {
    const auto j = read_json_file(json_path);
    PQ_CHECK(j.at("schema").get<std::string>() == kProbeSchema, "schema is not {}", kProbeSchema);
    result.model_ = j.at("model").get<std::string>();
    result.fingerprint_ = j.at("fingerprint").get<std::string>();
    result.sequences_ = j.at("calibration").at("sequences").get<std::int64_t>();
    files = j.at("files").get<std::vector<std::string>>();
    for (const std::string& name : files) {
      PQ_CHECK(!name.empty() && name.find('/') == std::string::npos && name != "." && name != "..",
               "files: \"{}\" is not a file name in the probe directory", name);
    }
    for (const auto& l : j.at("linears")) {
      ProbedLinear linear;
      linear.name = l.at("name").get<std::string>();
      linear.input_key = l.at("input_key").get<std::string>();
      linear.out_features = l.at("shape").at(0).get<std::int64_t>();
      linear.in_features = l.at("shape").at(1).get<std::int64_t>();
      linear.fisher_trace = l.at("fisher_trace").get<double>();
      linear.tokens = l.at("tokens").get<std::int64_t>();
      result.linear_index_.emplace(linear.name, result.linears_.size());
      result.linears_.push_back(std::move(linear));
    }
    for (const auto& i : j.at("inputs")) {
      const std::string key = i.at("key").get<std::string>();
      result.input_tokens_.emplace(key, i.at("tokens").get<std::int64_t>());
      result.input_amax_.emplace(key, i.at("amax").get<float>());
    }
    for (const auto& m : j.at("moe")) {
      ProbedRouting routing;
      routing.layer = m.at("layer").get<std::int64_t>();
      routing.top_k = m.at("top_k").get<std::int64_t>();
      routing.tokens = m.at("tokens").get<std::int64_t>();
      routing.route_counts = m.at("route_counts").get<std::vector<std::int64_t>>();
      routing.mean_probability = m.at("mean_probability").get<std::vector<double>>();
      result.routing_.push_back(std::move(routing));
    }
  } catch (const nlohmann::json::exception& e) {
    fail("{}: malformed probe.json: {}", json_path.string(), e.what());
  } catch (const Error& e) {
    fail("{}: {}", json_path.string(), e.what());
  }
  for (const std::string& name : files) {
    auto file = std::make_unique<io::SafetensorsFile>(probe_dir / name);
    for (const io::TensorInfo& info : file->tensors()) {
      if (info.name.starts_with("hessian.") || info.name.starts_with("act_second_moment.")) {
        result.tensor_file_.emplace(info.name, result.tensors_.size());
      }
    }
    result.tensors_.push_back(std::move(file));
  }
  for (const ProbedLinear& linear : result.linears_) {
    PQ_CHECK(result.hessian(linear.input_key).size() ==
                 static_cast<std::size_t>(linear.in_features * linear.in_features),
             "{}: the Hessian of {} does not match {}'s input width {}", json_path.string(),
             linear.input_key, linear.name, linear.in_features);
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
           (dir_ / kProbeJsonFile).string(), name);
  const io::SafetensorsFile& file = *tensors_[found->second];
  const io::TensorInfo* info = file.find(name);
  PQ_CHECK(info->dtype == io::DType::F32, "{}: tensor {} is not F32", file.path().string(), name);
  const io::TensorView view = file.view(name);
  return {reinterpret_cast<const float*>(view.bytes.data()), view.bytes.size() / sizeof(float)};
}

std::span<const float> ProbeResult::hessian(std::string_view input_key) const {
  return f32_tensor("hessian." + std::string(input_key));
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
