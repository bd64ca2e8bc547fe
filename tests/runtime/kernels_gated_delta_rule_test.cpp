#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "common/error.h"
#include "runtime/kernels/gated_delta_rule.h"

namespace pq::runtime {
namespace {

// The inputs of the core in one indexable set, so that checks can loop over them.
enum Input { kQ, kK, kV, kG, kBeta, kState, kInputCount };
constexpr std::array<const char*, kInputCount> kInputNames = {"q", "k", "v", "g", "beta", "state"};

template <typename T>
using InputSet = std::array<std::vector<T>, kInputCount>;

struct Case {
  std::string name;
  GatedDeltaShape shape;
  float min_g = -2.0f;  // g_t is drawn from [min_g, max_g]
  float max_g = -0.01f;
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.name;
}

// Inputs shaped as Qwen3.5 makes them: unit-norm k, unit-norm q scaled by dk^-1/2, beta a
// sigmoid, g <= 0, and a non-zero initial state (as when a sequence continues).
InputSet<float> random_inputs(const Case& c, std::uint32_t seed) {
  const GatedDeltaShape& s = c.shape;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> decay(c.min_g, c.max_g);
  auto unit_rows = [&](float scale) {
    std::vector<float> x(s.seq_len * s.num_key_heads * s.key_dim);
    for (std::size_t row = 0; row < x.size(); row += s.key_dim) {
      double sum_sq = 0;
      for (std::int64_t i = 0; i < s.key_dim; ++i) {
        x[row + i] = normal(rng);
        sum_sq += x[row + i] * x[row + i];
      }
      for (std::int64_t i = 0; i < s.key_dim; ++i) x[row + i] *= scale / std::sqrt(sum_sq);
    }
    return x;
  };
  InputSet<float> in;
  in[kQ] = unit_rows(1.0f / std::sqrt(static_cast<float>(s.key_dim)));
  in[kK] = unit_rows(1.0f);
  in[kV].resize(s.seq_len * s.num_value_heads * s.value_dim);
  for (float& e : in[kV]) e = normal(rng);
  in[kG].resize(s.seq_len * s.num_value_heads);
  for (float& e : in[kG]) e = decay(rng);
  in[kBeta].resize(s.seq_len * s.num_value_heads);
  for (float& e : in[kBeta]) e = 1.0f / (1.0f + std::exp(-normal(rng)));
  in[kState].resize(s.num_value_heads * s.key_dim * s.value_dim);
  for (float& e : in[kState]) e = 0.5f * normal(rng);
  return in;
}

GatedDeltaInputs view(const InputSet<float>& in) {
  return {in[kQ].data(), in[kK].data(),    in[kV].data(),
          in[kG].data(), in[kBeta].data(), in[kState].data()};
}

// The §4.2 recurrence in double, written independently of the kernels: o_t = S_t^T q_t with
// S_t = e^g_t S_{t-1} + k_t beta_t (v_t - (e^g_t S_{t-1})^T k_t)^T.
struct DoubleOutputs {
  std::vector<double> out, final_state;
};

DoubleOutputs reference_forward(const GatedDeltaShape& s, const InputSet<double>& in) {
  const std::int64_t T = s.seq_len, dk = s.key_dim, dv = s.value_dim, Hv = s.num_value_heads;
  const std::int64_t group = Hv / s.num_key_heads;
  DoubleOutputs r{std::vector<double>(T * Hv * dv), in[kState]};
  for (std::int64_t h = 0; h < Hv; ++h) {
    double* S = r.final_state.data() + h * dk * dv;
    const std::int64_t kh = h / group;
    for (std::int64_t t = 0; t < T; ++t) {
      const double* q = in[kQ].data() + (t * s.num_key_heads + kh) * dk;
      const double* k = in[kK].data() + (t * s.num_key_heads + kh) * dk;
      const double* v = in[kV].data() + (t * Hv + h) * dv;
      const double decay = std::exp(in[kG][t * Hv + h]), beta = in[kBeta][t * Hv + h];
      for (std::int64_t i = 0; i < dk * dv; ++i) S[i] *= decay;
      for (std::int64_t j = 0; j < dv; ++j) {
        double read = 0;
        for (std::int64_t i = 0; i < dk; ++i) read += S[i * dv + j] * k[i];
        const double u = beta * (v[j] - read);
        for (std::int64_t i = 0; i < dk; ++i) S[i * dv + j] += k[i] * u;
      }
      for (std::int64_t j = 0; j < dv; ++j) {
        double o = 0;
        for (std::int64_t i = 0; i < dk; ++i) o += S[i * dv + j] * q[i];
        r.out[(t * Hv + h) * dv + j] = o;
      }
    }
  }
  return r;
}

InputSet<double> widen(const InputSet<float>& in) {
  InputSet<double> out;
  for (int i = 0; i < kInputCount; ++i) out[i].assign(in[i].begin(), in[i].end());
  return out;
}

enum class Algorithm { kChunked, kRecurrent };

struct Outputs {
  std::vector<float> out, final_state;
};

Outputs run_forward(Algorithm a, const GatedDeltaShape& s, const InputSet<float>& in) {
  Outputs r{std::vector<float>(s.seq_len * s.num_value_heads * s.value_dim, NAN),
            std::vector<float>(in[kState].size(), NAN)};
  auto forward =
      a == Algorithm::kChunked ? gated_delta_rule_forward : gated_delta_rule_forward_recurrent;
  forward(s, view(in), r.out.data(), r.final_state.data());
  return r;
}

// The loss of every backward check: sum(o * dout) + sum(S_T * d_final).
struct LossWeights {
  std::vector<float> dout, d_final;
};

LossWeights random_loss_weights(const GatedDeltaShape& s, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  LossWeights w{std::vector<float>(s.seq_len * s.num_value_heads * s.value_dim),
                std::vector<float>(s.num_value_heads * s.key_dim * s.value_dim)};
  for (float& e : w.dout) e = normal(rng);
  for (float& e : w.d_final) e = normal(rng);
  return w;
}

InputSet<float> run_backward(Algorithm a, const GatedDeltaShape& s, const InputSet<float>& in,
                             const LossWeights& w) {
  InputSet<float> grads;
  for (int i = 0; i < kInputCount; ++i) grads[i].assign(in[i].size(), NAN);  // all overwritten
  auto backward =
      a == Algorithm::kChunked ? gated_delta_rule_backward : gated_delta_rule_backward_recurrent;
  backward(s, view(in), w.dout.data(), w.d_final.data(),
           {grads[kQ].data(), grads[kK].data(), grads[kV].data(), grads[kG].data(),
            grads[kBeta].data(), grads[kState].data()});
  return grads;
}

double loss(const GatedDeltaShape& s, const InputSet<double>& in, const LossWeights& w) {
  const DoubleOutputs r = reference_forward(s, in);
  double sum = 0;
  for (std::size_t i = 0; i < r.out.size(); ++i) sum += r.out[i] * w.dout[i];
  for (std::size_t i = 0; i < r.final_state.size(); ++i) sum += r.final_state[i] * w.d_final[i];
  return sum;
}

// max |got - want| / max(1, max |want|).
template <typename A, typename B>
double relative_error(const std::vector<A>& got, const std::vector<B>& want) {
  double worst = 0, scale = 1;
  for (std::size_t i = 0; i < want.size(); ++i) {
    worst = std::max(worst, std::abs(double(got[i]) - double(want[i])));
    scale = std::max(scale, std::abs(double(want[i])));
  }
  return worst / scale;
}

GatedDeltaShape shape(std::int64_t T, std::int64_t Hk, std::int64_t Hv, std::int64_t dk,
                      std::int64_t dv) {
  return {T, Hk, Hv, dk, dv};
}

class GatedDeltaRule : public ::testing::TestWithParam<Case> {};

TEST_P(GatedDeltaRule, ForwardMatchesDoublePrecisionRecurrence) {
  const Case& c = GetParam();
  const InputSet<float> in = random_inputs(c, 7);
  const DoubleOutputs want = reference_forward(c.shape, widen(in));
  for (const Algorithm a : {Algorithm::kRecurrent, Algorithm::kChunked}) {
    const Outputs got = run_forward(a, c.shape, in);
    const char* name = a == Algorithm::kChunked ? "chunked" : "recurrent";
    EXPECT_LT(relative_error(got.out, want.out), 1e-5) << name;
    EXPECT_LT(relative_error(got.final_state, want.final_state), 1e-5) << name;
  }
}

TEST_P(GatedDeltaRule, ChunkedBackwardMatchesRecurrentBackward) {
  const Case& c = GetParam();
  const InputSet<float> in = random_inputs(c, 8);
  const LossWeights w = random_loss_weights(c.shape, 9);
  const InputSet<float> recurrent = run_backward(Algorithm::kRecurrent, c.shape, in, w);
  const InputSet<float> chunked = run_backward(Algorithm::kChunked, c.shape, in, w);
  for (int i = 0; i < kInputCount; ++i)
    EXPECT_LT(relative_error(chunked[i], recurrent[i]), 2e-5) << kInputNames[i];
}

// Directional derivatives: for a random direction x' of each input, sum(grad * x') against a
// central difference of the double-precision loss along x'.
TEST_P(GatedDeltaRule, BackwardMatchesFiniteDifferences) {
  const Case& c = GetParam();
  const InputSet<float> in = random_inputs(c, 10);
  const LossWeights w = random_loss_weights(c.shape, 11);
  std::mt19937 rng(12);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (const Algorithm a : {Algorithm::kRecurrent, Algorithm::kChunked}) {
    const InputSet<float> grads = run_backward(a, c.shape, in, w);
    for (int i = 0; i < kInputCount; ++i) {
      InputSet<double> x = widen(in);
      std::vector<double> direction(x[i].size());
      for (double& e : direction) e = normal(rng);
      double predicted = 0, magnitude = 0;
      for (std::size_t j = 0; j < direction.size(); ++j) {
        predicted += grads[i][j] * direction[j];
        magnitude += std::abs(grads[i][j] * direction[j]);
      }
      const double eps = 1e-6;
      const std::vector<double> base = x[i];
      for (std::size_t j = 0; j < base.size(); ++j) x[i][j] = base[j] + eps * direction[j];
      const double up = loss(c.shape, x, w);
      for (std::size_t j = 0; j < base.size(); ++j) x[i][j] = base[j] - eps * direction[j];
      const double down = loss(c.shape, x, w);
      const double finite_difference = (up - down) / (2 * eps);
      EXPECT_NEAR(predicted, finite_difference, 1e-5 * std::max(1.0, magnitude))
          << kInputNames[i] << (a == Algorithm::kChunked ? " chunked" : " recurrent");
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, GatedDeltaRule,
    ::testing::Values(Case{"one_token", shape(1, 1, 1, 8, 8)},
                      Case{"chunk_less_one", shape(63, 2, 4, 16, 8)},
                      Case{"one_chunk", shape(64, 1, 2, 8, 24)},
                      Case{"chunk_plus_one", shape(65, 2, 4, 32, 16)},
                      Case{"four_chunks_gqa3", shape(200, 1, 3, 16, 16)},
                      Case{"head_dim_128", shape(130, 1, 2, 128, 128)},
                      // No decay: the state keeps everything, the delta rule alone bounds it.
                      Case{"no_decay", shape(150, 1, 2, 16, 16), 0.0f, 0.0f},
                      // e^gamma underflows to 0 within a chunk (gamma below -104).
                      Case{"strong_decay", shape(100, 1, 2, 8, 8), -12.0f, -4.0f}),
    [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

// Element by element on a small problem that crosses a chunk boundary.
TEST(GatedDeltaRuleBackward, EveryElementMatchesFiniteDifferences) {
  const Case c{"small", shape(70, 1, 2, 4, 3)};
  const InputSet<float> in = random_inputs(c, 13);
  const LossWeights w = random_loss_weights(c.shape, 14);
  for (const Algorithm a : {Algorithm::kRecurrent, Algorithm::kChunked}) {
    const InputSet<float> grads = run_backward(a, c.shape, in, w);
    InputSet<double> x = widen(in);
    for (int i = 0; i < kInputCount; ++i) {
      for (std::size_t j = 0; j < x[i].size(); ++j) {
        const double saved = x[i][j], eps = 1e-6;
        x[i][j] = saved + eps;
        const double up = loss(c.shape, x, w);
        x[i][j] = saved - eps;
        const double down = loss(c.shape, x, w);
        x[i][j] = saved;
        const double want = (up - down) / (2 * eps);
        ASSERT_NEAR(grads[i][j], want, 2e-5 * std::max(1.0, std::abs(want)))
            << kInputNames[i] << "[" << j << "]"
            << (a == Algorithm::kChunked ? " chunked" : " recurrent");
      }
    }
  }
}

// A zero initial state and no final-state gradient (nullptr) mean the same as explicit zeros.
TEST(GatedDeltaRule, NullStatesAreZeros) {
  const Case c{"nulls", shape(90, 1, 2, 8, 8)};
  InputSet<float> in = random_inputs(c, 15);
  LossWeights w = random_loss_weights(c.shape, 16);
  for (const Algorithm a : {Algorithm::kRecurrent, Algorithm::kChunked}) {
    const auto forward =
        a == Algorithm::kChunked ? gated_delta_rule_forward : gated_delta_rule_forward_recurrent;
    const auto backward =
        a == Algorithm::kChunked ? gated_delta_rule_backward : gated_delta_rule_backward_recurrent;
    GatedDeltaInputs no_state = view(in);
    no_state.initial_state = nullptr;
    std::vector<float> out(w.dout.size());
    forward(c.shape, no_state, out.data(), nullptr);
    InputSet<float> grads;
    for (int i = 0; i < kInputCount; ++i) grads[i].assign(in[i].size(), NAN);
    backward(c.shape, no_state, w.dout.data(), nullptr,
             {grads[kQ].data(), grads[kK].data(), grads[kV].data(), grads[kG].data(),
              grads[kBeta].data(), nullptr});

    std::fill(in[kState].begin(), in[kState].end(), 0.0f);
    std::fill(w.d_final.begin(), w.d_final.end(), 0.0f);
    const Outputs want_out = run_forward(a, c.shape, in);
    const InputSet<float> want = run_backward(a, c.shape, in, w);
    EXPECT_EQ(out, want_out.out);
    for (int i = 0; i < kState; ++i) EXPECT_EQ(grads[i], want[i]) << kInputNames[i];
    EXPECT_TRUE(std::all_of(grads[kState].begin(), grads[kState].end(),
                            [](float e) { return std::isnan(e); }));
  }
}

// With no tokens the state passes through, and so does its gradient.
TEST(GatedDeltaRule, EmptySequencePassesTheStateThrough) {
  const Case c{"empty", shape(0, 1, 2, 8, 4)};
  const InputSet<float> in = random_inputs(c, 17);
  const LossWeights w = random_loss_weights(c.shape, 18);
  for (const Algorithm a : {Algorithm::kRecurrent, Algorithm::kChunked}) {
    EXPECT_EQ(run_forward(a, c.shape, in).final_state, in[kState]);
    EXPECT_EQ(run_backward(a, c.shape, in, w)[kState], w.d_final);
  }
}

TEST(GatedDeltaRule, RejectsValueHeadsNotAMultipleOfKeyHeads) {
  const GatedDeltaShape s = shape(4, 2, 3, 8, 8);
  std::vector<float> x(4 * 3 * 8);
  const GatedDeltaInputs in{x.data(), x.data(), x.data(), x.data(), x.data()};
  EXPECT_THROW(gated_delta_rule_forward(s, in, x.data(), nullptr), pq::Error);
  EXPECT_THROW(gated_delta_rule_forward_recurrent(s, in, x.data(), nullptr), pq::Error);
}

}  // namespace
}  // namespace pq::runtime
