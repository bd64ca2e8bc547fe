// Consumer-side reading of a compressed-tensors checkpoint: quantization_config, target matching
// and the tensors each scheme stores.
#include "validate/ct_checkpoint.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <set>

#include "common/error.h"
#include "common/file_util.h"

namespace pq::validate {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// Tensors compressed-tensors writes beside (or instead of) a quantized module's "weight"
// (format-facts.md A.1; compressed-tensors compressors/*/base.py compression_param_names).
constexpr std::string_view kQuantSuffixes[] = {
    "weight_packed",      "weight_scale", "weight_global_scale",
    "input_global_scale", "weight_shape", "weight_zero_point",
    "weight_g_idx",       "input_scale",  "input_zero_point"};

bool is_quant_suffix(std::string_view suffix) {
  return std::find(std::begin(kQuantSuffixes), std::end(kQuantSuffixes), suffix) !=
         std::end(kQuantSuffixes);
}

std::int64_t ceil_div(std::int64_t a, std::int64_t b) {
  return (a + b - 1) / b;
}

Strategy parse_strategy(const std::string& text, const std::string& where) {
  static const std::map<std::string, Strategy> kNames = {
      {"tensor", Strategy::kTensor}, {"channel", Strategy::kChannel},
      {"group", Strategy::kGroup},   {"tensor_group", Strategy::kTensorGroup},
      {"block", Strategy::kBlock},   {"token", Strategy::kToken}};
  const auto it = kNames.find(text);
  PQ_CHECK(it != kNames.end(), "{}: strategy \"{}\" is not one this reader decodes", where, text);
  return it->second;
}

// QuantizationArgs from JSON (quant_args.py): missing keys take the pydantic defaults, and a
// missing strategy is inferred from group_size (null: tensor, -1: channel, > 0: group).
QuantArgs parse_args(const json& j, const std::string& where) {
  PQ_CHECK(j.is_object(), "{}: expected a QuantizationArgs object", where);
  QuantArgs args;
  try {
    args.num_bits = j.value("num_bits", 8);
    const std::string type = j.value("type", std::string("int"));
    PQ_CHECK(type == "int" || type == "float", "{}: type \"{}\" is neither int nor float", where,
             type);
    args.type = type == "int" ? QuantType::kInt : QuantType::kFloat;
    args.symmetric = j.value("symmetric", true);
    if (j.contains("group_size") && !j["group_size"].is_null()) {
      args.group_size = j["group_size"].get<std::int64_t>();
    }
    if (j.contains("strategy") && !j["strategy"].is_null()) {
      args.strategy = parse_strategy(j["strategy"].get<std::string>(), where);
    } else if (!args.group_size) {
      args.strategy = Strategy::kTensor;
    } else {
      args.strategy = *args.group_size == -1 ? Strategy::kChannel : Strategy::kGroup;
    }
    if (j.contains("block_structure") && !j["block_structure"].is_null()) {
      const auto block = j["block_structure"].get<std::vector<std::int64_t>>();
      PQ_CHECK(block.size() == 2 && block[0] > 0 && block[1] > 0,
               "{}: block_structure must be [rows, cols]", where);
      args.block_structure = std::array<std::int64_t, 2>{block[0], block[1]};
    }
    if (j.contains("dynamic")) {
      const json& dynamic = j["dynamic"];
      args.dynamic = dynamic.is_boolean() ? dynamic.get<bool>() : dynamic == "local";
    }
    if (j.contains("scale_dtype") && j["scale_dtype"].is_string()) {
      args.scale_dtype = j["scale_dtype"].get<std::string>();
    }
    PQ_CHECK(!j.contains("actorder") || j["actorder"].is_null(),
             "{}: actorder (weight_g_idx) is not supported by this reader", where);
  } catch (const json::exception& e) {
    fail("{}: malformed QuantizationArgs: {}", where, e.what());
  }
  PQ_CHECK(args.num_bits > 0, "{}: num_bits {} is not positive", where, args.num_bits);
  return args;
}

bool is_float(const QuantArgs& a, int bits) {
  return a.type == QuantType::kFloat && a.num_bits == bits;
}

bool has_group(const QuantArgs& a, Strategy strategy, std::int64_t group) {
  return a.strategy == strategy && a.group_size == group;
}

std::string_view strategy_name(Strategy s) {
  switch (s) {
    case Strategy::kTensor:
      return "tensor";
    case Strategy::kChannel:
      return "channel";
    case Strategy::kGroup:
      return "group";
    case Strategy::kTensorGroup:
      return "tensor_group";
    case Strategy::kBlock:
      return "block";
    case Strategy::kToken:
      break;
  }
  return "token";
}

std::string describe(const QuantArgs& a) {
  return fmt::format(
      "{} {} bits, strategy {}, group_size {}", a.type == QuantType::kInt ? "int" : "float",
      a.num_bits, strategy_name(a.strategy), a.group_size ? std::to_string(*a.group_size) : "null");
}

// The weight layout of a (format, weights) pair, as the compressor of that format writes it.
Layout weight_layout(const std::string& format, const QuantArgs& w, const std::string& where) {
  auto unsupported = [&]() -> Layout {
    fail("{}: format {} with weights {} is not a layout this reader decodes", where, format,
         describe(w));
  };
  // The scale storage a format fixes, when the config names it (newer compressed-tensors writes
  // scale_dtype; older checkpoints omit it).
  auto check_scale_dtype = [&](std::string_view expected) {
    PQ_CHECK(w.scale_dtype.empty() || w.scale_dtype == expected,
             "{}: format {} stores {} scales, but weights.scale_dtype is \"{}\"", where, format,
             expected, w.scale_dtype);
  };
  if (format == "nvfp4-pack-quantized") {
    // vLLM's NVFP4 detection: 4-bit float, tensor_group, group 16, symmetric (A.4).
    if (!is_float(w, 4) || !has_group(w, Strategy::kTensorGroup, 16)) return unsupported();
    check_scale_dtype("torch.float8_e4m3fn");
    return Layout::kNvfp4;
  }
  if (format == "mxfp4-pack-quantized") {
    if (!is_float(w, 4) || !has_group(w, Strategy::kGroup, 32)) return unsupported();
    check_scale_dtype("torch.uint8");
    return Layout::kMxfp4;
  }
  if (format == "mxfp8-quantized") {
    if (!is_float(w, 8) || !has_group(w, Strategy::kGroup, 32)) return unsupported();
    check_scale_dtype("torch.uint8");
    return Layout::kMxfp8;
  }
  if (format == "float-quantized" || format == "naive-quantized") {
    // E4M3 weights with per-tensor, per-channel or block scales (vLLM
    // compressed_tensors_w8a8_fp8.py / w8a16_fp8.py).
    const bool ok =
        is_float(w, 8) && (w.strategy == Strategy::kTensor || w.strategy == Strategy::kChannel ||
                           (w.strategy == Strategy::kBlock && w.block_structure));
    if (!ok) return unsupported();
    return Layout::kFp8;
  }
  if (format == "pack-quantized") {
    // Symmetric INT4/INT8 packed in int32 (vLLM compressed_tensors_wNa16.py WNA16_SUPPORTED_BITS).
    const bool grouped = w.strategy == Strategy::kGroup && w.group_size && *w.group_size > 0;
    const bool ok = w.type == QuantType::kInt && (w.num_bits == 4 || w.num_bits == 8) &&
                    (grouped || w.strategy == Strategy::kChannel);
    if (!ok) return unsupported();
    return Layout::kPackedInt;
  }
  fail("{}: format \"{}\" is not one this reader decodes", where, format);
}

ActivationKind activation_kind(Layout layout, const std::optional<QuantArgs>& a,
                               const std::string& where) {
  if (!a) return ActivationKind::kNone;
  auto unsupported = [&]() -> ActivationKind {
    fail("{}: input_activations {} (dynamic {}) are not a scheme this reader simulates", where,
         describe(*a), a->dynamic);
  };
  switch (layout) {
    case Layout::kNvfp4:
      // W4A4: per-16 E4M3 scales computed at run time under the static input_global_scale.
      if (!is_float(*a, 4) || !has_group(*a, Strategy::kTensorGroup, 16)) return unsupported();
      return ActivationKind::kNvfp4;
    case Layout::kMxfp4:
      if (!is_float(*a, 4) || !has_group(*a, Strategy::kGroup, 32) || !a->dynamic) {
        return unsupported();
      }
      return ActivationKind::kMxfp4;
    case Layout::kMxfp8:
      if (!is_float(*a, 8) || !has_group(*a, Strategy::kGroup, 32) || !a->dynamic) {
        return unsupported();
      }
      return ActivationKind::kMxfp8;
    case Layout::kFp8:
      // Dynamic FP8 only: a static scheme would need an input_scale tensor.
      if (!is_float(*a, 8) || !a->dynamic) return unsupported();
      if (a->strategy == Strategy::kToken) return ActivationKind::kFp8PerToken;
      if (a->strategy == Strategy::kGroup && a->group_size && *a->group_size > 0) {
        return ActivationKind::kFp8PerGroup;
      }
      return unsupported();
    case Layout::kPackedInt:
      break;
  }
  return unsupported();
}

// A compiled "re:" pattern.
class Regex {
 public:
  explicit Regex(std::string_view pattern) {
    int code = 0;
    PCRE2_SIZE offset = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), 0, &code,
                          &offset, nullptr);
    if (code_ == nullptr) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(code, message, sizeof message);
      fail("regex target \"re:{}\" does not compile: {} (at offset {})", pattern,
           reinterpret_cast<const char*>(message), offset);
    }
    data_ = pcre2_match_data_create_from_pattern(code_, nullptr);
  }
  ~Regex() {
    pcre2_match_data_free(data_);
    pcre2_code_free(code_);
  }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Python re.match: the match must start at the first character, it may end anywhere.
  bool match_at_start(std::string_view subject) const {
    return pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(subject.data()), subject.size(), 0,
                       PCRE2_ANCHORED, data_, nullptr) >= 0;
  }

 private:
  pcre2_code* code_ = nullptr;
  pcre2_match_data* data_ = nullptr;
};

// Compiled regexes, reused for every module (a checkpoint has thousands of Linears).
const Regex& compiled(std::string_view pattern) {
  thread_local std::map<std::string, std::unique_ptr<Regex>, std::less<>> cache;
  auto it = cache.find(pattern);
  if (it == cache.end()) {
    it = cache.emplace(std::string(pattern), std::make_unique<Regex>(pattern)).first;
  }
  return *it->second;
}

std::string_view match_name(MatchKind kind) {
  switch (kind) {
    case MatchKind::kExact:
      return "exact name";
    case MatchKind::kRegex:
      return "regex";
    case MatchKind::kClass:
      return "class name Linear";
    case MatchKind::kNone:
      break;
  }
  return "nothing";
}

// Splits "a.b.c" into module "a.b" and suffix "c".
std::pair<std::string, std::string> split_name(const std::string& name) {
  const std::size_t dot = name.rfind('.');
  if (dot == std::string::npos) return {std::string(), name};
  return {name.substr(0, dot), name.substr(dot + 1)};
}

float read_f32_scalar(const io::Checkpoint& checkpoint, const std::string& name) {
  const io::TensorView view = checkpoint.view(name);
  float value = 0.0f;
  std::memcpy(&value, view.bytes.data(), sizeof value);
  return value;
}

bool is_kv_cache_scale(const std::string& module, const std::string& suffix) {
  return module.ends_with(".self_attn") && (suffix == "k_scale" || suffix == "v_scale");
}

std::string shape_text(const std::vector<std::int64_t>& shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

std::string dtypes_text(const std::vector<io::DType>& dtypes) {
  std::string out;
  for (const io::DType d : dtypes)
    out += (out.empty() ? "" : " or ") + std::string(io::dtype_name(d));
  return out;
}

}  // namespace

Scheme parse_scheme(const std::string& group, const json& body, const std::string& model_format) {
  const std::string where = fmt::format("config group {}", group);
  PQ_CHECK(body.is_object(), "{}: expected an object", where);
  Scheme scheme;
  scheme.group = group;
  scheme.format = body.contains("format") && body["format"].is_string()
                      ? body["format"].get<std::string>()
                      : model_format;
  PQ_CHECK(scheme.format != "mixed-precision" && scheme.format != "dense",
           "{}: no storage format (the group has none and the checkpoint's is \"{}\")", where,
           model_format);
  PQ_CHECK(body.contains("weights") && !body["weights"].is_null(),
           "{}: no weights quantization; unquantized Linears belong in ignore", where);
  scheme.weights = parse_args(body["weights"], where + " weights");
  if (body.contains("input_activations") && !body["input_activations"].is_null()) {
    scheme.input_activations = parse_args(body["input_activations"], where + " input_activations");
  }
  PQ_CHECK(!body.contains("output_activations") || body["output_activations"].is_null(),
           "{}: output_activations are not supported by this reader", where);
  PQ_CHECK(scheme.weights.symmetric,
           "{}: asymmetric weights (zero points) are not supported by this reader", where);
  scheme.layout = weight_layout(scheme.format, scheme.weights, where);
  scheme.activations = activation_kind(scheme.layout, scheme.input_activations, where);
  PQ_CHECK(body.contains("targets") && body["targets"].is_array() && !body["targets"].empty(),
           "{}: targets must be a non-empty list", where);
  for (const json& target : body["targets"]) {
    PQ_CHECK(target.is_string(), "{}: targets must be strings", where);
    scheme.targets.push_back(target.get<std::string>());
  }
  return scheme;
}

std::vector<ExpectedTensor> expected_tensors(const Scheme& scheme, std::int64_t out,
                                             std::int64_t in) {
  using io::DType;
  const std::vector<DType> float_scales = {DType::F32, DType::BF16, DType::F16};
  auto require_multiple = [&](std::int64_t group) {
    PQ_CHECK(in % group == 0, "in_features {} is not a multiple of the group size {} of {}", in,
             group, scheme.format);
  };
  switch (scheme.layout) {
    case Layout::kNvfp4: {
      require_multiple(16);
      std::vector<ExpectedTensor> t = {{"weight_packed", {DType::U8}, {out, in / 2}},
                                       {"weight_scale", {DType::F8_E4M3}, {out, in / 16}},
                                       {"weight_global_scale", {DType::F32}, {1}}};
      if (scheme.activations == ActivationKind::kNvfp4) {
        t.push_back({"input_global_scale", {DType::F32}, {1}});
      }
      return t;
    }
    case Layout::kMxfp4:
      require_multiple(32);
      return {{"weight_packed", {DType::U8}, {out, in / 2}},
              {"weight_scale", {DType::U8}, {out, in / 32}}};
    case Layout::kMxfp8:
      require_multiple(32);
      return {{"weight", {DType::F8_E4M3}, {out, in}},
              {"weight_scale", {DType::U8}, {out, in / 32}}};
    case Layout::kFp8: {
      std::vector<std::int64_t> scale_shape;
      switch (scheme.weights.strategy) {
        case Strategy::kTensor:
          scale_shape = {1};
          break;
        case Strategy::kChannel:
          scale_shape = {out, 1};
          break;
        default: {
          const auto [rows, cols] = *scheme.weights.block_structure;
          scale_shape = {ceil_div(out, rows), ceil_div(in, cols)};
        }
      }
      return {{"weight", {DType::F8_E4M3}, {out, in}}, {"weight_scale", float_scales, scale_shape}};
    }
    case Layout::kPackedInt:
      break;
  }
  const int bits = scheme.weights.num_bits;
  const std::int64_t group =
      scheme.weights.strategy == Strategy::kChannel ? in : *scheme.weights.group_size;
  require_multiple(group);
  return {{"weight_packed", {DType::I32}, {out, ceil_div(in * bits, 32)}},
          {"weight_scale", float_scales, {out, in / group}},
          {"weight_shape", {DType::I64, DType::I32}, {2}}};
}

MatchKind match_target(std::string_view module, std::string_view target) {
  if (target == module) return MatchKind::kExact;
  if (target.starts_with("re:")) {
    return compiled(target.substr(3)).match_at_start(module) ? MatchKind::kRegex : MatchKind::kNone;
  }
  return target == "Linear" ? MatchKind::kClass : MatchKind::kNone;
}

CompressedTensorsCheckpoint::CompressedTensorsCheckpoint(fs::path directory, io::Checkpoint tensors)
    : directory_(std::move(directory)), tensors_(std::move(tensors)) {}

const model::Linear* CompressedTensorsCheckpoint::find_linear(std::string_view module) const {
  const auto it = linear_index_.find(module);
  return it == linear_index_.end() ? nullptr : &spec_.linears[it->second];
}

const Scheme* CompressedTensorsCheckpoint::scheme_of(std::string_view module) const {
  const auto it = linear_index_.find(module);
  PQ_CHECK(it != linear_index_.end(), "{}: the model has no Linear {}", directory_.string(),
           module);
  const int index = scheme_index_[it->second];
  return index < 0 ? nullptr : &schemes_[static_cast<std::size_t>(index)];
}

CompressedTensorsCheckpoint CompressedTensorsCheckpoint::open(const fs::path& directory) {
  const std::string label = directory.string();
  CompressedTensorsCheckpoint ct(directory, io::Checkpoint::open(directory));
  ct.config_ = model::ModelConfig::load(directory);
  const json& raw = ct.config_.raw;
  PQ_CHECK(raw.contains("quantization_config") && raw["quantization_config"].is_object(),
           "{}/config.json: no quantization_config", label);
  const json& qc = raw["quantization_config"];
  auto string_field = [&](const char* key, const std::string& absent) {
    if (!qc.contains(key) || qc[key].is_null()) return absent;
    PQ_CHECK(qc[key].is_string(), "{}/config.json: quantization_config.{} is not a string", label,
             key);
    return qc[key].get<std::string>();
  };
  const std::string method = string_field("quant_method", "");
  PQ_CHECK(method == "compressed-tensors",
           "{}/config.json: quantization_config.quant_method is \"{}\", not compressed-tensors",
           label, method);
  ct.format_ = string_field("format", "dense");
  PQ_CHECK(!qc.contains("config_groups") || qc["config_groups"].is_object(),
           "{}/config.json: config_groups is not an object", label);
  try {
    if (qc.contains("config_groups")) {
      for (const auto& [name, body] : qc["config_groups"].items()) {
        ct.schemes_.push_back(parse_scheme(name, body, ct.format_));
      }
    }
  } catch (const Error& e) {
    fail("{}/config.json: {}", label, e.what());
  }
  // kv_cache_scheme: null, or the FP8 one vLLM loads (CompressedTensorsKVCacheMethod.
  // validate_kv_cache_scheme, compressed_tensors_kv.py: type float, 8 bits, strategy tensor,
  // symmetric), with static scales stored per layer (dynamic false).
  const bool fp8_kv_cache = qc.contains("kv_cache_scheme") && !qc["kv_cache_scheme"].is_null();
  if (fp8_kv_cache) {
    const std::string where = label + "/config.json: kv_cache_scheme";
    const QuantArgs kv = parse_args(qc["kv_cache_scheme"], where);
    PQ_CHECK(kv.type == QuantType::kFloat && kv.num_bits == 8 && kv.strategy == Strategy::kTensor &&
                 kv.symmetric && !kv.dynamic,
             "{} is not an FP8 cache with static per-tensor symmetric scales (type float, num_bits "
             "8, strategy tensor, symmetric true, dynamic false), the one vLLM loads and this "
             "reader checks",
             where);
  }
  std::vector<std::string> ignore;
  if (qc.contains("ignore") && !qc["ignore"].is_null()) {
    PQ_CHECK(qc["ignore"].is_array(), "{}/config.json: ignore is not a list", label);
    for (const json& entry : qc["ignore"]) {
      PQ_CHECK(entry.is_string(), "{}/config.json: ignore entries must be strings", label);
      ignore.push_back(entry.get<std::string>());
    }
  }

  // Tensors by module: "<module>.<suffix>".
  std::map<std::string, std::set<std::string>> suffixes_of;
  for (const std::string& name : ct.tensors_.tensor_names()) {
    const auto [module, suffix] = split_name(name);
    suffixes_of[module].insert(suffix);
  }
  auto quant_tensors_of = [&](const std::string& module) {
    std::vector<std::string> out;
    for (const std::string& suffix : suffixes_of[module]) {
      if (is_quant_suffix(suffix)) out.push_back(suffix);
    }
    return out;
  };

  // The model inventory, with each quantized module standing in as "<module>.weight" of its
  // logical [out, in] shape, which the inventory checks against config.json. The shape is read
  // the way the compressors record it: weight_shape (pack-quantized), the E4M3 weight itself
  // (FP8, MXFP8), or the FP4 bytes holding two codes each (NVFP4, MXFP4).
  std::vector<model::TensorDesc> descs;
  std::set<std::string> quantized_modules;
  for (const auto& [module, suffixes] : suffixes_of) {
    if (!quant_tensors_of(module).empty()) quantized_modules.insert(module);
  }
  // The KV cache scales belong to the attention module (vLLM's Attention under it), not to the
  // model's inventory; they are checked below, against kv_cache_scheme.
  std::map<std::string, std::set<std::string>> kv_cache_scales_of;
  for (const std::string& name : ct.tensors_.tensor_names()) {
    const auto [module, suffix] = split_name(name);
    if (quantized_modules.contains(module) && (suffix == "weight" || is_quant_suffix(suffix))) {
      continue;
    }
    if (is_kv_cache_scale(module, suffix)) {
      kv_cache_scales_of[module].insert(suffix);
      continue;
    }
    const io::TensorInfo& info = ct.tensors_.info(name);
    descs.push_back({name, info.dtype, info.shape});
  }
  for (const std::string& module : quantized_modules) {
    const std::set<std::string>& suffixes = suffixes_of[module];
    std::vector<std::int64_t> shape;
    if (suffixes.contains("weight_shape")) {
      const io::TensorInfo& info = ct.tensors_.info(module + ".weight_shape");
      PQ_CHECK((info.dtype == io::DType::I64 || info.dtype == io::DType::I32) &&
                   info.shape == std::vector<std::int64_t>{2},
               "{}: tensor {}.weight_shape is {} {}, expected I64 [2]", label, module,
               io::dtype_name(info.dtype), shape_text(info.shape));
      const io::TensorView view = ct.tensors_.view(module + ".weight_shape");
      for (int d = 0; d < 2; ++d) {
        if (info.dtype == io::DType::I64) {
          std::int64_t v = 0;
          std::memcpy(&v, view.bytes.data() + 8 * d, 8);
          shape.push_back(v);
        } else {
          std::int32_t v = 0;
          std::memcpy(&v, view.bytes.data() + 4 * d, 4);
          shape.push_back(v);
        }
      }
    } else if (suffixes.contains("weight")) {
      shape = ct.tensors_.info(module + ".weight").shape;
    } else if (suffixes.contains("weight_packed") &&
               ct.tensors_.info(module + ".weight_packed").dtype == io::DType::U8) {
      shape = ct.tensors_.info(module + ".weight_packed").shape;
      PQ_CHECK(shape.size() == 2, "{}: tensor {}.weight_packed is not 2-D", label, module);
      shape[1] *= 2;
    } else {
      fail(
          "{}: module {} has quantization tensors but no weight, weight_shape or U8 weight_packed "
          "to give its shape",
          label, module);
    }
    descs.push_back({module + ".weight", io::DType::BF16, shape});
  }
  ct.spec_ = model::build_model_spec(ct.config_, descs, label,
                                     {.quantize_lm_head = quantized_modules.contains("lm_head")});
  for (std::size_t i = 0; i < ct.spec_.linears.size(); ++i) {
    ct.linear_index_.emplace(ct.spec_.linears[i].name, i);
  }
  for (const std::string& module : quantized_modules) {
    PQ_CHECK(ct.find_linear(module) != nullptr,
             "{}: tensor {}.{} quantizes {}, which is not a Linear of the model", label, module,
             quant_tensors_of(module).front(), module);
  }

  // KV cache scales: one k_scale and one v_scale per KV-cache layer exactly when kv_cache_scheme
  // is set. vLLM reads any one-element tensor (default_weight_loader fills its scalar float32);
  // compressed-tensors stores shape [1] in the model's dtype (initialize_attn_qparams).
  const std::map<std::int64_t, std::string> kv_modules = ct.spec_.kv_cache_modules();
  std::set<std::string> kv_module_names;
  for (const auto& [layer, module] : kv_modules) kv_module_names.insert(module);
  for (const auto& [module, suffixes] : kv_cache_scales_of) {
    PQ_CHECK(fp8_kv_cache, "{}: tensor {}.{} is a KV cache scale but kv_cache_scheme is null",
             label, module, *suffixes.begin());
    PQ_CHECK(kv_module_names.contains(module),
             "{}: tensor {}.{} is a KV cache scale of a module that has no KV cache", label, module,
             *suffixes.begin());
  }
  if (fp8_kv_cache) {
    for (const auto& [layer, module] : kv_modules) {
      const auto scale = [&](const char* suffix) {
        const std::string name = module + "." + suffix;
        PQ_CHECK(ct.tensors_.contains(name),
                 "{}: kv_cache_scheme is set but tensor {} is missing (vLLM would fall back to "
                 "scale 1.0)",
                 label, name);
        const io::TensorInfo& info = ct.tensors_.info(name);
        PQ_CHECK((info.dtype == io::DType::F32 || info.dtype == io::DType::BF16) &&
                     (info.shape.empty() || info.shape == std::vector<std::int64_t>{1}),
                 "{}: tensor {} is {} {}, expected one F32 or BF16 value", label, name,
                 io::dtype_name(info.dtype), shape_text(info.shape));
        float value = 0.0f;
        if (info.dtype == io::DType::F32) {
          value = read_f32_scalar(ct.tensors_, name);
        } else {
          std::uint16_t bits = 0;
          std::memcpy(&bits, ct.tensors_.view(name).bytes.data(), sizeof bits);
          const std::uint32_t widened = static_cast<std::uint32_t>(bits) << 16;
          std::memcpy(&value, &widened, sizeof value);
        }
        PQ_CHECK(std::isfinite(value) && value > 0.0f,
                 "{}: tensor {} is {}, not a positive finite scale", label, name, value);
        return value;
      };
      ct.kv_cache_scales_[layer] = {scale("k_scale"), scale("v_scale")};
    }
  }

  // A scheme per Linear (compressed-tensors utils/match.py, vLLM find_matched_target): ignore
  // wins; otherwise the most specific kind of match decides (exact name, then regex, then the
  // class name), and two groups matching at that level leave the scheme ambiguous.
  auto match = [&](const std::string& module, const std::string& target) {
    try {
      return match_target(module, target);
    } catch (const Error& e) {
      fail("{}/config.json: {}", label, e.what());
    }
  };
  ct.scheme_index_.assign(ct.spec_.linears.size(), -1);
  for (std::size_t i = 0; i < ct.spec_.linears.size(); ++i) {
    const std::string& name = ct.spec_.linears[i].name;
    // vLLM matches its own module names (model::Linear::serving_name).
    const std::string& serving_name = ct.spec_.linears[i].serving_name;
    MatchKind ignored = MatchKind::kNone;
    for (const std::string& entry : ignore) ignored = std::max(ignored, match(serving_name, entry));
    if (ignored != MatchKind::kNone) continue;
    MatchKind best = MatchKind::kNone;
    std::vector<int> at_best;
    for (std::size_t s = 0; s < ct.schemes_.size(); ++s) {
      MatchKind kind = MatchKind::kNone;
      for (const std::string& target : ct.schemes_[s].targets) {
        kind = std::max(kind, match(serving_name, target));
      }
      if (kind == MatchKind::kNone || kind < best) continue;
      if (kind > best) at_best.clear();
      best = kind;
      at_best.push_back(static_cast<int>(s));
    }
    PQ_CHECK(!at_best.empty(), "{}: Linear {} is neither targeted by a config group nor ignored",
             label, name);
    PQ_CHECK(at_best.size() == 1,
             "{}: Linear {} is targeted by config groups {} and {} (both by {}); its scheme is "
             "ambiguous",
             label, name, ct.schemes_[at_best[0]].group, ct.schemes_[at_best[1]].group,
             match_name(best));
    ct.scheme_index_[i] = at_best.front();
  }

  // vLLM's FusedMoE takes weight-only experts only as pack-quantized integers or FP4: FP8
  // weights with 16-bit activations fail to load ("For Fused MoE layers, only format
  // 'pack-quantized' and bits [4, 8] are supported": compressed_tensors_moe.py get_moe_method,
  // the FP8_E4M3A16 expert cell of formats/serving.cpp), whatever the GPU.
  for (std::size_t i = 0; i < ct.spec_.linears.size(); ++i) {
    const model::Linear& linear = ct.spec_.linears[i];
    if (!linear.expert || ct.scheme_index_[i] < 0) continue;
    const Scheme& scheme = ct.schemes_[static_cast<std::size_t>(ct.scheme_index_[i])];
    PQ_CHECK(scheme.layout != Layout::kFp8 || scheme.input_activations.has_value(),
             "{}: MoE expert {} has FP8 weights with 16-bit activations ({}), which vLLM's "
             "FusedMoE does not load (weight-only experts must be pack-quantized INT4/INT8 or FP4)",
             label, linear.name, scheme.group);
  }

  // Each module holds exactly the tensors its scheme stores.
  for (std::size_t i = 0; i < ct.spec_.linears.size(); ++i) {
    const model::Linear& linear = ct.spec_.linears[i];
    if (linear.slice) continue;  // packed 3-D expert tensors are not a compressed-tensors layout
    const std::set<std::string>& suffixes = suffixes_of[linear.name];
    if (ct.scheme_index_[i] < 0) {
      const std::vector<std::string> extra = quant_tensors_of(linear.name);
      PQ_CHECK(extra.empty(), "{}: Linear {} is ignored (unquantized) but has tensor {}.{}", label,
               linear.name, linear.name, extra.empty() ? "" : extra.front());
      continue;
    }
    const Scheme& scheme = ct.schemes_[static_cast<std::size_t>(ct.scheme_index_[i])];
    std::vector<ExpectedTensor> expected;
    try {
      expected = expected_tensors(scheme, linear.out_features, linear.in_features);
    } catch (const Error& e) {
      fail("{}: Linear {} ({}): {}", label, linear.name, scheme.group, e.what());
    }
    std::set<std::string> wanted;
    for (const ExpectedTensor& t : expected) {
      wanted.insert(t.suffix);
      const std::string name = linear.name + "." + t.suffix;
      PQ_CHECK(suffixes.contains(t.suffix), "{}: missing tensor {} ({} scheme of {})", label, name,
               scheme.format, scheme.group);
      const io::TensorInfo& info = ct.tensors_.info(name);
      PQ_CHECK(std::find(t.dtypes.begin(), t.dtypes.end(), info.dtype) != t.dtypes.end(),
               "{}: tensor {} has dtype {}, expected {} ({})", label, name,
               io::dtype_name(info.dtype), dtypes_text(t.dtypes), scheme.format);
      PQ_CHECK(info.shape == t.shape, "{}: tensor {} has shape {}, expected {} ({})", label, name,
               shape_text(info.shape), shape_text(t.shape), scheme.format);
    }
    for (const std::string& suffix : suffixes) {
      PQ_CHECK(suffix == "bias" || wanted.contains(suffix),
               "{}: unexpected tensor {}.{} for the {} scheme of {}", label, linear.name, suffix,
               scheme.format, scheme.group);
    }
    for (const char* global : {"weight_global_scale", "input_global_scale"}) {
      if (!wanted.contains(global)) continue;
      const float value = read_f32_scalar(ct.tensors_, linear.name + "." + global);
      PQ_CHECK(std::isfinite(value) && value > 0.0f,
               "{}: tensor {}.{} is {}, not a positive finite scale", label, linear.name, global,
               value);
    }
  }

  // Fused siblings: vLLM loads q/k/v, gate/up and a MoE layer's experts as one module with one
  // scheme (format-facts.md A.3.1), and keeps one NVFP4 global scale per fused weight (A.3.2): a
  // dense group's members, and each expert's gate_proj with its up_proj (w13).
  auto scheme_label = [&](std::size_t i) {
    const int s = ct.scheme_index_[i];
    return s < 0 ? std::string("ignored")
                 : fmt::format("{} ({})", ct.schemes_[s].group, ct.schemes_[s].format);
  };
  for (const model::SiblingGroup& group : ct.spec_.groups) {
    const std::size_t first = group.members.front();
    for (const std::size_t member : group.members) {
      PQ_CHECK(ct.scheme_index_[member] == ct.scheme_index_[first],
               "{}: fused siblings {} and {} have different schemes ({} vs {}); vLLM loads {} as "
               "one module with one scheme",
               label, ct.spec_.linears[first].name, ct.spec_.linears[member].name,
               scheme_label(first), scheme_label(member), group.name);
    }
    if (ct.scheme_index_[first] < 0 ||
        ct.schemes_[ct.scheme_index_[first]].layout != Layout::kNvfp4) {
      continue;
    }
    std::map<std::int64_t, std::vector<std::size_t>> fused;  // expert (-1: dense) -> members
    for (const std::size_t member : group.members) {
      const model::Linear& linear = ct.spec_.linears[member];
      const bool w13 = linear.role.ends_with("gate_proj") || linear.role.ends_with("up_proj");
      if (!linear.expert || w13) fused[linear.expert.value_or(-1)].push_back(member);
    }
    for (const auto& [expert, members] : fused) {
      for (const char* global : {"weight_global_scale", "input_global_scale"}) {
        const std::string reference = ct.spec_.linears[members.front()].name + "." + global;
        if (!ct.tensors_.contains(reference)) continue;
        const float expected = read_f32_scalar(ct.tensors_, reference);
        for (const std::size_t member : members) {
          const std::string name = ct.spec_.linears[member].name + "." + global;
          const float value = read_f32_scalar(ct.tensors_, name);
          PQ_CHECK(value == expected,
                   "{}: tensor {} = {} differs from {} = {}; vLLM fuses them and keeps one {}",
                   label, name, value, reference, expected, global);
        }
      }
    }
  }
  return ct;
}

}  // namespace pq::validate
