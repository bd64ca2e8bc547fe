#include "probe/probe_accumulator.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <span>

#include "common/error.h"
#include "common/json_reader.h"
#include "probe/input_key.h"
#include "runtime/kernels/gemm.h"

namespace pq::probe {

namespace {

template <typename T>
std::span<const std::uint8_t> as_bytes(const std::vector<T>& values) {
  return {reinterpret_cast<const std::uint8_t*>(values.data()), values.size() * sizeof(T)};
}

template <typename T>
std::vector<T> read_tensor(const io::SafetensorsFile& file, const std::string& name,
                           io::DType dtype, std::size_t count) {
  const io::TensorInfo* info = file.find(name);
  PQ_CHECK(info != nullptr && info->dtype == dtype && info->nbytes() == count * sizeof(T),
           "{}: probe checkpoint lacks tensor {} of {} values (written for another model?)",
           file.path().string(), name, count);
  std::vector<T> values(count);
  std::memcpy(values.data(), file.view(name).bytes.data(), count * sizeof(T));
  return values;
}

// Appends `values` rounded to bf16 (runtime::convert_f32_to_bf16) to `out`.
void append_bf16(std::span<const float> values, std::vector<std::uint16_t>& out) {
  const std::size_t at = out.size();
  out.resize(at + values.size());
  runtime::convert_f32_to_bf16(values, std::span(out).subspan(at));
}

}  // namespace

ProbeAccumulator::ProbeAccumulator(const model::ModelSpec& spec,
                                   const std::function<bool(const model::Linear&)>& keep,
                                   runtime::ComputeType compute)
    : compute_(compute) {
  for (const model::Linear& linear : spec.linears) {
    if (!linear.is_candidate || (keep && !keep(linear))) continue;
    const std::string key = input_key(linear);
    linear_index_.emplace(linear.name, linears_.size());
    linears_.push_back({linear.name, key, linear.out_features, linear.in_features, 0.0, 0});
    if (input_index_.find(key) == input_index_.end()) {
      input_index_.emplace(key, inputs_.size());
      const auto in = static_cast<std::size_t>(linear.in_features);
      inputs_.push_back({.key = key,
                         .in_features = linear.in_features,
                         .hessian = std::vector<float>(in * in, 0.0f)});
    }
  }
  batch_rows_linear_.assign(linears_.size(), 0);
  batch_rows_input_.assign(inputs_.size(), 0);
}

void ProbeAccumulator::skip_hessians() {
  PQ_CHECK(!records_holdout(), "held-out Hessians need the Hessians");
  hessians_ = false;
  for (InputSums& input : inputs_) {
    input.hessian = {};
    input.square_sums.assign(static_cast<std::size_t>(input.in_features), 0.0);
  }
}

void ProbeAccumulator::record_holdout(std::int64_t first_sequence) {
  PQ_CHECK(first_sequence >= 0, "the first held-out sequence {} is negative", first_sequence);
  PQ_CHECK(hessians_, "held-out Hessians need the Hessians");
  holdout_from_ = first_sequence;
  for (InputSums& input : inputs_) {
    input.holdout_hessian.assign(input.hessian.size(), 0.0f);
    input.holdout_tokens = 0;
  }
}

const InputSums& ProbeAccumulator::input(const std::string& key) const {
  const auto it = input_index_.find(key);
  PQ_CHECK(it != input_index_.end(), "no probed input \"{}\"", key);
  return inputs_[it->second];
}

void ProbeAccumulator::begin_batch() {
  input_owner_.clear();
  batch_rows_linear_.assign(linears_.size(), 0);
  batch_rows_input_.assign(inputs_.size(), 0);
}

void ProbeAccumulator::end_batch(std::int64_t sequences) {
  for (std::size_t i = 0; i < linears_.size(); ++i) {
    const std::size_t input = input_index_.find(linears_[i].input_key)->second;
    PQ_CHECK(batch_rows_linear_[i] == batch_rows_input_[input],
             "{}: saw {} rows but its input {} saw {}; Linears assumed to share an input do not",
             linears_[i].name, batch_rows_linear_[i], linears_[i].input_key,
             batch_rows_input_[input]);
  }
  for (InputSums& input : inputs_) {
    if (hessians_) {
      runtime::mirror_upper_triangle(input.in_features, input.hessian.data(), input.in_features);
    }
    if (records_holdout()) {
      runtime::mirror_upper_triangle(input.in_features, input.holdout_hessian.data(),
                                     input.in_features);
    }
  }
  sequences_ += sequences;
}

// ||G_s||^2 per sequence, added to the Linear's Fisher sum: the ranges of one sequence are
// summed before squaring.
void ProbeAccumulator::accumulate_fisher(const runtime::LinearActivity& activity,
                                         LinearSums& linear) {
  const std::int64_t out = linear.out_features;
  const std::int64_t in = linear.in_features;
  gradient_.resize(static_cast<std::size_t>(out * in));
  const auto ranges = activity.sequences;
  std::vector<bool> done(ranges.size(), false);
  for (std::size_t r = 0; r < ranges.size(); ++r) {
    if (done[r]) continue;
    float beta = 0.0f;
    if (compute_ == runtime::ComputeType::kBF16) {
      // One GEMM over the sequence's rows gathered in bf16 (fp32 accumulation).
      dy_bf16_.clear();
      x_bf16_.clear();
      for (std::size_t q = r; q < ranges.size(); ++q) {
        if (done[q] || ranges[q].sequence != ranges[r].sequence) continue;
        done[q] = true;
        append_bf16({activity.output_grad + ranges[q].begin * out,
                     static_cast<std::size_t>((ranges[q].end - ranges[q].begin) * out)},
                    dy_bf16_);
        append_bf16({activity.input + ranges[q].begin * in,
                     static_cast<std::size_t>((ranges[q].end - ranges[q].begin) * in)},
                    x_bf16_);
      }
      const auto rows = static_cast<std::int64_t>(x_bf16_.size()) / in;
      if (rows == 0) continue;
      runtime::gemm_bf16(runtime::Transpose::kYes, runtime::Transpose::kNo, out, in, rows, 1.0f,
                         dy_bf16_.data(), out, x_bf16_.data(), in, 0.0f, gradient_.data(), in);
      beta = 1.0f;
    }
    for (std::size_t q = r; q < ranges.size(); ++q) {
      if (done[q] || ranges[q].sequence != ranges[r].sequence) continue;
      done[q] = true;
      const std::int64_t rows = ranges[q].end - ranges[q].begin;
      if (rows == 0) continue;
      runtime::gemm_f32(runtime::Transpose::kYes, runtime::Transpose::kNo, out, in, rows, 1.0f,
                        activity.output_grad + ranges[q].begin * out, out,
                        activity.input + ranges[q].begin * in, in, beta, gradient_.data(), in);
      beta = 1.0f;
    }
    if (beta == 0.0f) continue;
    double squares = 0.0;
#pragma omp parallel for reduction(+ : squares) schedule(static)
    for (std::int64_t i = 0; i < out * in; ++i) {
      squares += static_cast<double>(gradient_[i]) * gradient_[i];
    }
    linear.fisher_sum += squares;
  }
}

void ProbeAccumulator::on_linear(const runtime::LinearActivity& activity) {
  const auto found = linear_index_.find(activity.name);
  if (found == linear_index_.end() || activity.rows == 0) return;
  const std::size_t index = found->second;
  LinearSums& linear = linears_[index];
  PQ_CHECK(activity.in_features == linear.in_features &&
               activity.out_features == linear.out_features &&
               (activity.output_grad != nullptr || !fisher_),
           "{}: the runtime reported a [{}, {}] Linear without gradients", linear.name,
           activity.out_features, activity.in_features);
  const std::int64_t in = linear.in_features;
  const auto ranges = activity.sequences;
  if (fisher_) accumulate_fisher(activity, linear);
  linear.tokens += activity.rows;
  batch_rows_linear_[index] += activity.rows;

  // X^T X once per distinct input and batch, by the first Linear that reports it.
  const std::size_t input_index = input_index_.find(linear.input_key)->second;
  const auto [owner, first] = input_owner_.emplace(input_index, index);
  if (!first && owner->second != index) return;
  InputSums& input = inputs_[input_index];
  if (hessians_) {
    // Upper triangle only (half the arithmetic); end_batch() mirrors it.
    runtime::gram_upper_f32(in, activity.rows, 1.0f, activity.input, in, 1.0f, input.hessian.data(),
                            in);
  } else {
    // Blocks of columns, rows in order within each: contiguous reads, the same sums on any
    // number of threads.
    constexpr std::int64_t kBlock = 256;
    double* sums = input.square_sums.data();
#pragma omp parallel for schedule(static)
    for (std::int64_t j0 = 0; j0 < in; j0 += kBlock) {
      const std::int64_t j1 = std::min(in, j0 + kBlock);
      for (std::int64_t r = 0; r < activity.rows; ++r) {
        const float* x = activity.input + r * in;
        for (std::int64_t j = j0; j < j1; ++j) sums[j] += static_cast<double>(x[j]) * x[j];
      }
    }
  }
  input.tokens += activity.rows;
  batch_rows_input_[input_index] += activity.rows;
  if (records_holdout()) {
    for (const runtime::RowRange& range : ranges) {
      const std::int64_t rows = range.end - range.begin;
      if (range.sequence < holdout_from_ || rows == 0) continue;
      runtime::gram_upper_f32(in, rows, 1.0f, activity.input + range.begin * in, in, 1.0f,
                              input.holdout_hessian.data(), in);
      input.holdout_tokens += rows;
    }
  }
  const std::int64_t values = activity.rows * in;
  float amax = input.amax;
#pragma omp parallel for reduction(max : amax) schedule(static)
  for (std::int64_t k = 0; k < values; ++k) amax = std::max(amax, std::abs(activity.input[k]));
  input.amax = amax;
}

void ProbeAccumulator::on_routing(const runtime::RoutingActivity& routing) {
  RoutingSums& sums = routing_[routing.layer];
  const auto experts = static_cast<std::size_t>(routing.num_experts);
  if (sums.route_counts.empty()) {
    sums.layer = routing.layer;
    sums.top_k = routing.top_k;
    sums.route_counts.assign(experts, 0);
    sums.probability_sums.assign(experts, 0.0);
  }
  PQ_CHECK(sums.route_counts.size() == experts, "MoE layer {}: expert count changed ({} vs {})",
           routing.layer, sums.route_counts.size(), experts);
  sums.tokens += routing.tokens;
  for (std::size_t e = 0; e < experts; ++e) sums.route_counts[e] += routing.expert_token_counts[e];
  for (std::int64_t t = 0; t < routing.tokens; ++t) {
    const float* p = routing.probabilities + t * routing.num_experts;
    for (std::size_t e = 0; e < experts; ++e) sums.probability_sums[e] += p[e];
  }
}

void ProbeAccumulator::on_kv_cache(const runtime::KvCacheActivity& kv) {
  if (!record_kv_cache_) return;
  KvCacheSums& sums = kv_cache_[kv.layer];
  sums.layer = kv.layer;
  sums.tokens += kv.rows;
  const std::int64_t values = kv.rows * kv.width;
  float key_amax = sums.key_amax;
  float value_amax = sums.value_amax;
#pragma omp parallel for reduction(max : key_amax, value_amax) schedule(static)
  for (std::int64_t k = 0; k < values; ++k) {
    key_amax = std::max(key_amax, std::abs(kv.keys[k]));
    value_amax = std::max(value_amax, std::abs(kv.values[k]));
  }
  sums.key_amax = key_amax;
  sums.value_amax = value_amax;
}

void ProbeAccumulator::save(io::SafetensorsWriter& writer) const {
  std::vector<double> fisher;
  std::vector<std::int64_t> tokens;
  for (const LinearSums& linear : linears_) {
    fisher.push_back(linear.fisher_sum);
    tokens.push_back(linear.tokens);
  }
  const std::int64_t count = static_cast<std::int64_t>(linears_.size());
  writer.add("fisher_sums", io::DType::F64, std::vector<std::int64_t>{count}, as_bytes(fisher));
  writer.add("linear_tokens", io::DType::I64, std::vector<std::int64_t>{count}, as_bytes(tokens));
  std::vector<std::int64_t> input_tokens;
  std::vector<float> input_amax;
  for (const InputSums& input : inputs_) {
    input_amax.push_back(input.amax);
    if (hessians_) {
      writer.add("hessian." + input.key, io::DType::F32,
                 std::vector<std::int64_t>{input.in_features, input.in_features},
                 as_bytes(input.hessian));
    } else {
      writer.add("square_sums." + input.key, io::DType::F64,
                 std::vector<std::int64_t>{input.in_features}, as_bytes(input.square_sums));
    }
    input_tokens.push_back(input.tokens);
  }
  writer.add("input_tokens", io::DType::I64,
             std::vector<std::int64_t>{static_cast<std::int64_t>(inputs_.size())},
             as_bytes(input_tokens));
  if (records_holdout()) {
    std::vector<std::int64_t> holdout_tokens;
    for (const InputSums& input : inputs_) {
      writer.add("holdout_hessian." + input.key, io::DType::F32,
                 std::vector<std::int64_t>{input.in_features, input.in_features},
                 as_bytes(input.holdout_hessian));
      holdout_tokens.push_back(input.holdout_tokens);
    }
    writer.add("holdout_tokens", io::DType::I64,
               std::vector<std::int64_t>{static_cast<std::int64_t>(inputs_.size())},
               as_bytes(holdout_tokens));
  }
  writer.add("input_amax", io::DType::F32,
             std::vector<std::int64_t>{static_cast<std::int64_t>(inputs_.size())},
             as_bytes(input_amax));
  for (const auto& [layer, sums] : routing_) {
    const std::int64_t experts = static_cast<std::int64_t>(sums.route_counts.size());
    const std::vector<std::int64_t> header = {sums.top_k, sums.tokens};
    const std::string suffix = std::to_string(layer);
    writer.add("routing_header." + suffix, io::DType::I64, std::vector<std::int64_t>{2},
               as_bytes(header));
    writer.add("route_counts." + suffix, io::DType::I64, std::vector<std::int64_t>{experts},
               as_bytes(sums.route_counts));
    writer.add("route_probability_sums." + suffix, io::DType::F64,
               std::vector<std::int64_t>{experts}, as_bytes(sums.probability_sums));
  }
  for (const auto& [layer, sums] : kv_cache_) {
    const std::vector<float> amax = {sums.key_amax, sums.value_amax};
    const std::vector<std::int64_t> kv_tokens = {sums.tokens};
    const std::string suffix = std::to_string(layer);
    writer.add("kv_cache_amax." + suffix, io::DType::F32, std::vector<std::int64_t>{2},
               as_bytes(amax));
    writer.add("kv_cache_tokens." + suffix, io::DType::I64, std::vector<std::int64_t>{1},
               as_bytes(kv_tokens));
  }
  const std::vector<std::int64_t> sequences = {sequences_};
  writer.add("sequences", io::DType::I64, std::vector<std::int64_t>{1}, as_bytes(sequences));
}

void ProbeAccumulator::load(const io::SafetensorsFile& file) {
  const auto fisher = read_tensor<double>(file, "fisher_sums", io::DType::F64, linears_.size());
  const auto tokens =
      read_tensor<std::int64_t>(file, "linear_tokens", io::DType::I64, linears_.size());
  for (std::size_t i = 0; i < linears_.size(); ++i) {
    linears_[i].fisher_sum = fisher[i];
    linears_[i].tokens = tokens[i];
  }
  const auto input_tokens =
      read_tensor<std::int64_t>(file, "input_tokens", io::DType::I64, inputs_.size());
  const auto input_amax = read_tensor<float>(file, "input_amax", io::DType::F32, inputs_.size());
  for (std::size_t i = 0; i < inputs_.size(); ++i) {
    InputSums& input = inputs_[i];
    input.amax = input_amax[i];
    if (hessians_) {
      input.hessian =
          read_tensor<float>(file, "hessian." + input.key, io::DType::F32, input.hessian.size());
    } else {
      input.square_sums = read_tensor<double>(file, "square_sums." + input.key, io::DType::F64,
                                              input.square_sums.size());
    }
    input.tokens = input_tokens[i];
  }
  if (records_holdout()) {
    const auto holdout_tokens =
        read_tensor<std::int64_t>(file, "holdout_tokens", io::DType::I64, inputs_.size());
    for (std::size_t i = 0; i < inputs_.size(); ++i) {
      InputSums& input = inputs_[i];
      input.holdout_hessian = read_tensor<float>(file, "holdout_hessian." + input.key,
                                                 io::DType::F32, input.hessian.size());
      input.holdout_tokens = holdout_tokens[i];
    }
  }
  // The suffix of "<prefix><layer>" tensors is the layer number save() wrote; std::stoll would
  // throw std::invalid_argument (not pq::Error) for any other text and accept "7x".
  const auto layer_of = [&](const io::TensorInfo& info, const std::string& suffix) {
    std::int64_t layer = -1;
    const auto [end, error] = std::from_chars(suffix.data(), suffix.data() + suffix.size(), layer);
    PQ_CHECK(error == std::errc() && end == suffix.data() + suffix.size() && layer >= 0,
             "{}: tensor {} does not name a layer", file.path().string(),
             quoted_json_string(info.name));
    return layer;
  };
  routing_.clear();
  kv_cache_.clear();
  const std::string prefix = "routing_header.";
  const std::string kv_prefix = "kv_cache_amax.";
  for (const io::TensorInfo& info : file.tensors()) {
    if (info.name.starts_with(kv_prefix)) {
      const std::string suffix = info.name.substr(kv_prefix.size());
      KvCacheSums& sums = kv_cache_[layer_of(info, suffix)];
      sums.layer = layer_of(info, suffix);
      const auto amax = read_tensor<float>(file, info.name, io::DType::F32, 2);
      sums.key_amax = amax[0];
      sums.value_amax = amax[1];
      sums.tokens =
          read_tensor<std::int64_t>(file, "kv_cache_tokens." + suffix, io::DType::I64, 1)[0];
      continue;
    }
    if (!info.name.starts_with(prefix)) continue;
    const std::string suffix = info.name.substr(prefix.size());
    const std::int64_t layer = layer_of(info, suffix);
    const auto header = read_tensor<std::int64_t>(file, info.name, io::DType::I64, 2);
    const io::TensorInfo* counts = file.find("route_counts." + suffix);
    PQ_CHECK(counts != nullptr && counts->shape.size() == 1, "{}: route_counts.{} is missing",
             file.path().string(), suffix);
    const auto experts = static_cast<std::size_t>(counts->shape[0]);
    RoutingSums& sums = routing_[layer];
    sums.layer = layer;
    sums.top_k = header[0];
    sums.tokens = header[1];
    sums.route_counts =
        read_tensor<std::int64_t>(file, "route_counts." + suffix, io::DType::I64, experts);
    sums.probability_sums =
        read_tensor<double>(file, "route_probability_sums." + suffix, io::DType::F64, experts);
  }
  sequences_ = read_tensor<std::int64_t>(file, "sequences", io::DType::I64, 1)[0];
}

}  // namespace pq::probe
