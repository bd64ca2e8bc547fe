// Read throughput of the safetensors reader against a plain sequential read() of the same files,
// measured in the same run on a synthetic ~3 GB, 3-shard BF16 checkpoint written to the temp
// directory (removed at exit). "cold" runs evict the files from the page cache before every
// iteration (posix_fadvise DONTNEED, timing paused); "warm" runs read them from the page cache.
//
//   bench_safetensors_read [--gb=N] [benchmark flags]   (N: checkpoint size in GB, default 3)
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
#include "io/safetensors.h"
#include "io/safetensors_writer.h"

namespace {

namespace fs = std::filesystem;
using pq::io::Checkpoint;

fs::path g_checkpoint_dir;
std::vector<fs::path> g_files;
std::uint64_t g_file_bytes = 0;

// One decoder layer of a 7B-class Llama (hidden 4096, MLP 11008): ~386 MiB of BF16.
struct LayerShape {
  const char* name;
  std::int64_t rows, cols;
};
constexpr LayerShape kLayer[] = {{"self_attn.q_proj", 4096, 4096}, {"self_attn.k_proj", 4096, 4096},
                                 {"self_attn.v_proj", 4096, 4096}, {"self_attn.o_proj", 4096, 4096},
                                 {"mlp.gate_proj", 11008, 4096},   {"mlp.up_proj", 11008, 4096},
                                 {"mlp.down_proj", 4096, 11008},   {"input_layernorm", 1, 4096}};

void write_checkpoint(std::uint64_t target_bytes) {
  g_checkpoint_dir = fs::temp_directory_path() / fmt::format("pq-bench-read-{}", ::getpid());
  std::uint64_t layer_bytes = 0;
  std::uint64_t largest_tensor = 0;
  for (const auto& t : kLayer) {
    const auto nbytes = static_cast<std::uint64_t>(t.rows * t.cols * 2);
    layer_bytes += nbytes;
    largest_tensor = std::max(largest_tensor, nbytes);
  }
  const std::uint64_t layers =
      std::max<std::uint64_t>(1, (target_bytes + layer_bytes / 2) / layer_bytes);
  // Greedy filling closes a shard only once it holds more than total/3 bytes, so this limit
  // gives three shards.
  pq::io::ShardedCheckpointWriter writer(
      g_checkpoint_dir, {.max_shard_bytes = layers * layer_bytes / 3 + largest_tensor});
  std::vector<std::uint16_t> values(11008 * 4096);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  for (auto& v : values) {
    const float f = normal(rng);
    std::uint32_t bits;
    std::memcpy(&bits, &f, 4);
    v = static_cast<std::uint16_t>(bits >> 16);
  }
  for (std::uint64_t layer = 0; layer < layers; ++layer) {
    for (const auto& t : kLayer) {
      const std::int64_t shape[] = {t.rows, t.cols};
      const auto nbytes = static_cast<std::size_t>(t.rows * t.cols * 2);
      writer.add(fmt::format("model.layers.{}.{}.weight", layer, t.name), pq::io::DType::BF16,
                 shape, {reinterpret_cast<const std::uint8_t*>(values.data()), nbytes});
    }
  }
  for (const auto& name : writer.commit()) {
    g_files.push_back(g_checkpoint_dir / name);
    g_file_bytes += fs::file_size(g_files.back());
  }
}

void evict_page_cache() {
  for (const auto& path : g_files) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    PQ_CHECK(fd >= 0, "{}: cannot open", path.string());
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
  }
}

// Reads every file once so a warm run starts with all of it in the page cache.
void load_page_cache() {
  std::vector<std::uint8_t> buffer(8u << 20);
  for (const auto& path : g_files) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    PQ_CHECK(fd >= 0, "{}: cannot open", path.string());
    while (::read(fd, buffer.data(), buffer.size()) > 0) {
    }
    ::close(fd);
  }
}

void prepare_run(bool cold) {
  if (!cold) load_page_cache();
}

void prepare_iteration(benchmark::State& state, bool cold) {
  if (!cold) return;
  state.PauseTiming();
  evict_page_cache();
  state.ResumeTiming();
}

// Baseline: read() every file front to back into one 8 MiB buffer.
void BM_SequentialRead(benchmark::State& state) {
  const bool cold = state.range(0) != 0;
  prepare_run(cold);
  std::vector<std::uint8_t> buffer(8u << 20);
  for (auto _ : state) {
    prepare_iteration(state, cold);
    for (const auto& path : g_files) {
      const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
      PQ_CHECK(fd >= 0, "{}: cannot open", path.string());
      ssize_t n;
      while ((n = ::read(fd, buffer.data(), buffer.size())) > 0) {
        benchmark::DoNotOptimize(buffer.data());
      }
      ::close(fd);
      PQ_CHECK(n == 0, "{}: read failed", path.string());
    }
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * g_file_bytes));
}

// Checkpoint, tensor by tensor: open (parse and validate headers), then sum every 8-byte word of
// each tensor's mapped bytes and release its pages.
void BM_CheckpointChecksum(benchmark::State& state) {
  const bool cold = state.range(0) != 0;
  prepare_run(cold);
  for (auto _ : state) {
    prepare_iteration(state, cold);
    const auto ckpt = Checkpoint::open(g_checkpoint_dir);
    std::uint64_t sum = 0;
    for (const auto& name : ckpt.tensor_names()) {
      const auto bytes = ckpt.view(name).bytes;
      std::size_t i = 0;
      for (; i + 8 <= bytes.size(); i += 8) {
        std::uint64_t word;
        std::memcpy(&word, bytes.data() + i, 8);
        sum += word;
      }
      for (; i < bytes.size(); ++i) sum += bytes[i];
      ckpt.release(name);
    }
    benchmark::DoNotOptimize(sum);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * g_file_bytes));
}

// Checkpoint, tensor by tensor: decode every BF16 tensor to float32 (what the probe stage does).
void BM_CheckpointDecodeF32(benchmark::State& state) {
  const bool cold = state.range(0) != 0;
  prepare_run(cold);
  std::vector<float> values;
  for (auto _ : state) {
    prepare_iteration(state, cold);
    const auto ckpt = Checkpoint::open(g_checkpoint_dir);
    for (const auto& name : ckpt.tensor_names()) {
      const auto view = ckpt.view(name);
      values.resize(static_cast<std::size_t>(view.info->numel()));
      pq::io::decode_to_f32(view.info->dtype, view.bytes, values);
      benchmark::DoNotOptimize(values.data());
      ckpt.release(name);
    }
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * g_file_bytes));
}

void register_benchmarks() {
  for (const auto& [name, fn] : {std::pair{"SequentialRead", &BM_SequentialRead},
                                 std::pair{"CheckpointChecksum", &BM_CheckpointChecksum},
                                 std::pair{"CheckpointDecodeF32", &BM_CheckpointDecodeF32}}) {
    benchmark::RegisterBenchmark((std::string(name) + "/cold").c_str(), fn)
        ->Arg(1)
        ->Iterations(3)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark((std::string(name) + "/warm").c_str(), fn)
        ->Arg(0)
        ->Iterations(5)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<char*> args;
  int count = argc;
  const double gigabytes = take_gigabytes_arg(count, argv, args, 3.0);
  benchmark::Initialize(&count, args.data());
  int status = 0;
  try {
    write_checkpoint(static_cast<std::uint64_t>(gigabytes * 1e9));
    benchmark::AddCustomContext("checkpoint",
                                fmt::format("{} files, {} bytes", g_files.size(), g_file_bytes));
    register_benchmarks();
    benchmark::RunSpecifiedBenchmarks();
  } catch (const pq::Error& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    status = 1;
  }
  std::error_code ec;
  fs::remove_all(g_checkpoint_dir, ec);
  benchmark::Shutdown();
  return status;
}
