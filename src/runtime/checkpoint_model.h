#pragma once

#include <filesystem>

#include "io/safetensors.h"
#include "model/config.h"
#include "runtime/model.h"
#include "runtime/weights.h"

namespace pq::runtime {

// A Model over a checkpoint directory (config.json + safetensors), owning the memory map it
// streams from.
class CheckpointModel {
 public:
  explicit CheckpointModel(const std::filesystem::path& directory, RuntimeOptions options = {})
      : checkpoint_(io::Checkpoint::open(directory)),
        weights_(checkpoint_),
        model_(model::ModelConfig::load(directory), weights_, options) {}

  Model& model() { return model_; }
  const io::Checkpoint& checkpoint() const { return checkpoint_; }

 private:
  io::Checkpoint checkpoint_;
  CheckpointWeightSource weights_;
  Model model_;
};

}  // namespace pq::runtime
