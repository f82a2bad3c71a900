// `epic bench-load`: how fast a checkpoint loads compared with reading its files. Reads every
// shard front to back the way `cat` does (the raw read rate), then loads every tensor onto the
// CPU backend in the checkpoint's dtype with the parallel loader, then reads the shards again;
// prints both rates and load / raw read (the second read is the one compared: by then both it and
// the load find the files in the page cache when they fit in memory).
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <set>
#include <thread>
#include <vector>

#include "kernels/backend.h"
#include "kernels/error.h"
#include "kernels/file_io.h"
#include "launch/backend_choice.h"
#include "launch/cli_commands.h"
#include "launch/flag_checks.h"
#include "worker/checkpoint.h"
#include "worker/weight_loader.h"
#include "worker/weight_source.h"

namespace epic::cli {
namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// read() through each file with one reused buffer, as cat does; returns the bytes read.
uint64_t read_files_like_cat(const std::vector<std::filesystem::path>& files) {
  constexpr size_t kBufferBytes = size_t{1} << 20;
  std::unique_ptr<char[]> buffer(new char[kBufferBytes]);
  uint64_t total = 0;
  for (const std::filesystem::path& path : files) {
    files::require_regular_file(path, "shard");
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) throw Error(ErrorCode::kIo, "cannot open " + path.string() + ": " + std::strerror(errno));
    for (;;) {
      const ssize_t got = ::read(fd, buffer.get(), kBufferBytes);
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) {
        const int saved = errno;
        ::close(fd);
        throw Error(ErrorCode::kIo, "cannot read " + path.string() + ": " + std::strerror(saved));
      }
      if (got == 0) break;
      total += static_cast<uint64_t>(got);
    }
    ::close(fd);
  }
  return total;
}

ScalarType loaded_type(DType stored) { return stored == DType::kBF16 ? ScalarType::kBF16 : ScalarType::kF32; }

}  // namespace

int bench_load_command(const BenchLoadArgs& args) {
  check_int_flag("--threads", args.threads, 0, kMaxThreads);
  Checkpoint checkpoint = Checkpoint::open(args.model_dir);
  std::set<std::string> shard_names;
  for (const std::string& name : checkpoint.tensor_names()) shard_names.insert(*checkpoint.shard_of(name));
  std::vector<std::filesystem::path> shard_paths;
  for (const std::string& shard : shard_names) shard_paths.push_back(checkpoint.directory() / shard);

  auto start = std::chrono::steady_clock::now();
  const uint64_t file_bytes = read_files_like_cat(shard_paths);
  const double first_read_seconds = seconds_since(start);

  auto source = open_checkpoint_source(args.model_dir);
  ChosenBackend chosen = choose_backend({args.backend, args.device, "auto"}, launcher_local_rank(), 1);
  Backend* backend = chosen.backend.get();
  std::vector<OwnedTensor> tensors;
  std::vector<TensorLoad> loads;
  start = std::chrono::steady_clock::now();
  for (const std::string& name : checkpoint.tensor_names()) {
    const TensorInfo& info = source->info(name);
    // One flat destination per tensor: the loader checks the shape against the checkpoint's own.
    tensors.push_back(backend->new_tensor(loaded_type(info.dtype), {info.num_elements()}));
    loads.push_back({name, info.shape, tensors.back().view(), 0});
  }
  WeightLoadOptions options;
  options.num_threads = args.threads;
  options.allow_nonfinite_weights = args.allow_nonfinite_weights;
  const WeightLoadStats stats = load_tensors(*source, *backend, loads, options);
  backend->synchronize();  // a device's copies are asynchronous: the load ends when they have landed
  const double load_seconds =
      seconds_since(start);  // allocation (page faults) included: it is part of loading

  start = std::chrono::steady_clock::now();
  read_files_like_cat(shard_paths);
  const double raw_seconds = seconds_since(start);

  const double raw_rate = file_bytes / 1e9 / raw_seconds;
  const double load_rate = stats.bytes_read / 1e9 / load_seconds;
  std::printf("checkpoint %s: %zu tensors in %zu shard(s), %.3f GB of files, %.3f GB of tensor data\n",
              args.model_dir.c_str(), loads.size(), shard_paths.size(), file_bytes / 1e9,
              stats.bytes_read / 1e9);
  std::printf("raw read (cat-like, 1 thread): first %.2f GB/s (%.3f s), again %.2f GB/s (%.3f s)\n",
              file_bytes / 1e9 / first_read_seconds, first_read_seconds, raw_rate, raw_seconds);
  std::printf("load onto %s (checkpoint dtype, %d threads): %.2f GB/s (%.3f s, %.3f GB written)\n",
              chosen.description.c_str(),
              options.num_threads > 0
                  ? options.num_threads
                  : static_cast<int>(std::min(8u, std::max(1u, std::thread::hardware_concurrency()))),
              load_rate, load_seconds, stats.bytes_written / 1e9);
  std::printf("load / raw read: %.2f\n", load_rate / raw_rate);
  return 0;
}

}  // namespace epic::cli
