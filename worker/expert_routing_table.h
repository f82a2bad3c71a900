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
  // The node of each worker when the job spans several nodes (comm/node_topology.h); empty: one node.
  std::vector<int> node_of_worker;

  bool hosts(int worker, int64_t layer, int64_t expert_id) const;
  // replica (occurrence_key mod replicas) of the expert; Error(kInternal) if it has none.
  int worker_for(int64_t layer, int64_t expert_id, uint64_t occurrence_key) const;
  // The worker that serves an occurrence sent by `sender`: a replica on the sender's own node when
  // there is one (occurrences rotate over those), else as worker_for. Without node_of_worker, or on
  // one node, the same as worker_for. Which replica computes a row never changes its result.
  int worker_for_sender(int64_t layer, int64_t expert_id, uint64_t occurrence_key, int sender) const;
  bool same_node(int a, int b) const {
    return node_of_worker.empty() || node_of_worker.at(a) == node_of_worker.at(b);
  }
  // Every expert on worker 0 (the one-process cluster).
  static ExpertRoutingTable single_worker(const std::map<int64_t, std::vector<uint8_t>>& present_by_layer);
};

}  // namespace epic
