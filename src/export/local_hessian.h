#pragma once

#include <optional>
#include <span>

#include "export/gptq.h"
#include "formats/weight_format.h"

namespace pq::exporter {

struct LocalHessianOptions {
  // Added to the diagonal of every group's Hessian block, as a fraction of mean(diag H) (GPTQ's
  // damping): inputs calibration never saw (H_jj == 0) then still weigh their weight error, and
  // ties between scales go to the smaller weight error.
  double damp = 0.01;
  // NVFP4: the E4M3 scale bytes tried are those within this many bytes of the round-to-nearest
  // byte (8 bytes are one binade); 0 tries every byte from the layout's smallest allowed scale
  // (ScaleSpec::min_e4m3_scale) to 0x7E.
  int e4m3_bracket = 0;
  // MX: the E8M0 exponents tried are the round-to-nearest one plus or minus this many.
  int e8m0_bracket = 2;
};

// Whether local_hessian_round renders the layout: one scale per row and group, stored as E4M3
// over a global (NVFP4) or as E8M0 (MX).
bool local_hessian_applies(const formats::GroupLayout& layout);

// The objective the render minimises for one group: d^T B d with d = dequantized - x over the
// group's elements and B its [n, n] block of the (damped) Hessian, row-major and symmetric (a
// SIMD path reads its columns as rows; both give the same bits).
double local_hessian_objective(std::span<const float> x, std::span<const float> dequantized,
                               std::span<const double> block);

// Local-Hessian rendering: for every (row, group) of row-major w [out, in], the scale among the
// candidates (LocalHessianOptions) whose round-to-nearest codes minimise
// local_hessian_objective with the group's diagonal block of H + damp * mean(diag H) * I, the
// cross-group terms of the output error ignored. A candidate replaces the round-to-nearest
// scale only if strictly lower, so no group is worse than round-to-nearest in that objective.
// Codes are round-to-nearest under the chosen scale, as quantize_rows gives them. Returns nullopt
// when the layout is not one local_hessian_applies to or H holds Inf/NaN. Throws pq::Error for a
// non-finite weight or statistics that do not fit the shape. Rows run in parallel (OpenMP); the
// result does not depend on the thread count. GroupedWeight::output_error is the undamped
// tr(dW H dW^T) of the result.
std::optional<GroupedWeight> local_hessian_round(std::span<const float> w, formats::Shape2D shape,
                                                 const formats::GroupLayout& layout,
                                                 const CalibrationStatistics& stats,
                                                 const LocalHessianOptions& options = {});

}  // namespace pq::exporter
