// Block bookkeeping of the paged KV cache (host side; the pools are backend memory).
#include "worker/kv_cache.h"

#include "kernels/error.h"

namespace epic {

KvSequence::~KvSequence() {
  if (pool_ != nullptr) pool_->release(*this);
}

KvSequence::KvSequence(KvSequence&& other) noexcept
    : length(other.length), blocks(std::move(other.blocks)), pool_(other.pool_) {
  other.pool_ = nullptr;
  other.blocks.clear();
}

KvCachePool::KvCachePool(Backend& backend, const ModelConfig& config, ScalarType type, int64_t num_blocks)
    : num_blocks_(num_blocks) {
  EPIC_CHECK(num_blocks >= 2 && num_blocks <= INT32_MAX, ErrorCode::kInvalidArgument,
             "KV cache: " + std::to_string(num_blocks) + " blocks is outside [2, 2^31)");
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) {
    keys_.push_back(backend.new_tensor(type, {num_blocks, kKvBlockSize, config.num_key_value_heads, config.head_dim}));
    values_.push_back(
        backend.new_tensor(type, {num_blocks, kKvBlockSize, config.num_key_value_heads, config.head_dim}));
  }
  for (int64_t block = num_blocks - 1; block >= 1; --block) free_.push_back(static_cast<int32_t>(block));
}

void KvCachePool::reserve(KvSequence& sequence, int64_t length) {
  const int64_t needed = blocks_for(length);
  while (static_cast<int64_t>(sequence.blocks.size()) < needed) {
    if (free_.empty())
      throw Error(ErrorCode::kUnsupported,
                  "KV cache exhausted: all " + std::to_string(num_blocks_ - 1) + " blocks of " +
                      std::to_string(kKvBlockSize) + " positions are in use (a sequence needs " +
                      std::to_string(length) + " positions); lower --max-active-sequences or the prompt + "
                      "--max-new-tokens length");
    sequence.blocks.push_back(free_.back());
    free_.pop_back();
  }
}

void KvCachePool::release(KvSequence& sequence) {
  for (auto it = sequence.blocks.rbegin(); it != sequence.blocks.rend(); ++it) free_.push_back(*it);
  sequence.blocks.clear();
  sequence.length = 0;
}

size_t KvCachePool::bytes() const {
  size_t total = 0;
  for (const OwnedTensor& t : keys_) total += t.bytes();
  for (const OwnedTensor& t : values_) total += t.bytes();
  return total;
}

int64_t kv_cache_bytes_per_token(const ModelConfig& config, ScalarType type) {
  return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim *
         static_cast<int64_t>(scalar_size(type));
}

}  // namespace epic
