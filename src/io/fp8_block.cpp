#include "io/fp8_block.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <numeric>

#include "common/error.h"
#include "io/dtype.h"

namespace pq::io {

namespace {

std::int64_t ceil_div(std::int64_t a, std::int64_t b) {
  return (a + b - 1) / b;
}

// The block scales of a block-scaled FP8 weight [rows, columns] as float32, checked against the
// weight's shape.
std::vector<float> block_scales(const Checkpoint& checkpoint, std::string_view weight,
                                std::int64_t rows, std::int64_t columns) {
  const std::string scale_name = fp8_block_scale_name(weight);
  PQ_CHECK(checkpoint.contains(scale_name),
           "{}: tensor {} is F8_E4M3 without its block scale {} (only 128x128 block-scaled FP8 "
           "weights are read)",
           checkpoint.directory().string(), weight, scale_name);
  const TensorInfo& info = checkpoint.info(scale_name);
  PQ_CHECK(info.dtype == DType::F32 || info.dtype == DType::BF16,
           "{}: block scale {} has dtype {}, expected F32 or BF16", checkpoint.directory().string(),
           scale_name, dtype_name(info.dtype));
  const std::vector<std::int64_t> expected = {ceil_div(rows, kFp8BlockSize),
                                              ceil_div(columns, kFp8BlockSize)};
  PQ_CHECK(info.shape == expected,
           "{}: block scale {} has shape [{}], expected [{}] for a [{}, {}] weight in 128x128 "
           "blocks",
           checkpoint.directory().string(), scale_name, fmt::join(info.shape, ", "),
           fmt::join(expected, ", "), rows, columns);
  return checkpoint.to_f32(scale_name);
}

}  // namespace

std::string fp8_block_scale_name(std::string_view weight) {
  return std::string(weight) + "_scale_inv";
}

bool is_fp8_block_weight(const Checkpoint& checkpoint, std::string_view name) {
  return checkpoint.info(name).dtype == DType::F8_E4M3 &&
         checkpoint.contains(fp8_block_scale_name(name));
}

std::vector<float> decode_weight_rows(const Checkpoint& checkpoint, std::string_view name,
                                      std::span<const std::int64_t> rows) {
  const TensorView view = checkpoint.view(name);
  const TensorInfo& info = *view.info;
  PQ_CHECK(dtype_is_float(info.dtype), "{}: tensor {} has dtype {}, expected a float type",
           checkpoint.directory().string(), name, dtype_name(info.dtype));
  PQ_CHECK(info.shape.size() >= 2, "{}: rows requested from the {}-D tensor {}",
           checkpoint.directory().string(), info.shape.size(), name);
  const std::int64_t count = std::accumulate(info.shape.begin(), info.shape.end() - 1,
                                             std::int64_t{1}, std::multiplies<>());
  const std::int64_t columns = info.shape.back();
  for (const std::int64_t r : rows) {
    PQ_CHECK(r >= 0 && r < count, "{}: tensor {}: row {} outside [0, {})",
             checkpoint.directory().string(), name, r, count);
  }
  std::vector<float> scales;
  if (info.dtype == DType::F8_E4M3) {
    PQ_CHECK(info.shape.size() == 2,
             "{}: F8_E4M3 tensor {} has {} dimensions; block-scaled FP8 "
             "weights are matrices",
             checkpoint.directory().string(), name, info.shape.size());
    scales = block_scales(checkpoint, name, count, columns);
  }
  const std::size_t row_bytes = static_cast<std::size_t>(columns) * dtype_size(info.dtype);
  const std::int64_t column_blocks = ceil_div(columns, kFp8BlockSize);
  std::vector<float> out(rows.size() * static_cast<std::size_t>(columns));
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const std::span<float> row(out.data() + i * columns, static_cast<std::size_t>(columns));
    decode_to_f32(info.dtype,
                  view.bytes.subspan(static_cast<std::size_t>(rows[i]) * row_bytes, row_bytes),
                  row);
    if (scales.empty()) continue;
    const float* block_row = scales.data() + (rows[i] / kFp8BlockSize) * column_blocks;
    for (std::int64_t c = 0; c < columns; ++c) row[c] *= block_row[c / kFp8BlockSize];
  }
  return out;
}

std::vector<float> decode_weight(const Checkpoint& checkpoint, std::string_view name) {
  const TensorInfo& info = checkpoint.info(name);
  if (info.dtype != DType::F8_E4M3) return checkpoint.to_f32(name);
  std::vector<std::int64_t> rows(static_cast<std::size_t>(info.shape.empty() ? 0 : info.shape[0]));
  std::iota(rows.begin(), rows.end(), std::int64_t{0});
  return decode_weight_rows(checkpoint, name, rows);
}

}  // namespace pq::io
