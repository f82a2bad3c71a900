// The two weight sources: a checkpoint read with positioned reads on one descriptor per shard
// (many threads at once, no open() per read), and random weights drawn per requested byte range.
#include "worker/weight_source.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <map>

#include "kernels/error.h"
#include "worker/model_tensors.h"
#include "worker/random_values.h"

namespace epic {
namespace {

[[noreturn]] void throw_read_outside(const std::string& description, const std::string& name, uint64_t offset,
                                     uint64_t size, uint64_t tensor_bytes) {
  throw Error(ErrorCode::kInvalidArgument,
              "read of bytes [" + std::to_string(offset) + ", " + std::to_string(offset + size) +
                  ") of tensor '" + name + "' in " + description + ", which has " +
                  std::to_string(tensor_bytes) + " bytes; read inside the tensor");
}

// True when [offset, offset + size) lies inside [0, total), without overflow.
bool range_inside(uint64_t offset, uint64_t size, uint64_t total) {
  return offset <= total && size <= total - offset;
}

// One shard file held open for the loader's whole run: reads are pread()s, which share no file
// position, so any number of threads may read through the one descriptor.
class OpenShard {
 public:
  OpenShard(const std::filesystem::path& path, uint64_t min_size) : path_(path) {
    do {
      fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    } while (fd_ < 0 && errno == EINTR);
    if (fd_ < 0) throw Error(ErrorCode::kIo, "cannot open " + path.string() + ": " + std::strerror(errno));
    struct stat status {};
    if (::fstat(fd_, &status) != 0 || !S_ISREG(status.st_mode) ||
        static_cast<uint64_t>(status.st_size) < min_size) {
      ::close(fd_);
      throw Error(ErrorCode::kIo,
                  path.string() +
                      " changed after its header was read (it is no longer a regular file of at "
                      "least " +
                      std::to_string(min_size) + " bytes); reload the model");
    }
  }
  ~OpenShard() { ::close(fd_); }
  OpenShard(const OpenShard&) = delete;
  OpenShard& operator=(const OpenShard&) = delete;

  void read_exact(void* dst, uint64_t size, uint64_t file_offset) const {
    auto* out = static_cast<uint8_t*>(dst);
    uint64_t done = 0;
    while (done < size) {
      const size_t piece = static_cast<size_t>(std::min<uint64_t>(size - done, uint64_t{1} << 30));
      const ssize_t got = ::pread(fd_, out + done, piece, static_cast<off_t>(file_offset + done));
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) {
        const std::string cause = got < 0 ? std::strerror(errno) : "unexpected end of file (did it shrink?)";
        throw Error(ErrorCode::kIo, "cannot read " + std::to_string(size) + " bytes at offset " +
                                        std::to_string(file_offset) + " of " + path_.string() + ": " + cause);
      }
      done += static_cast<uint64_t>(got);
    }
  }

 private:
  std::filesystem::path path_;
  int fd_ = -1;
};

class CheckpointSource final : public WeightSource {
 public:
  explicit CheckpointSource(const std::filesystem::path& model_dir)
      : checkpoint_(Checkpoint::open(model_dir)) {}

  std::string description() const override { return "checkpoint " + checkpoint_.directory().string(); }
  bool contains(const std::string& name) const override { return checkpoint_.contains(name); }

  std::string location_of(const std::string& name) const override {
    const std::optional<std::string> shard = checkpoint_.shard_of(name);
    if (!shard) return "no shard of " + checkpoint_.directory().string() + " (the index does not name it)";
    return "shard " + *shard + " in " + checkpoint_.directory().string();
  }

  const TensorInfo& info(const std::string& name) override {
    const TensorInfo& tensor = checkpoint_.info(name);
    if (!readable_.count(name)) {
      const std::string shard_name = *checkpoint_.shard_of(name);
      auto shard = shards_.find(shard_name);
      if (shard == shards_.end()) {
        // Checkpoint validated the header (every tensor inside the file); the descriptor is opened
        // after, so a file swapped in between must at least be as long as this tensor's end.
        shard = shards_
                    .emplace(shard_name, std::make_unique<OpenShard>(checkpoint_.directory() / shard_name,
                                                                     tensor.data_end))
                    .first;
      }
      readable_.emplace(name, Readable{&tensor, shard->second.get()});
    }
    return tensor;
  }

  void read(const std::string& name, uint64_t offset, uint64_t size, void* dst) const override {
    auto it = readable_.find(name);
    if (it == readable_.end())
      throw Error(ErrorCode::kInvalidArgument,
                  "tensor '" + name + "' of " + description() + " was read before info() was called for it");
    const TensorInfo& tensor = *it->second.tensor;
    if (!range_inside(offset, size, tensor.num_bytes()))
      throw_read_outside(description(), name, offset, size, tensor.num_bytes());
    if (size == 0) return;
    it->second.shard->read_exact(dst, size, tensor.data_begin + offset);
    bytes_read_.fetch_add(size, std::memory_order_relaxed);
  }

  uint64_t bytes_read() const override { return bytes_read_.load(std::memory_order_relaxed); }

 private:
  struct Readable {
    const TensorInfo* tensor;  // owned by checkpoint_'s open shard, stable once opened
    const OpenShard* shard;
  };
  Checkpoint checkpoint_;
  std::map<std::string, std::unique_ptr<OpenShard>> shards_;  // by shard file name
  std::map<std::string, Readable> readable_;                  // filled by info(), read-only after
  mutable std::atomic<uint64_t> bytes_read_{0};
};

// Stores f32 values as make-model does (SafetensorsWriter::add_f32): F32 as is, F16/BF16 rounded to
// nearest even.
void store_values(const float* values, size_t count, DType storage, uint8_t* out) {
  if (storage == DType::kF32) {
    std::memcpy(out, values, count * sizeof(float));
    return;
  }
  for (size_t i = 0; i < count; ++i) {
    const uint16_t half = storage == DType::kBF16 ? f32_to_bf16(values[i]) : f32_to_f16(values[i]);
    std::memcpy(out + 2 * i, &half, 2);
  }
}

class RandomSource final : public WeightSource {
 public:
  RandomSource(const ModelConfig& config, DType storage, uint64_t seed, std::string description)
      : storage_(storage), seed_(seed), description_(std::move(description)) {
    EPIC_CHECK(dtype_is_float_storage(storage), ErrorCode::kInvalidArgument,
               "random weights are stored as F32, F16 or BF16, not " + std::string(dtype_name(storage)));
    for (ModelTensorSpec& spec : model_tensor_specs(config)) {
      RandomTensor tensor;
      tensor.info.name = spec.name;
      tensor.info.dtype = storage;
      tensor.info.shape = spec.shape;
      tensor.info.data_end = static_cast<uint64_t>(tensor.info.num_elements()) * dtype_size(storage);
      tensor.init = spec.init;
      const std::string name = spec.name;
      tensors_.emplace(name, std::move(tensor));
    }
  }

  std::string description() const override { return description_; }
  bool contains(const std::string& name) const override { return tensors_.count(name) > 0; }
  std::string location_of(const std::string& /*name*/) const override { return description_; }

  const TensorInfo& info(const std::string& name) override { return find(name).info; }

  void read(const std::string& name, uint64_t offset, uint64_t size, void* dst) const override {
    const RandomTensor& tensor = find(name);
    if (!range_inside(offset, size, tensor.info.num_bytes()))
      throw_read_outside(description_, name, offset, size, tensor.info.num_bytes());
    // Draw whole elements a block at a time (bounded memory, any range size), and copy out the
    // requested bytes of them: a range may start or end inside an element.
    constexpr size_t kBlockElements = 4096;
    float values[kBlockElements];
    uint8_t stored[kBlockElements * sizeof(float)];
    const size_t element_size = dtype_size(storage_);
    auto* out = static_cast<uint8_t*>(dst);
    uint64_t position = offset;
    const uint64_t end = offset + size;
    while (position < end) {
      const uint64_t first = position / element_size;
      const uint64_t last = std::min<uint64_t>((end - 1) / element_size + 1, first + kBlockElements);
      const size_t count = static_cast<size_t>(last - first);
      random_tensor_values_range(name, tensor.info.shape, tensor.init, seed_, first, count, values);
      store_values(values, count, storage_, stored);
      const uint64_t block_end = std::min(end, last * element_size);
      const size_t skip = static_cast<size_t>(position - first * element_size);
      std::memcpy(out, stored + skip, static_cast<size_t>(block_end - position));
      out += block_end - position;
      position = block_end;
    }
    bytes_read_.fetch_add(size, std::memory_order_relaxed);
  }

  uint64_t bytes_read() const override { return bytes_read_.load(std::memory_order_relaxed); }

 private:
  struct RandomTensor {
    TensorInfo info;  // data_begin 0, data_end = the tensor's bytes: no file behind it
    RandomInit init = RandomInit::kLinear;
  };
  const RandomTensor& find(const std::string& name) const {
    auto it = tensors_.find(name);
    if (it == tensors_.end())
      throw Error(ErrorCode::kInvalidCheckpoint, "tensor '" + name + "' is not among the " +
                                                     std::to_string(tensors_.size()) + " tensors of " +
                                                     description_ + "; check the config against the preset");
    return it->second;
  }

  DType storage_;
  uint64_t seed_;
  std::string description_;
  std::map<std::string, RandomTensor> tensors_;
  mutable std::atomic<uint64_t> bytes_read_{0};
};

}  // namespace

std::unique_ptr<WeightSource> open_checkpoint_source(const std::filesystem::path& model_dir) {
  return std::make_unique<CheckpointSource>(model_dir);
}

std::unique_ptr<WeightSource> make_random_source(const ModelConfig& config, DType storage, uint64_t seed,
                                                 const std::string& description) {
  return std::make_unique<RandomSource>(config, storage, seed, description);
}

}  // namespace epic
