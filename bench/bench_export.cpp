// Export throughput on ../shared/models/qwen3-moe-tiny, every candidate Linear in one format.
// Baseline: copying every source tensor unchanged through the same sharded writer, the I/O floor
// any export pays; the format figures are read relative to it (bytes_per_second of source data).
#include <benchmark/benchmark.h>

#include <filesystem>

#include "alloc/assignment.h"
#include "bench_support.h"
#include "export/exporter.h"
#include "formats/weight_format.h"
#include "io/safetensors.h"
#include "io/safetensors_writer.h"
#include "model/model_spec.h"

namespace {

namespace fs = std::filesystem;

fs::path source_dir() {
  return pq::bench::shared_model("qwen3-moe-tiny");
}

fs::path scratch() {
  return fs::temp_directory_path() / "pq_bench_export";
}

// assignment.json giving every candidate Linear `format`, through the alloc library.
fs::path write_uniform_assignment(const std::string& format) {
  fs::create_directories(scratch());
  const fs::path path = scratch() / (format + ".json");
  pq::bench::write_uniform_assignment(source_dir(), format, path);
  return path;
}

void BM_BaselineCopyAllTensors(benchmark::State& state) {
  fs::create_directories(scratch());
  const pq::io::Checkpoint checkpoint = pq::io::Checkpoint::open(source_dir());
  for (auto _ : state) {
    fs::remove_all(scratch() / "copy");
    pq::io::ShardedCheckpointWriter writer(scratch() / "copy");
    for (const std::string& name : checkpoint.tensor_names()) {
      const pq::io::TensorView view = checkpoint.view(name);
      writer.add(name, view.info->dtype, view.info->shape, view.bytes);
    }
    writer.commit();
  }
  state.SetBytesProcessed(state.iterations() *
                          static_cast<std::int64_t>(checkpoint.total_tensor_bytes()));
  fs::remove_all(scratch());
}
BENCHMARK(BM_BaselineCopyAllTensors)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_Export(benchmark::State& state, const std::string& format) {
  fs::create_directories(scratch());
  pq::exporter::ExportJob job;
  job.model_dir = source_dir();
  job.assignment = write_uniform_assignment(format);
  job.out = scratch() / "out";
  job.force = true;
  for (auto _ : state) pq::exporter::run_export(job);
  state.SetBytesProcessed(
      state.iterations() *
      static_cast<std::int64_t>(pq::io::Checkpoint::open(source_dir()).total_tensor_bytes()));
  fs::remove_all(scratch());
}
BENCHMARK_CAPTURE(BM_Export, NVFP4A16, std::string("NVFP4A16"))
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_CAPTURE(BM_Export, MXFP8, std::string("MXFP8"))
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_CAPTURE(BM_Export, INT4_W4A16, std::string("INT4_W4A16"))
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
