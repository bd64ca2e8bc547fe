#pragma once

#include <cstdint>
#include <string>

#include "model/config.h"
#include "runtime/model.h"

namespace pq::runtime {

// Peak anonymous memory of a layer-major pass (docs/runtime.md "Streaming and memory"), by
// component, in bytes. An upper estimate from the config's shapes: what a run checks against
// --max-memory before it starts, so that it refuses with the figures instead of being killed.
struct PassMemory {
  std::int64_t layer_weights = 0;  // the largest decoded decoder layer
  std::int64_t head = 0;           // lm_head decoded, while the head runs
  std::int64_t tape = 0;           // one micro-batch's intermediates, forward and backward
  std::int64_t activations = 0;    // boundary activations held in memory
  std::int64_t logits = 0;         // one block of logits and its gradient
  std::int64_t statistics = 0;     // what an observer keeps (the probe: one layer's Hessians)

  // The decoder steps and the head step do not overlap: the peak is the larger of the two.
  std::int64_t peak() const;
  // "5.2 GiB (layer 0.8, tape 1.9, activations 1.0, statistics 0.8; head 2.5, logits 0.6)".
  std::string describe() const;
};

// A pass over `rows` tokens in micro-batches of `micro_batch_rows`, keeping `boundaries`
// [rows, hidden] float32 activations in memory, with the given compute type.
PassMemory estimate_pass_memory(const model::ModelConfig& config, std::int64_t rows,
                                std::int64_t micro_batch_rows, std::int64_t logits_block_rows,
                                std::int64_t boundaries, ComputeType compute);

// MemAvailable of /proc/meminfo in bytes (0 where it cannot be read).
std::int64_t available_memory_bytes();

// The limit a run checks its estimates against: `max_memory` when positive, else 80% of the
// available memory (the rest is the page cache the streamed checkpoint reads through).
std::int64_t memory_limit(std::int64_t max_memory);

// pq::Error naming `what`, the estimate and the limit when the estimate exceeds `limit` bytes.
void require_memory(const std::string& what, const PassMemory& estimate, std::int64_t limit);

}  // namespace pq::runtime
