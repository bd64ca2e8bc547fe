#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "formats/group_codec.h"
#include "formats/serving.h"
#include "runtime/weights.h"
#include "validate/ct_checkpoint.h"

namespace pq::validate {

// One stored tensor of a module, as the decoder sees it.
struct StoredTensor {
  io::DType dtype = io::DType::U8;
  std::vector<std::int64_t> shape;
  std::span<const std::uint8_t> bytes;
};
// Looks up "<module>.<suffix>" by suffix; throws pq::Error when absent.
using TensorLookup = std::function<StoredTensor(std::string_view suffix)>;

// Decodes a quantized module's stored tensors to its f32 weight [out, in], row-major, following
// the compressed-tensors decompressors (rules in docs/validate.md):
//   NVFP4  w = E2M1(nibble) * (E4M3(weight_scale[r, c/16]) / weight_global_scale)
//   MXFP4  w = E2M1(nibble) * 2^(weight_scale[r, c/32] - 127)
//   MXFP8  w = E4M3(weight[r, c]) * 2^(weight_scale[r, c/32] - 127)
//   FP8    w = E4M3(weight[r, c]) * weight_scale[tensor | r | r/128, c/128]
//   INT    w = (u - 2^(bits-1)) * weight_scale[r, c/group], u the bits-wide field of the int32
//          words, element i of a word in bits [i*bits, (i+1)*bits)
// with the even column in the low nibble of each FP4 byte. The multiplications are in f32, the
// NVFP4 scale quotient first, as compressed-tensors' dequantize computes x_q * (scale / global).
// Throws pq::Error for tensors that disagree with the scheme or hold a NaN/negative scale.
std::vector<float> decode_weight(const Scheme& scheme, std::int64_t out, std::int64_t in,
                                 const TensorLookup& tensor);

// Decodes one module of a checkpoint.
std::vector<float> decode_module(const CompressedTensorsCheckpoint& checkpoint,
                                 std::string_view module);

// The checkpoint as the runtime reads it: "<module>.weight" of every quantized Linear decoded
// (decode_module), every other tensor as stored (widened to f32).
class DecodedCheckpointWeightSource final : public runtime::WeightSource {
 public:
  explicit DecodedCheckpointWeightSource(const CompressedTensorsCheckpoint& checkpoint);

  bool contains(std::string_view name) const override;
  std::vector<std::int64_t> shape(std::string_view name) const override;
  std::vector<float> load_f32(std::string_view name) const override;
  void release(std::string_view name) const override;

 private:
  // The quantized module whose decoded weight `name` is, or nullptr.
  const model::Linear* quantized_linear(std::string_view name) const;

  const CompressedTensorsCheckpoint& checkpoint_;
};

// Throws pq::Error naming the first NVFP4 module that vLLM on `target` runs through Marlin
// (formats::nvfp4_scales) with a non-zero group scale below E4M3's smallest normal 2^-6: Marlin
// reads such a scale as about zero, so the served weights are not the stored ones
// (formats::Nvfp4Scales). prismaquant's exports for that target never have one. Reads only the
// weight_scale tensors.
void check_marlin_group_scales(const CompressedTensorsCheckpoint& checkpoint,
                               formats::ServingTarget target);

// What a serving kernel on `target` does to the inputs of each quantized Linear that vLLM runs
// with quantized activations there (formats/serving.h, looked up by the prismaquant format the
// scheme is: none where vLLM serves the scheme weight-only, e.g. FP4 through Marlin below sm100;
// MXFP4/MXFP8 activations for the weight-only MX schemes, which Blackwell runs W4A4/W8A8).
// Fake quantization in f32, per token row:
//   NVFP4 W4A4   E2M1 per 16 columns, E4M3 group scale over the stored input_global_scale
//   MXFP4/MXFP8  E2M1/E4M3 per 32 columns, dynamic E8M0 scale (compressed-tensors'
//                round_to_power_2 exponent rule, as for weights)
//   FP8 dynamic  E4M3 per token (or per group_size columns), scale amax/448 in f32
// The group arithmetic is pq::formats::GroupCodec's (the serving simulation the cost stage
// also uses); the checkpoint supplies only the scheme and input_global_scale.
class CheckpointActivationQuantizer final : public runtime::ActivationQuantizer {
 public:
  CheckpointActivationQuantizer(const CompressedTensorsCheckpoint& checkpoint,
                                formats::ServingTarget target);

  bool applies_to(std::string_view linear) const override;
  void quantize(std::string_view linear, std::int64_t rows, std::int64_t in_features,
                std::span<float> input) const override;
  // How many Linears have their activations quantized.
  std::size_t size() const { return by_linear_.size(); }

 private:
  struct Rule {
    formats::GroupCodec codec;
    std::int64_t group_size;  // 0: the whole row
  };
  std::map<std::string, Rule, std::less<>> by_linear_;
};

}  // namespace pq::validate
