#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "io/dtype.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "model/model_spec.h"
#include "runtime/kv_cache.h"

namespace pq::validate {

// A compressed-tensors checkpoint read the way a consumer (vLLM, compressed-tensors' own
// decompressor) reads it: from config.json's quantization_config and the safetensors tensors
// alone, never through prismaquant's exporter or its formats library. Facts: the shared
// docs/format-facts.md A.0-A.4, checked against compressed-tensors quantization/quant_args.py,
// quantization/quant_scheme.py, utils/match.py and vLLM compressed_tensors.py.

// QuantizationArgs.type.
enum class QuantType { kInt, kFloat };

// QuantizationArgs.strategy (quant_args.py QuantizationStrategy).
enum class Strategy { kTensor, kChannel, kGroup, kTensorGroup, kBlock, kToken };

// One QuantizationArgs object (weights or input_activations).
struct QuantArgs {
  int num_bits = 0;
  QuantType type = QuantType::kInt;
  Strategy strategy = Strategy::kTensor;
  std::optional<std::int64_t> group_size;
  std::optional<std::array<std::int64_t, 2>> block_structure;  // [rows, cols]
  bool symmetric = true;
  bool dynamic = false;     // true or "local" (NVFP4: per-group scales computed at run time)
  std::string scale_dtype;  // e.g. "torch.float8_e4m3fn"; empty when absent or null
};

// The storage layout a scheme's tensors follow (which compressor wrote them).
enum class Layout {
  kNvfp4,  // nvfp4-pack-quantized: FP4 pairs in bytes, E4M3 group-16 scales, F32 global
  kMxfp4,  // mxfp4-pack-quantized: FP4 pairs in bytes, E8M0 group-32 scales
  kMxfp8,  // mxfp8-quantized: E4M3 weight, E8M0 group-32 scales
  kFp8,    // float-quantized / naive-quantized: E4M3 weight, float scales (tensor/channel/block)
  kPackedInt,  // pack-quantized: symmetric INT4/INT8 in int32 words, float group/channel scales
};

// How a scheme's activations are quantized at serving time.
enum class ActivationKind {
  kNone,         // 16-bit activations (W*A16)
  kNvfp4,        // E2M1 per 16 under E4M3 scales over the stored input_global_scale
  kMxfp4,        // E2M1 per 32, dynamic E8M0 scale
  kMxfp8,        // E4M3 per 32, dynamic E8M0 scale
  kFp8PerToken,  // E4M3, dynamic scale amax/448 per token (row)
  kFp8PerGroup,  // E4M3, dynamic scale amax/448 per group_size columns of each token
};

// One config group, resolved to what its tensors look like.
struct Scheme {
  std::string group;   // its key in config_groups
  std::string format;  // the group's "format", else the checkpoint's
  QuantArgs weights;
  std::optional<QuantArgs> input_activations;
  Layout layout = Layout::kNvfp4;
  ActivationKind activations = ActivationKind::kNone;
  std::vector<std::string> targets;
};

// Parses one config_groups entry; `model_format` is quantization_config.format, used when the
// group has none. Throws pq::Error naming the group for anything this reader cannot decode
// (asymmetric ints, activation orders, unknown formats, num_bits the format does not take).
Scheme parse_scheme(const std::string& group, const nlohmann::json& body,
                    const std::string& model_format);

// A tensor the scheme needs for a module of shape [out, in]: "<module>.<suffix>".
struct ExpectedTensor {
  std::string suffix;
  std::vector<io::DType> dtypes;  // any of these
  std::vector<std::int64_t> shape;
};
std::vector<ExpectedTensor> expected_tensors(const Scheme& scheme, std::int64_t out,
                                             std::int64_t in);

// Whether `target` (an entry of targets or ignore) selects the Linear `module`, and how
// specifically (compressed-tensors utils/match.py match_targets order): an exact name, a "re:"
// regex matched at the start of the name (Python re.match), or the class name "Linear". Every
// module this reader considers is a torch.nn.Linear, so "Linear" is the only class target that
// can select one.
enum class MatchKind { kNone = 0, kClass = 1, kRegex = 2, kExact = 3 };
MatchKind match_target(std::string_view module, std::string_view target);

class CompressedTensorsCheckpoint {
 public:
  // Reads DIR/config.json and the safetensors headers, resolves a scheme for every Linear of the
  // model and checks the tensors (see docs/validate.md). Throws pq::Error with one line naming
  // the file, module or tensor at fault.
  static CompressedTensorsCheckpoint open(const std::filesystem::path& directory);

  const std::filesystem::path& directory() const { return directory_; }
  const io::Checkpoint& tensors() const { return tensors_; }
  const model::ModelConfig& config() const { return config_; }
  // The Linears and other tensors of the model, with quantized Linears' weights listed as
  // "<module>.weight" of their decoded shape.
  const model::ModelSpec& spec() const { return spec_; }
  const std::string& format() const { return format_; }  // quantization_config.format
  const std::vector<Scheme>& schemes() const { return schemes_; }
  // The Linear named `module`, or null.
  const model::Linear* find_linear(std::string_view module) const;
  // The scheme of a Linear (by module name), or null when it is ignored (kept as ".weight").
  const Scheme* scheme_of(std::string_view module) const;
  // With an FP8 kv_cache_scheme: each KV-cache layer's (ModelSpec::kv_cache_modules) k_scale and
  // v_scale as stored, which vLLM's `--kv-cache-dtype fp8` divides keys and values by. Empty when
  // kv_cache_scheme is null.
  const std::map<std::int64_t, runtime::KvCacheScales>& kv_cache_scales() const {
    return kv_cache_scales_;
  }

 private:
  CompressedTensorsCheckpoint(std::filesystem::path directory, io::Checkpoint tensors);

  std::filesystem::path directory_;
  io::Checkpoint tensors_;
  model::ModelConfig config_;
  model::ModelSpec spec_;
  std::string format_;
  std::vector<Scheme> schemes_;
  std::map<std::string, std::size_t, std::less<>> linear_index_;  // name -> spec_.linears index
  std::vector<int> scheme_index_;                                 // per spec_.linears; -1: ignored
  std::map<std::int64_t, runtime::KvCacheScales> kv_cache_scales_;
};

}  // namespace pq::validate
