// Weights per second of every format's quantize + dequantize on a 4096x4096 weight whose values
// come from BF16 (the common source dtype), single thread, next to a plain BF16 -> FP32 copy of
// the same tensor measured in the same run (the memory-bound floor). Two paths per format:
//   FakeQuantize/<format>:        fused quantize+dequantize (what the cost stage runs)
//   QuantizeDequantize/<format>:  quantize() to the packed checkpoint tensors, then dequantize()
// and the group codec's row kernels alone, on the same weight:
//   QuantizeRows/<codec>:         scales and one code per byte (what export and GPTQ compute)
//   DequantizeRows/<codec>:       those codes back to floats
// Run with PQ_FORCE_SCALAR=1 to measure the scalar path.

#include <benchmark/benchmark.h>

#include <bit>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "formats/element.h"
#include "formats/group_codec.h"
#include "formats/weight_format.h"

namespace {

using pq::formats::Shape2D;

constexpr Shape2D kShape{4096, 4096};

const std::vector<std::uint16_t>& bf16_weight() {
  static const std::vector<std::uint16_t> w = [] {
    std::mt19937 rng(42);
    std::normal_distribution<float> normal(0.0f, 0.02f);
    std::vector<std::uint16_t> out(kShape.numel());
    for (auto& v : out) {
      v = static_cast<std::uint16_t>(
          pq::formats::encode_element(pq::formats::ElementType::BF16, normal(rng)));
    }
    return out;
  }();
  return w;
}

const std::vector<float>& f32_weight() {
  static const std::vector<float> w = [] {
    std::vector<float> out(kShape.numel());
    const auto& src = bf16_weight();
    for (std::size_t i = 0; i < src.size(); ++i) {
      out[i] = std::bit_cast<float>(static_cast<std::uint32_t>(src[i]) << 16);
    }
    return out;
  }();
  return w;
}

pq::formats::QuantizeOptions options_for(const pq::formats::WeightFormat& f,
                                         const pq::formats::Fp8SourceWeight* src) {
  pq::formats::QuantizeOptions o;
  if (f.quantizes_activations()) o.input_global_scale = 448.0f * 6.0f / 8.0f;
  o.fp8_source = src;
  return o;
}

// FP8_SOURCE copies a source checkpoint's bytes: give it some.
struct Fp8Source {
  std::vector<std::uint8_t> weight;
  std::vector<std::uint8_t> scales;
  pq::formats::Fp8SourceWeight view;
  Fp8Source() : weight(kShape.numel(), 0x38), scales(32 * 32 * 4, 0) {
    const float one = 1.0f;
    for (std::size_t i = 0; i < scales.size(); i += 4) std::memcpy(&scales[i], &one, 4);
    view = {weight, pq::io::DType::F32, scales};
  }
};

void BM_Bf16ToF32Copy(benchmark::State& state) {
  const auto& src = bf16_weight();
  std::vector<float> out(src.size());
  for (auto _ : state) {
    for (std::size_t i = 0; i < src.size(); ++i) {
      out[i] = std::bit_cast<float>(static_cast<std::uint32_t>(src[i]) << 16);
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * kShape.numel());
}
BENCHMARK(BM_Bf16ToF32Copy)->Unit(benchmark::kMillisecond);

void BM_FakeQuantize(benchmark::State& state, const pq::formats::WeightFormat* format) {
  const auto& w = f32_weight();
  std::vector<float> out(w.size());
  const Fp8Source src;
  const auto options = options_for(*format, &src.view);
  for (auto _ : state) {
    format->fake_quantize(w, kShape, out, options);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(state.iterations() * kShape.numel());
}

void BM_QuantizeDequantize(benchmark::State& state, const pq::formats::WeightFormat* format) {
  const auto& w = f32_weight();
  const Fp8Source src;
  const auto options = options_for(*format, &src.view);
  for (auto _ : state) {
    const auto encoded = format->quantize(w, kShape, options);
    auto out = format->dequantize(encoded);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(state.iterations() * kShape.numel());
}

struct RowCodec {
  const char* name;
  pq::formats::GroupCodec codec;
  std::int64_t group_size;
};

// NVFP4's global scale is 448 * 6 / the tensor's amax (compressed-tensors); 0.2 bounds the
// weight's normal(0, 0.02) values.
const RowCodec kRowCodecs[] = {
    {"NVFP4",
     pq::formats::GroupCodec(
         {pq::formats::ElementType::E2M1, 0},
         {.kind = pq::formats::ScaleKind::kE4M3OverGlobal, .global_scale = 448.0f * 6.0f / 0.2f}),
     16},
    {"MXFP4",
     pq::formats::GroupCodec({pq::formats::ElementType::E2M1, 0},
                             {.kind = pq::formats::ScaleKind::kE8M0}),
     32},
    {"MXFP8",
     pq::formats::GroupCodec({pq::formats::ElementType::E4M3, 0},
                             {.kind = pq::formats::ScaleKind::kE8M0}),
     32},
};

void BM_QuantizeRows(benchmark::State& state, const RowCodec* c) {
  const auto& w = f32_weight();
  std::vector<pq::formats::GroupScale> scales(w.size() / c->group_size);
  std::vector<std::uint8_t> codes(w.size());
  for (auto _ : state) {
    pq::formats::quantize_rows(c->codec, {.weights = w,
                                          .cols = kShape.in,
                                          .group_size = c->group_size,
                                          .scales = scales,
                                          .codes = codes});
    benchmark::DoNotOptimize(codes.data());
  }
  state.SetItemsProcessed(state.iterations() * kShape.numel());
}

void BM_DequantizeRows(benchmark::State& state, const RowCodec* c) {
  const auto& w = f32_weight();
  std::vector<pq::formats::GroupScale> scales(w.size() / c->group_size);
  std::vector<std::uint8_t> codes(w.size());
  pq::formats::quantize_rows(c->codec, {.weights = w,
                                        .cols = kShape.in,
                                        .group_size = c->group_size,
                                        .scales = scales,
                                        .codes = codes});
  std::vector<float> out(w.size());
  for (auto _ : state) {
    pq::formats::dequantize_rows(c->codec, codes, scales, kShape.in, c->group_size, out);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(state.iterations() * kShape.numel());
}

const bool kRegistered = [] {
  for (const RowCodec& c : kRowCodecs) {
    benchmark::RegisterBenchmark((std::string("BM_QuantizeRows/") + c.name).c_str(),
                                 BM_QuantizeRows, &c)
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark((std::string("BM_DequantizeRows/") + c.name).c_str(),
                                 BM_DequantizeRows, &c)
        ->Unit(benchmark::kMillisecond);
  }
  for (const pq::formats::WeightFormat* f : pq::formats::all_formats()) {
    const std::string name(f->name());
    benchmark::RegisterBenchmark(("BM_FakeQuantize/" + name).c_str(), BM_FakeQuantize, f)
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("BM_QuantizeDequantize/" + name).c_str(), BM_QuantizeDequantize,
                                 f)
        ->Unit(benchmark::kMillisecond);
  }
  return true;
}();

}  // namespace

BENCHMARK_MAIN();
