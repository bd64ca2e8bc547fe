#pragma once

#include <cstdint>

namespace pq::runtime {

// The two norms inside a Gated DeltaNet block (qwen3_5-architecture-facts.md §3.2, §3.3), each
// over `width`-wide rows of a row-major [rows, width] array: a [T, heads * dim] activation is
// [T * heads, dim]. fp32 throughout, as the core (§11 point 2).

// L2 norm of q and k (§3.3): y = scale * x / sqrt(sum x^2 + eps). With eps = 1e-6 and scale =
// dk^-1/2 for q, 1 for k, y is what gated_delta_rule_forward takes (§4.2 step 7: the scale
// comes after the norm).
void l2_normalize_forward(const float* x, std::int64_t rows, std::int64_t width, float eps,
                          float scale, float* y);
// dx = scale * r * (dy - (dy . n) n) with r = 1 / sqrt(sum x^2 + eps) and n = r x, recomputed
// from x. dx is overwritten.
void l2_normalize_backward(const float* x, const float* dy, std::int64_t rows, std::int64_t width,
                           float eps, float scale, float* dx);

// linear_attn.norm (§3.2): y = weight * (x * rsqrt(mean(x^2) + eps)) * SiLU(gate), normalised
// before the gate. Not zero-centred: weight is used as stored (initialised to ones). x and gate
// are [rows, width] (per value head: width = dv, one weight for every head); rstd [rows] receives
// 1 / rms for the backward.
void gated_rms_norm_forward(const float* x, const float* gate, const float* weight,
                            std::int64_t rows, std::int64_t width, float eps, float* y,
                            float* rstd);
// dx and dgate (overwritten) given dy, with x_hat = x * rstd, s = SiLU(gate) and g = dy * weight
// * s: dgate = dy * weight * x_hat * SiLU'(gate), dx = rstd * (g - x_hat * mean(g * x_hat)).
// The weight's own gradient is not computed: norm weights are not quantized.
void gated_rms_norm_backward(const float* x, const float* gate, const float* weight,
                             const float* rstd, const float* dy, std::int64_t rows,
                             std::int64_t width, float* dx, float* dgate);

}  // namespace pq::runtime
