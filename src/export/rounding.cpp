// Plain round-to-nearest encoding of one Linear.
#include "export/rounding.h"

namespace pq::exporter {

formats::EncodedWeight NearestRounding::encode(const LinearToEncode& job) const {
  return job.format.quantize(job.weight, job.shape, job.options);
}

std::string NearestRounding::describe(const std::map<std::string, std::string>&) const {
  return "Every quantized Linear is rounded to nearest with its format's own scale rule.";
}

nlohmann::json NearestRounding::report(const std::map<std::string, std::string>&) const {
  return {{"strategy", name()}, {"linears", nlohmann::json::array()}};
}

}  // namespace pq::exporter
