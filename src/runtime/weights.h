#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "io/safetensors.h"

namespace pq::runtime {

// Where the runtime gets its parameters: float32 values per Hugging Face tensor name. The runtime
// asks for one decoder layer's tensors at a time and releases them when the layer is done, so a
// source backed by a memory-mapped checkpoint keeps only one layer resident.
class WeightSource {
 public:
  virtual ~WeightSource() = default;
  virtual bool contains(std::string_view name) const = 0;
  virtual std::vector<std::int64_t> shape(std::string_view name) const = 0;
  // The tensor's values widened to float32; throws pq::Error naming the tensor if it is absent or
  // not a floating-point tensor.
  virtual std::vector<float> load_f32(std::string_view name) const = 0;
  // Rows `rows` of a floating-point tensor widened to float32, [rows.size(), columns], where a
  // tensor of more than 2 dimensions counts as [product of the leading ones, last]: an embedding
  // lookup decodes only the rows a batch uses, a packed expert tensor [E, R, in] only one
  // expert's slice. This default decodes the whole tensor.
  virtual std::vector<float> load_rows_f32(std::string_view name,
                                           std::span<const std::int64_t> rows) const;
  // The tensor rounded to bfloat16 (nearest even), as bf16 compute multiplies it. This default
  // rounds load_f32; a source that stores bfloat16 returns its bits without a float32 copy.
  virtual std::vector<std::uint16_t> load_bf16(std::string_view name) const;
  // Hint that the tensor will not be read again soon (drops mapped pages); a no-op by default.
  virtual void release(std::string_view name) const {}
};

// Reads tensors from a safetensors checkpoint, decoding the stored dtype exactly (io::DType);
// block-scaled FP8 weights come dequantized (io::decode_weight).
class CheckpointWeightSource final : public WeightSource {
 public:
  explicit CheckpointWeightSource(const io::Checkpoint& checkpoint) : checkpoint_(checkpoint) {}

  bool contains(std::string_view name) const override { return checkpoint_.contains(name); }
  std::vector<std::int64_t> shape(std::string_view name) const override;
  std::vector<float> load_f32(std::string_view name) const override;
  std::vector<float> load_rows_f32(std::string_view name,
                                   std::span<const std::int64_t> rows) const override;
  std::vector<std::uint16_t> load_bf16(std::string_view name) const override;
  void release(std::string_view name) const override;

 private:
  const io::Checkpoint& checkpoint_;
};

// Tensors held in memory: tests build tiny random models with it, and finite-difference checks
// perturb its values in place.
class InMemoryWeightSource final : public WeightSource {
 public:
  void set(std::string name, std::vector<std::int64_t> shape, std::vector<float> values);
  std::span<float> mutable_values(std::string_view name);
  std::vector<std::string> names() const;

  bool contains(std::string_view name) const override;
  std::vector<std::int64_t> shape(std::string_view name) const override;
  std::vector<float> load_f32(std::string_view name) const override;

 private:
  struct Entry {
    std::vector<std::int64_t> shape;
    std::vector<float> values;
  };
  const Entry& entry(std::string_view name) const;
  std::map<std::string, Entry, std::less<>> tensors_;
};

// Rewrites a Linear's float32 weight [out_features, in_features] right after it is loaded, e.g.
// to fake-quantize it (replace it by the decoded values of the bytes an exporter would store).
// `linear` is the Linear's name without ".weight" (model.layers.3.mlp.down_proj).
class WeightTransform {
 public:
  virtual ~WeightTransform() = default;
  virtual void apply(std::string_view linear, std::int64_t out_features, std::int64_t in_features,
                     std::span<float> weight) const = 0;
};

// Rewrites the input rows [rows, in_features] of a Linear before it is multiplied, e.g. to
// simulate activation quantization. The backward pass treats it as identity (straight-through),
// and observers see the rewritten rows, i.e. what the Linear actually multiplied.
class ActivationQuantizer {
 public:
  virtual ~ActivationQuantizer() = default;
  virtual bool applies_to(std::string_view linear) const = 0;
  virtual void quantize(std::string_view linear, std::int64_t rows, std::int64_t in_features,
                        std::span<float> input) const = 0;
};

}  // namespace pq::runtime
