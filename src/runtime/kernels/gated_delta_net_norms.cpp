#include "runtime/kernels/gated_delta_net_norms.h"

#include <cmath>
#include <span>
#include <vector>

#include "common/error.h"
#include "runtime/kernels/vector_math.h"

namespace pq::runtime {
namespace {

// Arrays smaller than this run on one thread: waking the OpenMP team would cost more.
constexpr std::int64_t kParallelElements = 1 << 16;

void check_args(const char* what, std::int64_t rows, std::int64_t width) {
  PQ_CHECK(rows >= 0 && width > 0, "{}: invalid shape rows={} width={}", what, rows, width);
}

// 1 / sqrt(sum x^2 + eps) or 1 / sqrt(mean x^2 + eps) of one row, the sum in double as in
// rms_norm_forward (runtime/ops.cpp).
float inverse_norm(const float* x, std::int64_t width, double divisor, float eps) {
  double sum_sq = 0.0;
  for (std::int64_t i = 0; i < width; ++i) sum_sq += static_cast<double>(x[i]) * x[i];
  return static_cast<float>(1.0 / std::sqrt(sum_sq / divisor + eps));
}

}  // namespace

void l2_normalize_forward(const float* x, std::int64_t rows, std::int64_t width, float eps,
                          float scale, float* y) {
  check_args("l2_normalize_forward", rows, width);
#pragma omp parallel for if (rows * width > kParallelElements)
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* x_row = x + r * width;
    const float factor = scale * inverse_norm(x_row, width, 1.0, eps);
    for (std::int64_t i = 0; i < width; ++i) y[r * width + i] = factor * x_row[i];
  }
}

void l2_normalize_backward(const float* x, const float* dy, std::int64_t rows, std::int64_t width,
                           float eps, float scale, float* dx) {
  check_args("l2_normalize_backward", rows, width);
#pragma omp parallel for if (rows * width > kParallelElements)
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* x_row = x + r * width;
    const float* dy_row = dy + r * width;
    const float inv = inverse_norm(x_row, width, 1.0, eps);
    double dy_dot_n = 0.0;
    for (std::int64_t i = 0; i < width; ++i) dy_dot_n += static_cast<double>(dy_row[i]) * x_row[i];
    const float projection = static_cast<float>(dy_dot_n) * inv;
    for (std::int64_t i = 0; i < width; ++i)
      dx[r * width + i] = scale * inv * (dy_row[i] - projection * inv * x_row[i]);
  }
}

void gated_rms_norm_forward(const float* x, const float* gate, const float* weight,
                            std::int64_t rows, std::int64_t width, float eps, float* y,
                            float* rstd) {
  check_args("gated_rms_norm_forward", rows, width);
  const auto w = static_cast<std::size_t>(width);
#pragma omp parallel if (rows * width > kParallelElements)
  {
    std::vector<float> sig(w);
#pragma omp for
    for (std::int64_t r = 0; r < rows; ++r) {
      const float* x_row = x + r * width;
      const float* gate_row = gate + r * width;
      const float inv = inverse_norm(x_row, width, static_cast<double>(width), eps);
      rstd[r] = inv;
      sigmoid({gate_row, w}, sig);
      for (std::int64_t i = 0; i < width; ++i)
        y[r * width + i] = weight[i] * (x_row[i] * inv) * (gate_row[i] * sig[i]);
    }
  }
}

void gated_rms_norm_backward(const float* x, const float* gate, const float* weight,
                             const float* rstd, const float* dy, std::int64_t rows,
                             std::int64_t width, float* dx, float* dgate) {
  check_args("gated_rms_norm_backward", rows, width);
  const auto w = static_cast<std::size_t>(width);
#pragma omp parallel if (rows * width > kParallelElements)
  {
    std::vector<float> sig(w);
#pragma omp for
    for (std::int64_t r = 0; r < rows; ++r) {
      const float* x_row = x + r * width;
      const float* gate_row = gate + r * width;
      const float* dy_row = dy + r * width;
      const float inv = rstd[r];
      sigmoid({gate_row, w}, sig);
      double g_dot_x_hat = 0.0;
      for (std::int64_t i = 0; i < width; ++i) {
        const float s = sig[i], z = gate_row[i], x_hat = x_row[i] * inv;
        dgate[r * width + i] = dy_row[i] * weight[i] * x_hat * s * (1.0f + z * (1.0f - s));
        g_dot_x_hat += static_cast<double>(dy_row[i] * weight[i] * z * s) * x_hat;
      }
      const auto mean = static_cast<float>(g_dot_x_hat / width);
      for (std::int64_t i = 0; i < width; ++i) {
        const float g = dy_row[i] * weight[i] * gate_row[i] * sig[i];
        dx[r * width + i] = inv * (g - x_row[i] * inv * mean);
      }
    }
  }
}

}  // namespace pq::runtime
