// Decode throughput of the validate stage's consumer-side reader on ../shared/models/qwen3-moe-tiny
// exported with every candidate Linear in one format. Baseline: the formats library's own
// dequantize (WeightFormat::dequantize, vectorized) of the same stored tensors, in the same run.
// Figures are f32 weight bytes produced per second.
#include <benchmark/benchmark.h>

#include <filesystem>

#include "alloc/assignment.h"
#include "bench_support.h"
#include "export/exporter.h"
#include "formats/weight_format.h"
#include "io/safetensors.h"
#include "model/model_spec.h"
#include "validate/ct_checkpoint.h"
#include "validate/ct_decode.h"

namespace {

namespace fs = std::filesystem;

fs::path source_dir() {
  return pq::bench::shared_model("qwen3-moe-tiny");
}

fs::path scratch() {
  return fs::temp_directory_path() / "pq_bench_validate";
}

// Exports qwen3-moe-tiny with every candidate Linear in `format`; returns the checkpoint path.
fs::path export_uniform(const std::string& format) {
  fs::create_directories(scratch());
  pq::exporter::ExportJob job;
  job.model_dir = source_dir();
  job.assignment = scratch() / (format + ".json");
  job.out = scratch() / format;
  job.force = true;
  pq::bench::write_uniform_assignment(source_dir(), format, job.assignment);
  pq::exporter::run_export(job);
  return job.out;
}

void BM_Decode(benchmark::State& state, const std::string& format, bool formats_library) {
  const fs::path dir = export_uniform(format);
  const pq::validate::CompressedTensorsCheckpoint ct =
      pq::validate::CompressedTensorsCheckpoint::open(dir);
  const pq::formats::WeightFormat& library = pq::formats::format_by_name(format);
  // The stored tensors of every quantized Linear, as the formats library takes them.
  std::vector<pq::formats::EncodedWeight> encoded;
  std::vector<std::string> modules;
  std::int64_t values = 0;
  for (const pq::model::Linear& linear : ct.spec().linears) {
    if (ct.scheme_of(linear.name) == nullptr) continue;
    modules.push_back(linear.name);
    values += linear.numel();
    const pq::formats::Shape2D shape{linear.out_features, linear.in_features};
    pq::formats::EncodedWeight weight{format, shape, {}};
    for (const pq::formats::TensorSpec& spec : library.tensors(shape)) {
      const pq::io::TensorView view = ct.tensors().view(linear.name + "." + spec.suffix);
      weight.tensors.push_back({spec, {view.bytes.begin(), view.bytes.end()}});
    }
    encoded.push_back(std::move(weight));
  }
  const pq::validate::DecodedCheckpointWeightSource decoded(ct);
  for (auto _ : state) {
    if (formats_library) {
      for (const pq::formats::EncodedWeight& weight : encoded) {
        benchmark::DoNotOptimize(library.dequantize(weight));
      }
    } else {
      for (const std::string& module : modules) {
        benchmark::DoNotOptimize(decoded.load_f32(module + ".weight"));
      }
    }
  }
  state.SetBytesProcessed(state.iterations() * values * static_cast<std::int64_t>(sizeof(float)));
  fs::remove_all(scratch());
}

void register_all() {
  for (const char* format : {"NVFP4A16", "MXFP4A16", "MXFP8A16", "FP8_E4M3", "INT4_W4A16"}) {
    benchmark::RegisterBenchmark((std::string("BM_BaselineFormatsDequantize/") + format).c_str(),
                                 BM_Decode, std::string(format), true)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
    benchmark::RegisterBenchmark((std::string("BM_ValidateDecode/") + format).c_str(), BM_Decode,
                                 std::string(format), false)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
