// The middle tier of the expert store (worker/expert_store.h) when the checkpoint on disk is the backing
// store: a pinned host cache of a budget of each MoE layer's hosted experts (--host-budget with
// --expert-tier disk). A miss of the backend's slots copies the expert from here when it is cached, and
// otherwise reads it from the checkpoint into a cache slot first, evicting by the same policy the slots
// use (its own ExpertResidencySet, fed the same router picks). Host memory stays at the budget instead
// of every hosted expert (the host tier) or none (the disk tier without a cache, which reads the disk on
// every miss).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "kernels/backend.h"
#include "worker/expert_residency_policy.h"
#include "worker/model_config.h"
#include "worker/weight_source.h"

namespace epic {

struct HostExpertCacheOptions {
  ResidencyBudget budget;  // cache slots per MoE layer, capped at the layer's hosted experts
  EvictionPolicy policy = EvictionPolicy::kLru;
  double usefulness_decay = 0.9;
  ScalarType weight_type = ScalarType::kBF16;  // the bytes kept: the backend's slots' weight type
  bool allow_nonfinite_weights = false;
  int reader_threads = 0;  // the loader's; <= 0: its default
};

// What one fetch did.
struct HostCacheFetch {
  // Per expert asked, in order: its bytes in the cache (gate_up [2I, H], then down [H, I], contiguous, in
  // the weight type), valid until the next fetch of the same layer; and whether it was cached already.
  std::vector<const uint8_t*> bytes;
  std::vector<uint8_t> was_cached;
  int64_t hits = 0, misses = 0, evictions = 0;
  std::vector<int64_t> evicted;
  uint64_t source_bytes_read = 0;  // stored bytes read from the checkpoint for the misses
};

struct HostCacheStats {
  int64_t hits = 0, misses = 0, evictions = 0;
  uint64_t source_bytes_read = 0;
};

// Not thread-safe: the expert store's, used on its thread. The source must outlive it.
class HostExpertCache {
 public:
  // hosted_by_layer: every MoE layer's hosted experts (the only ones it may be asked for). Throws
  // Error(kInvalidArgument) for a budget that misses a layer or is negative.
  HostExpertCache(const ModelConfig& config, WeightSource& source, Backend& backend,
                  const std::map<int64_t, std::vector<int64_t>>& hosted_by_layer,
                  HostExpertCacheOptions options);
  ~HostExpertCache();
  HostExpertCache(const HostExpertCache&) = delete;
  HostExpertCache& operator=(const HostExpertCache&) = delete;

  // Makes every expert of `experts` (distinct, hosted by the caller's check) cached and returns where
  // their bytes are. The misses are read from the source in one load (the loader's parallel readers),
  // into slots that are free or hold an expert not asked for here (the ones asked for are pinned while
  // this call admits, so no miss evicts another's bytes). More experts than the layer's slots is
  // Error(kInvalidArgument). A read that fails leaves its experts uncached (read again next time) and
  // throws what the loader threw.
  HostCacheFetch fetch(int64_t layer, const std::vector<int64_t>& experts, int64_t step);

  // One router pick, as ExpertResidencySet::record_use: the cache ranks its experts by the same history.
  void record_uses(int64_t layer, int64_t expert_id, int64_t uses, double weight_sum, int64_t step);

  bool cached(int64_t layer, int64_t expert_id) const;       // and its bytes there
  std::vector<int64_t> cached_experts(int64_t layer) const;  // ascending
  int64_t capacity(int64_t layer) const;
  uint64_t bytes() const;  // the pinned buffers' sizes, measured from them
  HostCacheStats stats() const { return stats_; }

 private:
  struct Layer {
    std::unique_ptr<Buffer> slots;       // [capacity, expert bytes]
    std::vector<int64_t> slot_expert;    // [capacity]: the expert a slot holds, -1 when free
    std::map<int64_t, int64_t> slot_of;  // cached (admitted) expert -> slot
    std::vector<uint8_t> loaded;         // [capacity]: the slot's bytes are its expert's
  };
  const Layer& layer_state(int64_t layer, const char* operation) const;

  ModelConfig config_;
  WeightSource& source_;
  Backend& backend_;
  HostExpertCacheOptions options_;
  size_t expert_bytes_ = 0;
  std::map<int64_t, Layer> layers_;
  std::unique_ptr<ExpertResidencySet> residency_;
  HostCacheStats stats_;
};

}  // namespace epic
