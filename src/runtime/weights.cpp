#include "runtime/weights.h"

#include <numeric>

#include "common/error.h"

namespace pq::runtime {

std::vector<std::int64_t> CheckpointWeightSource::shape(std::string_view name) const {
  return checkpoint_.info(name).shape;
}

std::vector<float> CheckpointWeightSource::load_f32(std::string_view name) const {
  const io::TensorInfo& info = checkpoint_.info(name);
  PQ_CHECK(io::dtype_is_float(info.dtype), "{}: tensor {} has dtype {}, expected a float type",
           checkpoint_.directory().string(), name, io::dtype_name(info.dtype));
  return checkpoint_.to_f32(name);
}

void InMemoryWeightSource::set(std::string name, std::vector<std::int64_t> shape,
                               std::vector<float> values) {
  const std::int64_t numel =
      std::accumulate(shape.begin(), shape.end(), std::int64_t{1}, std::multiplies<>());
  PQ_CHECK(numel == static_cast<std::int64_t>(values.size()),
           "tensor {}: shape holds {} elements but {} values were given", name, numel,
           values.size());
  tensors_[std::move(name)] = Entry{std::move(shape), std::move(values)};
}

const InMemoryWeightSource::Entry& InMemoryWeightSource::entry(std::string_view name) const {
  const auto it = tensors_.find(name);
  PQ_CHECK(it != tensors_.end(), "in-memory weights: no tensor named {}", name);
  return it->second;
}

std::span<float> InMemoryWeightSource::mutable_values(std::string_view name) {
  return const_cast<Entry&>(entry(name)).values;
}

std::vector<std::string> InMemoryWeightSource::names() const {
  std::vector<std::string> out;
  for (const auto& [name, unused] : tensors_) out.push_back(name);
  return out;
}

bool InMemoryWeightSource::contains(std::string_view name) const {
  return tensors_.find(name) != tensors_.end();
}

std::vector<std::int64_t> InMemoryWeightSource::shape(std::string_view name) const {
  return entry(name).shape;
}

std::vector<float> InMemoryWeightSource::load_f32(std::string_view name) const {
  return entry(name).values;
}

}  // namespace pq::runtime
