#include "runtime/ops.h"

#include <algorithm>
#include <cmath>

#include "runtime/kernels/vector_math.h"

namespace pq::runtime {

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
  sigmoid({gate, static_cast<std::size_t>(n)}, {act, static_cast<std::size_t>(n)});
#pragma omp parallel for if (n > kParallelElements)
  for (std::int64_t i = 0; i < n; ++i) act[i] = gate[i] * act[i] * up[i];
}

void swiglu_backward(const float* gate, const float* up, const float* dact, std::int64_t n,
                     float* dgate, float* dup) {
  // silu'(g) = s + g s (1 - s), s = sigmoid(g); dgate holds s until it is overwritten.
  sigmoid({gate, static_cast<std::size_t>(n)}, {dgate, static_cast<std::size_t>(n)});
#pragma omp parallel for if (n > kParallelElements)
  for (std::int64_t i = 0; i < n; ++i) {
    const float s = dgate[i];
    const float silu = gate[i] * s;
    dgate[i] = dact[i] * up[i] * (s + gate[i] * s * (1.0f - s));
    dup[i] = dact[i] * silu;
  }
}

namespace {

// gelu_pytorch_tanh and its derivative ½(1 + t) + ½ g (1 − t²) √(2/π) (1 + 3·0.044715 g²),
// t = tanh(√(2/π)(g + 0.044715 g³)) (gemma4-architecture-facts.md §5).
constexpr double kGeluCubic = 0.044715;
const double kSqrtTwoOverPi = std::sqrt(2.0 / 3.14159265358979323846);

float gelu_tanh(float g) {
  const double x = g;
  return static_cast<float>(0.5 * x *
                            (1.0 + std::tanh(kSqrtTwoOverPi * (x + kGeluCubic * x * x * x))));
}

float gelu_tanh_derivative(float g) {
  const double x = g;
  const double t = std::tanh(kSqrtTwoOverPi * (x + kGeluCubic * x * x * x));
  return static_cast<float>(0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * kSqrtTwoOverPi *
                                                  (1.0 + 3.0 * kGeluCubic * x * x));
}

}  // namespace

void geglu_forward(const float* gate, const float* up, std::int64_t n, float* act) {
#pragma omp parallel for if (n > kParallelElements)
  for (std::int64_t i = 0; i < n; ++i) act[i] = gelu_tanh(gate[i]) * up[i];
}

void geglu_backward(const float* gate, const float* up, const float* dact, std::int64_t n,
                    float* dgate, float* dup) {
#pragma omp parallel for if (n > kParallelElements)
  for (std::int64_t i = 0; i < n; ++i) {
    dgate[i] = dact[i] * up[i] * gelu_tanh_derivative(gate[i]);
    dup[i] = dact[i] * gelu_tanh(gate[i]);
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
    const double sum = exp_shifted_sum({z, static_cast<std::size_t>(vocab)}, max_logit);
    const float w = weights[r];
    loss += w * (std::log(sum) + max_logit - target_logit);
    const float scale = static_cast<float>(w / sum);
    for (std::int64_t i = 0; i < vocab; ++i) z[i] *= scale;
    z[targets[r]] -= w;
  }
  return loss;
}

}  // namespace pq::runtime
