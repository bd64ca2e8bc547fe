#include "runtime/kernels/causal_conv1d.h"

#include <algorithm>
#include <span>
#include <vector>

#include "common/error.h"
#include "runtime/kernels/vector_math.h"

namespace pq::runtime {
namespace {

// Tokens per task: the backward recomputes K - 1 rows past each block, a small share of 32.
constexpr std::int64_t kRowBlock = 32;
// Arrays smaller than this run on one thread: waking the OpenMP team would cost more.
constexpr std::int64_t kParallelElements = 1 << 16;

void check_args(const char* what, std::int64_t seq_len, std::int64_t channels,
                std::int64_t kernel_size) {
  PQ_CHECK(seq_len >= 0 && channels > 0 && kernel_size > 0,
           "{}: invalid shape T={} channels={} kernel_size={}", what, seq_len, channels,
           kernel_size);
}

// taps[j * channels + c] = weight[c * K + j]: each tap's weights contiguous across channels, so
// that a token's row is a sum of K elementwise products.
std::vector<float> taps_by_row(const float* weight, std::int64_t channels, std::int64_t K) {
  std::vector<float> taps(channels * K);
  for (std::int64_t c = 0; c < channels; ++c)
    for (std::int64_t j = 0; j < K; ++j) taps[j * channels + c] = weight[c * K + j];
  return taps;
}

// pre[c] = sum_j taps[j][c] * x[t - (K - 1) + j][c], skipping positions before the sequence.
void pre_activation(const float* x, const float* taps, std::int64_t t, std::int64_t channels,
                    std::int64_t K, float* pre) {
  std::fill_n(pre, channels, 0.0f);
  for (std::int64_t j = std::max<std::int64_t>(0, K - 1 - t); j < K; ++j) {
    const float* x_row = x + (t - (K - 1) + j) * channels;
    const float* tap = taps + j * channels;
    for (std::int64_t c = 0; c < channels; ++c) pre[c] += tap[c] * x_row[c];
  }
}

}  // namespace

void causal_conv1d_silu_forward(const float* x, const float* weight, std::int64_t seq_len,
                                std::int64_t channels, std::int64_t kernel_size, float* y) {
  check_args("causal_conv1d_silu_forward", seq_len, channels, kernel_size);
  const std::vector<float> taps = taps_by_row(weight, channels, kernel_size);
  const std::int64_t blocks = (seq_len + kRowBlock - 1) / kRowBlock;
  const auto width = static_cast<std::size_t>(channels);
#pragma omp parallel if (seq_len * channels > kParallelElements)
  {
    std::vector<float> sig(width);
#pragma omp for schedule(static)
    for (std::int64_t block = 0; block < blocks; ++block) {
      for (std::int64_t t = block * kRowBlock; t < std::min(seq_len, (block + 1) * kRowBlock);
           ++t) {
        float* y_row = y + t * channels;
        pre_activation(x, taps.data(), t, channels, kernel_size, y_row);
        sigmoid({y_row, width}, sig);
        for (std::int64_t c = 0; c < channels; ++c) y_row[c] *= sig[c];
      }
    }
  }
}

void causal_conv1d_silu_backward(const float* x, const float* weight, const float* dy,
                                 std::int64_t seq_len, std::int64_t channels,
                                 std::int64_t kernel_size, float* dx) {
  check_args("causal_conv1d_silu_backward", seq_len, channels, kernel_size);
  const std::vector<float> taps = taps_by_row(weight, channels, kernel_size);
  const std::int64_t K = kernel_size;
  const std::int64_t blocks = (seq_len + kRowBlock - 1) / kRowBlock;
  const auto width = static_cast<std::size_t>(channels);
#pragma omp parallel if (seq_len * channels > kParallelElements)
  {
    // d(pre-activation) of the block's tokens and the K - 1 after them, which reach back into it.
    std::vector<float> dpre((kRowBlock + K - 1) * width), pre(width), sig(width);
#pragma omp for schedule(static)
    for (std::int64_t block = 0; block < blocks; ++block) {
      const std::int64_t s0 = block * kRowBlock, s1 = std::min(seq_len, s0 + kRowBlock);
      const std::int64_t t_end = std::min(seq_len, s1 + K - 1);
      for (std::int64_t t = s0; t < t_end; ++t) {
        pre_activation(x, taps.data(), t, channels, K, pre.data());
        sigmoid(pre, sig);
        // SiLU'(z) = s (1 + z (1 - s)) with s = sigmoid(z).
        float* d = dpre.data() + (t - s0) * channels;
        for (std::int64_t c = 0; c < channels; ++c)
          d[c] = dy[t * channels + c] * sig[c] * (1.0f + pre[c] * (1.0f - sig[c]));
      }
      // x[s] meets tap j at token t = s + K - 1 - j.
      for (std::int64_t s = s0; s < s1; ++s) {
        float* dx_row = dx + s * channels;
        std::fill_n(dx_row, channels, 0.0f);
        for (std::int64_t j = 0; j < K; ++j) {
          const std::int64_t t = s + K - 1 - j;
          if (t >= t_end) continue;
          const float* tap = taps.data() + j * channels;
          const float* d = dpre.data() + (t - s0) * channels;
          for (std::int64_t c = 0; c < channels; ++c) dx_row[c] += tap[c] * d[c];
        }
      }
    }
  }
}

}  // namespace pq::runtime
