// Plain round-to-nearest encoding of one Linear.
#include "export/rounding.h"

namespace pq::exporter {

formats::EncodedWeight NearestRounding::encode(const LinearToEncode& job) const {
  return job.format.quantize(job.weight, job.shape, job.options);
}

}  // namespace pq::exporter
