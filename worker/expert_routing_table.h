// The worker-side view of a placement plan: for each MoE layer, which workers hold a replica of
// each expert. Tokens for a replicated expert are split among its replicas deterministically.
#pragma once

#include <cstdint>
#include <map>
#include <vector>

namespace epic {

struct ExpertRoutingTable {
  int num_workers = 1;
  // layer -> expert -> workers holding a replica (ascending); empty for masked experts.
  std::map<int64_t, std::vector<std::vector<int>>> expert_workers;

  bool hosts(int worker, int64_t layer, int64_t expert_id) const;
  // replica (occurrence_key mod replicas) of the expert; Error(kInternal) if it has none.
  int worker_for(int64_t layer, int64_t expert_id, uint64_t occurrence_key) const;
  // Every expert on worker 0 (the one-process cluster).
  static ExpertRoutingTable single_worker(const std::map<int64_t, std::vector<uint8_t>>& present_by_layer);
};

}  // namespace epic
