// The paged KV cache of one worker: per layer a key pool and a value pool of fixed-size blocks
// (kKvBlockSize positions each) in backend memory, handed to sequences as they grow and taken back
// when they finish. Sized once for the run (the live-sequence bound x the longest context), so
// a step never allocates; block 0 is kept aside for the padding rows of a captured decode graph.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/backend.h"
#include "worker/model_config.h"

namespace epic {

class KvCachePool;

// One sequence's place in the pool: its blocks (positions 0.. in kKvBlockSize steps) and length.
// Gives its blocks back when destroyed.
class KvSequence {
 public:
  explicit KvSequence(KvCachePool& pool) : pool_(&pool) {}
  ~KvSequence();
  KvSequence(KvSequence&& other) noexcept;
  KvSequence& operator=(KvSequence&&) = delete;
  KvSequence(const KvSequence&) = delete;
  KvSequence& operator=(const KvSequence&) = delete;

  int64_t length = 0;           // positions stored
  std::vector<int32_t> blocks;  // pool blocks holding positions [16 b, 16 b + 16)

 private:
  KvCachePool* pool_;
};

class KvCachePool {
 public:
  // Throws Error(kUnsupported) (from the backend) when the pool does not fit.
  KvCachePool(Backend& backend, const ModelConfig& config, ScalarType type, int64_t num_blocks);

  // Blocks for a sequence that holds up to `positions` positions.
  static int64_t blocks_for(int64_t positions) { return (positions + kKvBlockSize - 1) / kKvBlockSize; }

  // Makes `sequence` able to hold `length` positions. Throws Error(kUnsupported) naming the sizes
  // when the pool has no free block left.
  void reserve(KvSequence& sequence, int64_t length);
  void release(KvSequence& sequence);

  const Tensor& keys(int64_t layer) const { return keys_[layer].view(); }
  const Tensor& values(int64_t layer) const { return values_[layer].view(); }
  int32_t padding_block() const { return 0; }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t free_blocks() const { return static_cast<int64_t>(free_.size()); }
  size_t bytes() const;

 private:
  int64_t num_blocks_;
  std::vector<OwnedTensor> keys_, values_;
  std::vector<int32_t> free_;  // a stack: the most recently freed block is reused first
};

// Keys and values of every layer, per token of a sequence: 2 x layers x kv_heads x head_dim
// elements of the cache type (F32: 4 bytes, BF16: 2).
int64_t kv_cache_bytes_per_token(const ModelConfig& config, ScalarType type = ScalarType::kF32);

}  // namespace epic
