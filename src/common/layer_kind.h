#pragma once

namespace pq {

// Where a Linear's weight lives in vLLM: the module class decides which quantization method runs
// (model::Linear::layer_kind says which a Linear is; formats/serving.h what vLLM does there).
enum class LayerKind {
  kLinear,       // RowParallel/ColumnParallelLinear of one checkpoint module (o_proj, down_proj)
  kFusedLinear,  // QKVParallelLinear / MergedColumnParallelLinear shards (q/k/v, gate/up)
  kMoeExperts,   // FusedMoE (RoutedExperts) expert weights
  kLmHead,       // ParallelLMHead
};

}  // namespace pq
