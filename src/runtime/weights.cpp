#include "runtime/weights.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <utility>

#include "common/error.h"
#include "io/fp8_block.h"
#include "runtime/kernels/gemm.h"

namespace pq::runtime {

std::vector<std::int64_t> CheckpointWeightSource::shape(std::string_view name) const {
  return checkpoint_.info(name).shape;
}

std::vector<float> CheckpointWeightSource::load_f32(std::string_view name) const {
  std::vector<float> values = io::decode_weight(checkpoint_, name);
  io::require_finite(values, fmt::format("tensor {}", name));
  return values;
}

std::vector<std::uint16_t> WeightSource::load_bf16(std::string_view name) const {
  const std::vector<float> values = load_f32(name);
  std::vector<std::uint16_t> rounded(values.size());
  convert_f32_to_bf16(values, rounded);
  return rounded;
}

std::vector<std::uint16_t> CheckpointWeightSource::load_bf16(std::string_view name) const {
  const io::TensorInfo& info = checkpoint_.info(name);
  if (info.dtype != io::DType::BF16) return WeightSource::load_bf16(name);
  const io::TensorView view = checkpoint_.view(name);
  std::vector<std::uint16_t> bits(static_cast<std::size_t>(info.numel()));
  std::memcpy(bits.data(), view.bytes.data(), bits.size() * sizeof(std::uint16_t));
  io::require_finite_bf16(bits, fmt::format("tensor {}", name));
  return bits;
}

void CheckpointWeightSource::release(std::string_view name) const {
  checkpoint_.release(name);
  const std::string scale = io::fp8_block_scale_name(name);
  if (checkpoint_.contains(scale)) checkpoint_.release(scale);
}

namespace {

// The [rows, columns] shape of a tensor of 2 or more dimensions seen as a matrix (its leading
// dimensions flattened into rows), checking that every requested row exists.
std::pair<std::int64_t, std::int64_t> checked_rows(std::string_view name,
                                                   const std::vector<std::int64_t>& shape,
                                                   std::span<const std::int64_t> rows) {
  PQ_CHECK(shape.size() >= 2, "tensor {}: rows requested from a {}-D tensor", name, shape.size());
  const std::int64_t count =
      std::accumulate(shape.begin(), shape.end() - 1, std::int64_t{1}, std::multiplies<>());
  for (const std::int64_t r : rows) {
    PQ_CHECK(r >= 0 && r < count, "tensor {}: row {} outside [0, {})", name, r, count);
  }
  return {count, shape.back()};
}

}  // namespace

std::vector<float> WeightSource::load_rows_f32(std::string_view name,
                                               std::span<const std::int64_t> rows) const {
  const auto [count, columns] = checked_rows(name, shape(name), rows);
  const std::vector<float> all = load_f32(name);
  std::vector<float> out(rows.size() * static_cast<std::size_t>(columns));
  for (std::size_t i = 0; i < rows.size(); ++i) {
    std::copy_n(all.data() + rows[i] * columns, columns, out.data() + i * columns);
  }
  return out;
}

std::vector<float> CheckpointWeightSource::load_rows_f32(std::string_view name,
                                                         std::span<const std::int64_t> rows) const {
  std::vector<float> out = io::decode_weight_rows(checkpoint_, name, rows);
  io::require_finite(out, fmt::format("tensor {} (rows looked up)", name));
  return out;
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
