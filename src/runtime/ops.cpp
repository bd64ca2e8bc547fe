#include "runtime/ops.h"

#include <algorithm>
#include <cmath>

namespace pq::runtime {

namespace {

float sigmoid(float v) {
  return 1.0f / (1.0f + std::exp(-v));
}
}  // namespace

void rms_norm_forward(const float* x, const float* weight, std::int64_t rows, std::int64_t width,
                      float eps, float* y, float* rstd) {
#pragma omp parallel for if (rows * width > kParallelElements)
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * width;
    float* yr = y + r * width;
    double sum_sq = 0.0;
    for (std::int64_t i = 0; i < width; ++i) sum_sq += static_cast<double>(xr[i]) * xr[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(sum_sq / width + eps));
    rstd[r] = inv;
    for (std::int64_t i = 0; i < width; ++i) yr[i] = xr[i] * inv * weight[i];
  }
}

void rms_norm_backward(const float* x, const float* weight, const float* rstd, const float* dy,
                       std::int64_t rows, std::int64_t width, float* dx, bool accumulate) {
#pragma omp parallel for if (rows * width > kParallelElements)
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * width;
    const float* dyr = dy + r * width;
    float* dxr = dx + r * width;
    const float inv = rstd[r];
    double dot = 0.0;  // sum_i x_hat_i * w_i * dy_i
    for (std::int64_t i = 0; i < width; ++i) {
      dot += static_cast<double>(xr[i]) * inv * weight[i] * dyr[i];
    }
    const float mean_dot = static_cast<float>(dot / width);
    for (std::int64_t i = 0; i < width; ++i) {
      const float x_hat = xr[i] * inv;
      const float g = inv * (weight[i] * dyr[i] - x_hat * mean_dot);
      dxr[i] = accumulate ? dxr[i] + g : g;
    }
  }
}

void swiglu_forward(const float* gate, const float* up, std::int64_t n, float* act) {
#pragma omp parallel for if (n > kParallelElements)
  for (std::int64_t i = 0; i < n; ++i) act[i] = gate[i] * sigmoid(gate[i]) * up[i];
}

void swiglu_backward(const float* gate, const float* up, const float* dact, std::int64_t n,
                     float* dgate, float* dup) {
  // silu'(g) = s + g s (1 - s), s = sigmoid(g)
#pragma omp parallel for if (n > kParallelElements)
  for (std::int64_t i = 0; i < n; ++i) {
    const float s = sigmoid(gate[i]);
    const float silu = gate[i] * s;
    dgate[i] = dact[i] * up[i] * (s + gate[i] * s * (1.0f - s));
    dup[i] = dact[i] * silu;
  }
}

void add_bias(float* y, const float* bias, std::int64_t rows, std::int64_t width) {
#pragma omp parallel for if (rows * width > kParallelElements)
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t i = 0; i < width; ++i) y[r * width + i] += bias[i];
  }
}

void add_inplace(float* y, const float* x, std::int64_t n) {
#pragma omp parallel for if (n > kParallelElements)
  for (std::int64_t i = 0; i < n; ++i) y[i] += x[i];
}

double cross_entropy_forward_backward(float* logits, const std::int32_t* targets,
                                      const float* weights, std::int64_t rows, std::int64_t vocab) {
  double loss = 0.0;
#pragma omp parallel for reduction(+ : loss) if (rows * vocab > kParallelElements)
  for (std::int64_t r = 0; r < rows; ++r) {
    float* z = logits + r * vocab;
    if (targets[r] < 0) {
      for (std::int64_t i = 0; i < vocab; ++i) z[i] = 0.0f;
      continue;
    }
    float max_logit = z[0];
    for (std::int64_t i = 1; i < vocab; ++i) max_logit = std::max(max_logit, z[i]);
    const float target_logit = z[targets[r]];
    // One exp per logit: z becomes exp(z - max), summed in double, then scaled to w * softmax.
    double sum = 0.0;
    for (std::int64_t i = 0; i < vocab; ++i) {
      z[i] = std::exp(z[i] - max_logit);
      sum += z[i];
    }
    const float w = weights[r];
    loss += w * (std::log(sum) + max_logit - target_logit);
    const float scale = static_cast<float>(w / sum);
    for (std::int64_t i = 0; i < vocab; ++i) z[i] *= scale;
    z[targets[r]] -= w;
  }
  return loss;
}

}  // namespace pq::runtime
