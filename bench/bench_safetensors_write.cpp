// Write throughput of ShardedCheckpointWriter (tensor data staged in spool files, assembled with
// copy_file_range, fsynced, renamed) against a baseline that write()s the same bytes straight into
// the same number of files and fsyncs them, measured in the same run in the temp directory.
//
//   bench_safetensors_write [--gb=N] [benchmark flags]   (N: bytes written per iteration, default
//   1)
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "bench_size_arg.h"
#include "common/error.h"
#include "io/safetensors_writer.h"

namespace {

namespace fs = std::filesystem;

constexpr int kShards = 3;
// A 7B-class MLP projection in BF16 (11008 x 4096): 86 MiB per tensor.
constexpr std::int64_t kRows = 11008, kCols = 4096;
constexpr std::size_t kTensorBytes = kRows * kCols * 2;

std::uint64_t g_tensor_count = 0;
std::vector<std::uint8_t> g_tensor;

fs::path output_dir() {
  return fs::temp_directory_path() / fmt::format("pq-bench-write-{}", ::getpid());
}

void BM_PlainWrite(benchmark::State& state) {
  const auto dir = output_dir();
  for (auto _ : state) {
    fs::create_directories(dir);
    const std::uint64_t per_file = (g_tensor_count + kShards - 1) / kShards;
    std::uint64_t written = 0;
    for (int f = 0; f < kShards && written < g_tensor_count; ++f) {
      const auto path = dir / fmt::format("plain-{}.bin", f);
      const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      PQ_CHECK(fd >= 0, "{}: cannot create", path.string());
      for (std::uint64_t t = 0; t < per_file && written < g_tensor_count; ++t, ++written) {
        std::size_t done = 0;
        while (done < g_tensor.size()) {
          const ssize_t n = ::write(fd, g_tensor.data() + done, g_tensor.size() - done);
          PQ_CHECK(n > 0, "{}: write failed", path.string());
          done += static_cast<std::size_t>(n);
        }
      }
      PQ_CHECK(::fsync(fd) == 0 && ::close(fd) == 0, "{}: fsync failed", path.string());
    }
    state.PauseTiming();
    fs::remove_all(dir);
    state.ResumeTiming();
  }
  state.SetBytesProcessed(
      static_cast<std::int64_t>(state.iterations() * g_tensor_count * kTensorBytes));
}

void BM_ShardedCheckpointWriter(benchmark::State& state) {
  const auto dir = output_dir();
  const std::int64_t shape[] = {kRows, kCols};
  const std::uint64_t per_shard = (g_tensor_count + kShards - 1) / kShards;
  for (auto _ : state) {
    pq::io::ShardedCheckpointWriter writer(dir, {.max_shard_bytes = per_shard * kTensorBytes});
    for (std::uint64_t t = 0; t < g_tensor_count; ++t) {
      writer.add(fmt::format("model.layers.{}.mlp.up_proj.weight", t), pq::io::DType::BF16, shape,
                 g_tensor);
    }
    benchmark::DoNotOptimize(writer.commit());
    state.PauseTiming();
    fs::remove_all(dir);
    state.ResumeTiming();
  }
  state.SetBytesProcessed(
      static_cast<std::int64_t>(state.iterations() * g_tensor_count * kTensorBytes));
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<char*> args;
  int count = argc;
  const double gigabytes = take_gigabytes_arg(count, argv, args, 1.0);
  benchmark::Initialize(&count, args.data());
  g_tensor_count =
      std::max<std::uint64_t>(kShards, static_cast<std::uint64_t>(gigabytes * 1e9) / kTensorBytes);
  g_tensor.resize(kTensorBytes);
  std::mt19937 rng(1);
  for (auto& b : g_tensor) b = static_cast<std::uint8_t>(rng());
  benchmark::AddCustomContext("per_iteration", fmt::format("{} tensors of {} bytes in {} files",
                                                           g_tensor_count, kTensorBytes, kShards));
  for (const auto& [name, fn] :
       {std::pair{"PlainWrite", &BM_PlainWrite},
        std::pair{"ShardedCheckpointWriter", &BM_ShardedCheckpointWriter}}) {
    benchmark::RegisterBenchmark(name, fn)->Iterations(3)->UseRealTime()->Unit(
        benchmark::kMillisecond);
  }
  int status = 0;
  try {
    benchmark::RunSpecifiedBenchmarks();
  } catch (const pq::Error& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    status = 1;
  }
  std::error_code ec;
  fs::remove_all(output_dir(), ec);
  benchmark::Shutdown();
  return status;
}
