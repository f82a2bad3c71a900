// Where a model's tensors come from: a Hugging Face checkpoint on disk (read through its index,
// only the tensors asked for), or random values drawn in memory exactly as `epic make-model`
// would write them for the same preset and seed (a 48-layer Qwen3-30B-A3B is ~57 GB: too big to
// write to the GPU machine's disk first). The loader (weight_loader.h) reads either the same way.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "worker/checkpoint.h"
#include "worker/model_config.h"
#include "worker/safetensors.h"

namespace epic {

class WeightSource {
 public:
  virtual ~WeightSource() = default;
  // Where the tensors are, for messages: the checkpoint folder, or "random weights of preset P".
  virtual std::string description() const = 0;
  virtual bool contains(const std::string& name) const = 0;
  // Where one tensor is, for messages: "shard model-00002-of-00004.safetensors", ...
  virtual std::string location_of(const std::string& name) const = 0;
  // The tensor's stored dtype and shape (data offsets are meaningful for checkpoints only). Throws
  // what Checkpoint::info throws for a tensor that is absent or whose shard is broken. Not
  // thread-safe: call it for every tensor before reading any in parallel.
  virtual const TensorInfo& info(const std::string& name) = 0;
  // Reads bytes [offset, offset + size) of the tensor's stored data (its dtype, row-major) into dst.
  // Thread-safe after info() was called for the tensor; several threads may read at once.
  virtual void read(const std::string& name, uint64_t offset, uint64_t size, void* dst) const = 0;
  // Bytes of tensor data read so far (from disk, or drawn).
  virtual uint64_t bytes_read() const = 0;
};

// A checkpoint folder (model.safetensors.index.json or model.safetensors).
std::unique_ptr<WeightSource> open_checkpoint_source(const std::filesystem::path& model_dir);

// Random weights of `config` as make-model draws them for this seed, stored as `storage`
// (the preset's storage dtype): the same bytes make-model would write, tensor for tensor.
std::unique_ptr<WeightSource> make_random_source(const ModelConfig& config, DType storage, uint64_t seed,
                                                 const std::string& description);

}  // namespace epic
