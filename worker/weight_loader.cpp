// The parallel weight loader. Every load is validated on the calling thread first; then reader
// threads take element-aligned chunks from one queue in file order and read each in pieces of
// 256 KiB, converting and NaN/Inf-checking every piece while it is still in cache (one pass
// over memory). Host backends get the bytes written straight to their destination. Device
// backends get them through pinned staging buffers: readers fill them, and the calling thread
// alone talks to the backend (copy_from_host, synchronize), so a backend need not be thread-safe
// and a CUDA backend's device stays current on the one thread that uses it.
#include "worker/weight_loader.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <numeric>
#include <thread>

#include "kernels/error.h"

namespace epic {
namespace {

// Conversions run and are checked a piece at a time, small enough to stay in L2 between the read,
// the conversion and the check.
constexpr size_t kPieceBytes = size_t{1} << 18;
// Fixed-length inner blocks: GCC vectorises these loops at -O2 (loops of unknown length it does not).
constexpr size_t kBlock = 64;

enum class Conversion { kNone, kBf16ToF32, kF16ToF32, kF32ToBf16, kF16ToBf16 };

// One validated load, with what the threads need copied out of the source (they never call info()).
struct Job {
  const TensorLoad* load;
  DType source_type;
  std::vector<int64_t> shape;
  uint64_t num_elements;
  size_t source_element_size;
  size_t dst_element_size;
  Conversion conversion;
  std::string location;
  uint64_t file_offset;  // for ordering reads by position in the file
};

struct Chunk {
  size_t job;
  uint64_t first_element;
  size_t num_elements;
};

// f32_to_bf16 without branches (same results, NaN quietened), so the loop below vectorises.
inline uint16_t round_to_bf16(uint32_t bits) {
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (bits >> 16) | 0x0040u;
  return static_cast<uint16_t>((bits & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded);
}

template <class In, class Out, class Convert>
void convert_blocks(const In* in, Out* out, size_t count, Convert convert) {
  size_t i = 0;
  for (; i + kBlock <= count; i += kBlock)
    for (size_t j = 0; j < kBlock; ++j) out[i + j] = convert(in[i + j]);
  for (; i < count; ++i) out[i] = convert(in[i]);
}

void convert(Conversion conversion, const void* source, void* out, size_t count) {
  const auto* halves = static_cast<const uint16_t*>(source);
  switch (conversion) {
    case Conversion::kNone:
      return;
    case Conversion::kBf16ToF32:
      convert_blocks(halves, static_cast<uint32_t*>(out), count,
                     [](uint16_t h) { return static_cast<uint32_t>(h) << 16; });
      return;
    case Conversion::kF16ToF32:
      convert_blocks(halves, static_cast<float*>(out), count, [](uint16_t h) { return f16_to_f32(h); });
      return;
    case Conversion::kF32ToBf16:
      convert_blocks(static_cast<const uint32_t*>(source), static_cast<uint16_t*>(out), count, round_to_bf16);
      return;
    case Conversion::kF16ToBf16:
      convert_blocks(halves, static_cast<uint16_t*>(out), count,
                     [](uint16_t h) { return round_to_bf16(std::bit_cast<uint32_t>(f16_to_f32(h))); });
      return;
  }
}

// A value is NaN or Inf exactly when its exponent is all ones, i.e. when adding one exponent ulp
// to its magnitude carries into the sign bit; OR-ing those sums over the piece is one cheap pass.
bool has_non_finite(const void* values, size_t count, size_t element_size) {
  size_t i = 0;
  if (element_size == 4) {
    const auto* bits = static_cast<const uint32_t*>(values);
    uint32_t carries = 0;
    for (; i + kBlock <= count; i += kBlock)
      for (size_t j = 0; j < kBlock; ++j) carries |= (bits[i + j] & 0x7FFFFFFFu) + 0x00800000u;
    for (; i < count; ++i) carries |= (bits[i] & 0x7FFFFFFFu) + 0x00800000u;
    return (carries & 0x80000000u) != 0;
  }
  const auto* bits = static_cast<const uint16_t*>(values);  // bf16: the destinations are F32 or BF16
  uint16_t carries = 0;
  for (; i + kBlock <= count; i += kBlock)
    for (size_t j = 0; j < kBlock; ++j) carries |= static_cast<uint16_t>((bits[i + j] & 0x7FFFu) + 0x0080u);
  for (; i < count; ++i) carries |= static_cast<uint16_t>((bits[i] & 0x7FFFu) + 0x0080u);
  return (carries & 0x8000u) != 0;
}

float source_value(DType type, const void* values, size_t index) {
  if (type == DType::kF32) return static_cast<const float*>(values)[index];
  const uint16_t half = static_cast<const uint16_t*>(values)[index];
  return type == DType::kBF16 ? bf16_to_f32(half) : f16_to_f32(half);
}

std::string value_kind(float value) { return std::isnan(value) ? "NaN" : value > 0 ? "+Inf" : "-Inf"; }

// Names the first non-finite element of a piece that has one (source holds the stored values,
// out the converted ones: a finite F32 past the bf16 range rounds to Inf).
[[noreturn]] void throw_non_finite(const Job& job, uint64_t piece_first, const void* source, const void* out,
                                   size_t count) {
  size_t bad = 0;
  for (; bad < count; ++bad) {
    const bool out_finite = job.dst_element_size == 4
                                ? std::isfinite(static_cast<const float*>(out)[bad])
                                : (static_cast<const uint16_t*>(out)[bad] & 0x7F80u) != 0x7F80u;
    if (!out_finite) break;
  }
  const float stored = source_value(job.source_type, source, bad);
  std::string what = "is " + value_kind(stored);
  if (std::isfinite(stored)) {
    char text[32];
    std::snprintf(text, sizeof(text), "%g", stored);
    what = std::string("is ") + text + ", which rounds to Inf in bf16";
  }
  throw Error(
      ErrorCode::kInvalidCheckpoint,
      "tensor '" + job.load->name + "' in " + job.location + " (" + dtype_name(job.source_type) + ", shape " +
          shape_to_string(job.shape) + ") holds non-finite weights: element " +
          std::to_string(piece_first + bad) + " (flat index, of " + std::to_string(job.num_elements) + ") " +
          what +
          ", which would turn every output it reaches into NaN or Inf; re-export the checkpoint, or pass "
          "--allow-nonfinite-weights to load it anyway");
}

ScalarType storage_scalar(DType type) { return type == DType::kF32 ? ScalarType::kF32 : ScalarType::kBF16; }

Job validate(WeightSource& source, Backend& backend, const TensorLoad& load) {
  const TensorInfo& info = source.info(load.name);  // throws for an absent tensor or a broken shard
  const std::string location = source.location_of(load.name);
  if (info.shape != load.expected_shape || !dtype_is_float_storage(info.dtype)) {
    throw Error(
        ErrorCode::kInvalidCheckpoint,
        location + ": tensor '" + load.name + "' has shape " + shape_to_string(info.shape) + " and dtype " +
            dtype_name(info.dtype) + ", but the model config expects shape " +
            shape_to_string(load.expected_shape) +
            " of F32, F16 or BF16; check config.json against the checkpoint (is it this model's config?)");
  }
  const Tensor& dst = load.dst;
  EPIC_CHECK(
      dst.type == ScalarType::kF32 || dst.type == ScalarType::kBF16, ErrorCode::kInvalidArgument,
      "tensor '" + load.name + "' is loaded into " + dst.describe() + ", but weights load as f32 or bf16");
  EPIC_CHECK(dst.space == backend.memory_space(), ErrorCode::kInvalidArgument,
             "tensor '" + load.name + "' is loaded into " + dst.describe() + ", which is not " +
                 backend.name() + " memory");
  Job job{&load,
          info.dtype,
          info.shape,
          static_cast<uint64_t>(info.num_elements()),
          dtype_size(info.dtype),
          scalar_size(dst.type),
          Conversion::kNone,
          location,
          info.data_begin};
  const uint64_t dst_bytes = job.num_elements * job.dst_element_size;
  EPIC_CHECK(load.dst_offset <= dst.bytes() && dst_bytes <= dst.bytes() - load.dst_offset,
             ErrorCode::kInvalidArgument,
             "tensor '" + load.name + "' (" + std::to_string(dst_bytes) + " bytes as " +
                 scalar_name(dst.type) + ") does not fit at byte offset " + std::to_string(load.dst_offset) +
                 " of " + dst.describe() + " (" + std::to_string(dst.bytes()) + " bytes)");
  EPIC_CHECK(load.dst_offset % job.dst_element_size == 0, ErrorCode::kInvalidArgument,
             "tensor '" + load.name + "' is loaded at byte offset " + std::to_string(load.dst_offset) +
                 " of " + dst.describe() + ", which is not a multiple of " +
                 std::to_string(job.dst_element_size) + " (elements must stay aligned)");
  EPIC_CHECK(dst.data != nullptr || dst_bytes == 0, ErrorCode::kInvalidArgument,
             "tensor '" + load.name + "' is loaded into a tensor with no memory");
  if (storage_scalar(info.dtype) != dst.type || info.dtype == DType::kF16) {
    job.conversion = dst.type == ScalarType::kF32
                         ? (info.dtype == DType::kBF16 ? Conversion::kBf16ToF32 : Conversion::kF16ToF32)
                         : (info.dtype == DType::kF32 ? Conversion::kF32ToBf16 : Conversion::kF16ToBf16);
  }
  return job;
}

// Reads, converts and checks one chunk into out (the destination itself, or a staging buffer).
class ChunkReader {
 public:
  ChunkReader(const WeightSource& source, const std::vector<Job>& jobs, bool check_finite)
      : source_(source), jobs_(jobs), check_finite_(check_finite) {}

  void read(const Chunk& chunk, uint8_t* out) {
    const Job& job = jobs_[chunk.job];
    const size_t piece_elements =
        std::max<size_t>(1, kPieceBytes / std::max(job.source_element_size, job.dst_element_size));
    for (size_t done = 0; done < chunk.num_elements; done += piece_elements) {
      const size_t count = std::min(piece_elements, chunk.num_elements - done);
      const uint64_t first = chunk.first_element + done;
      uint8_t* piece_out = out + done * job.dst_element_size;
      const uint8_t* stored = piece_out;
      if (job.conversion == Conversion::kNone) {
        source_.read(job.load->name, first * job.source_element_size, count * job.source_element_size,
                     piece_out);
      } else {
        // Uninitialised on purpose: zeroing a buffer that is overwritten at once is the cost this loader
        // removes.
        if (!raw_) raw_.reset(new uint8_t[kPieceBytes]);
        source_.read(job.load->name, first * job.source_element_size, count * job.source_element_size,
                     raw_.get());
        convert(job.conversion, raw_.get(), piece_out, count);
        stored = raw_.get();
      }
      if (check_finite_ && has_non_finite(piece_out, count, job.dst_element_size))
        throw_non_finite(job, first, stored, piece_out, count);
    }
  }

 private:
  const WeightSource& source_;
  const std::vector<Job>& jobs_;
  bool check_finite_;
  std::unique_ptr<uint8_t[]> raw_;
};

// The first error of any thread, and a flag that tells the others to stop taking work.
class FirstError {
 public:
  void record(std::exception_ptr error) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!error_) error_ = error;
    failed_.store(true);
  }
  bool failed() const { return failed_.load(); }
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::mutex mutex_;
  std::exception_ptr error_;
  std::atomic<bool> failed_{false};
};

uint8_t* destination_of(const Job& job, const Chunk& chunk) {
  return static_cast<uint8_t*>(job.load->dst.data) + job.load->dst_offset +
         chunk.first_element * job.dst_element_size;
}

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; older kernels answer EINVAL and the pages fault in one by one
#endif

// Fresh host memory costs a page fault per page on first write, taken inside pread: measured on a
// Firecracker VM, 0.2 GB/s (20 us a fault), against 4.4 GB/s for the same pages populated in one
// madvise. So the pages of each chunk's destination are populated first. It changes no byte
// (pages already present stay as they are), so partial pages shared with other tensors are fine;
// failure (old kernel, memory that is not anonymous) only means the faults happen in pread.
void populate_pages(void* begin, size_t bytes) {
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  if (bytes == 0) return;
  const uintptr_t first = reinterpret_cast<uintptr_t>(begin) & ~(page - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(begin) + bytes + page - 1) & ~(page - 1);
  (void)::madvise(reinterpret_cast<void*>(first), end - first, MADV_POPULATE_WRITE);
}

// Host memory: every thread (the caller too) reads its chunks straight into the destination.
void load_into_host(const WeightSource& source, const std::vector<Job>& jobs,
                    const std::vector<Chunk>& chunks, int num_threads, bool check_finite) {
  std::atomic<size_t> next_chunk{0};
  FirstError first_error;
  auto read_chunks = [&] {
    try {
      ChunkReader reader(source, jobs, check_finite);
      while (!first_error.failed()) {
        const size_t index = next_chunk.fetch_add(1);
        if (index >= chunks.size()) break;
        const Chunk& chunk = chunks[index];
        uint8_t* destination = destination_of(jobs[chunk.job], chunk);
        populate_pages(destination, chunk.num_elements * jobs[chunk.job].dst_element_size);
        reader.read(chunk, destination);
      }
    } catch (...) {
      first_error.record(std::current_exception());
    }
  };
  std::vector<std::thread> threads;
  for (int t = 1; t < num_threads; ++t) threads.emplace_back(read_chunks);
  read_chunks();
  for (std::thread& thread : threads) thread.join();
  first_error.rethrow();
}

// Device memory: readers fill staging buffers from a free list; the calling thread copies every
// filled buffer to the device, then synchronises once per batch and returns the batch to the free
// list (Backend has no per-copy fence; a batch holds up to one buffer per reader, and the readers
// keep filling the other half of the buffers while it copies).
void load_through_staging(const WeightSource& source, Backend& backend, const std::vector<Job>& jobs,
                          const std::vector<Chunk>& chunks, int num_threads, bool check_finite,
                          size_t staging_bytes) {
  std::vector<std::unique_ptr<Buffer>> staging;
  std::vector<Buffer*> free_buffers;
  for (int i = 0; i < 2 * num_threads; ++i) {
    staging.push_back(backend.allocate_staging(staging_bytes));
    free_buffers.push_back(staging.back().get());
  }
  struct Filled {
    Buffer* buffer;
    size_t chunk;
  };
  std::mutex mutex;
  std::condition_variable buffer_freed, buffer_filled;
  std::deque<Filled> filled;
  size_t next_chunk = 0;
  int readers_running = num_threads;
  FirstError first_error;

  auto read_chunks = [&] {
    try {
      ChunkReader reader(source, jobs, check_finite);
      for (;;) {
        Buffer* buffer;
        size_t index;
        {
          std::unique_lock<std::mutex> lock(mutex);
          buffer_freed.wait(lock, [&] {
            return !free_buffers.empty() || next_chunk >= chunks.size() || first_error.failed();
          });
          if (first_error.failed() || next_chunk >= chunks.size()) break;
          buffer = free_buffers.back();
          free_buffers.pop_back();
          index = next_chunk++;
        }
        reader.read(chunks[index], static_cast<uint8_t*>(buffer->data()));
        std::lock_guard<std::mutex> lock(mutex);
        filled.push_back({buffer, index});
        buffer_filled.notify_one();
      }
    } catch (...) {
      first_error.record(std::current_exception());
    }
    std::lock_guard<std::mutex> lock(mutex);
    --readers_running;
    buffer_filled.notify_one();
    buffer_freed.notify_all();  // a failed reader wakes the others so they stop
  };

  std::vector<std::thread> threads;
  for (int t = 0; t < num_threads; ++t) threads.emplace_back(read_chunks);
  try {
    for (;;) {
      std::vector<Filled> batch;
      {
        std::unique_lock<std::mutex> lock(mutex);
        buffer_filled.wait(lock,
                           [&] { return !filled.empty() || readers_running == 0 || first_error.failed(); });
        if (first_error.failed() || (filled.empty() && readers_running == 0)) break;
        batch.assign(filled.begin(), filled.end());
        filled.clear();
      }
      for (const Filled& item : batch) {
        const Chunk& chunk = chunks[item.chunk];
        const Job& job = jobs[chunk.job];
        backend.copy_from_host(job.load->dst,
                               job.load->dst_offset + chunk.first_element * job.dst_element_size,
                               item.buffer->data(), chunk.num_elements * job.dst_element_size);
      }
      backend.synchronize();  // the batch's buffers may be refilled only once their copies are done
      std::lock_guard<std::mutex> lock(mutex);
      for (const Filled& item : batch) free_buffers.push_back(item.buffer);
      buffer_freed.notify_all();
    }
  } catch (...) {
    first_error.record(std::current_exception());
    std::lock_guard<std::mutex> lock(mutex);
    buffer_freed.notify_all();
  }
  for (std::thread& thread : threads) thread.join();
  // No copy may still read a staging buffer when it is freed, error or not.
  if (first_error.failed()) {
    try {
      backend.synchronize();
    } catch (...) {
      // the first error is the one to report
    }
  }
  first_error.rethrow();
}

}  // namespace

WeightLoadStats load_tensors(WeightSource& source, Backend& backend, const std::vector<TensorLoad>& loads,
                             const WeightLoadOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  EPIC_CHECK(options.chunk_bytes > 0, ErrorCode::kInvalidArgument,
             "WeightLoadOptions::chunk_bytes must be positive");
  std::vector<Job> jobs;
  jobs.reserve(loads.size());
  for (const TensorLoad& load : loads) jobs.push_back(validate(source, backend, load));

  // Chunks in file order (shard, then offset), so the threads together read each file front to
  // back and the kernel's readahead keeps up.
  std::vector<size_t> order(jobs.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    if (jobs[a].location != jobs[b].location) return jobs[a].location < jobs[b].location;
    return jobs[a].file_offset < jobs[b].file_offset;
  });
  WeightLoadStats stats;
  std::vector<Chunk> chunks;
  size_t largest_chunk_bytes = 0;
  for (size_t index : order) {
    const Job& job = jobs[index];
    const uint64_t chunk_elements =
        std::max<uint64_t>(1, options.chunk_bytes / std::max(job.source_element_size, job.dst_element_size));
    for (uint64_t first = 0; first < job.num_elements; first += chunk_elements) {
      const size_t count = static_cast<size_t>(std::min(chunk_elements, job.num_elements - first));
      chunks.push_back({index, first, count});
      largest_chunk_bytes = std::max(largest_chunk_bytes, count * job.dst_element_size);
    }
    stats.bytes_read += job.num_elements * job.source_element_size;
    stats.bytes_written += job.num_elements * job.dst_element_size;
  }

  int num_threads = options.num_threads > 0
                        ? options.num_threads
                        : static_cast<int>(std::min(8u, std::max(1u, std::thread::hardware_concurrency())));
  num_threads = static_cast<int>(
      std::min<size_t>(static_cast<size_t>(num_threads), std::max<size_t>(chunks.size(), 1)));
  const bool check_finite = !options.allow_nonfinite_weights;
  if (!chunks.empty()) {
    if (backend.memory_space() == MemorySpace::kHost) {
      load_into_host(source, jobs, chunks, num_threads, check_finite);
    } else {
      load_through_staging(source, backend, jobs, chunks, num_threads, check_finite, largest_chunk_bytes);
    }
  }
  stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return stats;
}

}  // namespace epic
