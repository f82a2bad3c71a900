// Lookups in the routing table; the replica rule lives here so every worker applies the same one.
#include "worker/expert_routing_table.h"

#include <algorithm>
#include <string>

#include "kernels/error.h"

namespace epic {

bool ExpertRoutingTable::hosts(int worker, int64_t layer, int64_t expert_id) const {
  auto it = expert_workers.find(layer);
  if (it == expert_workers.end() || expert_id < 0 || expert_id >= static_cast<int64_t>(it->second.size()))
    return false;
  const std::vector<int>& workers = it->second[expert_id];
  return std::find(workers.begin(), workers.end(), worker) != workers.end();
}

namespace {

const std::vector<int>& replicas_of(const std::map<int64_t, std::vector<std::vector<int>>>& expert_workers,
                                    int64_t layer, int64_t expert_id) {
  auto it = expert_workers.find(layer);
  if (it == expert_workers.end() || expert_id < 0 || expert_id >= static_cast<int64_t>(it->second.size()) ||
      it->second[expert_id].empty())
    throw Error(ErrorCode::kInternal, "no worker hosts layer " + std::to_string(layer) + " expert " +
                                          std::to_string(expert_id) + " in the placement plan");
  return it->second[expert_id];
}

}  // namespace

int ExpertRoutingTable::worker_for(int64_t layer, int64_t expert_id, uint64_t occurrence_key) const {
  const std::vector<int>& workers = replicas_of(expert_workers, layer, expert_id);
  return workers[occurrence_key % workers.size()];
}

int ExpertRoutingTable::worker_for_sender(int64_t layer, int64_t expert_id, uint64_t occurrence_key,
                                          int sender) const {
  const std::vector<int>& workers = replicas_of(expert_workers, layer, expert_id);
  if (node_of_worker.empty() || workers.size() == 1) return workers[occurrence_key % workers.size()];
  // The replicas on the sender's node, in ascending order, without allocating (this runs per row).
  size_t local = 0;
  for (int worker : workers) local += same_node(worker, sender) ? 1 : 0;
  if (local == 0 || local == workers.size()) return workers[occurrence_key % workers.size()];
  size_t wanted = occurrence_key % local;
  for (int worker : workers) {
    if (!same_node(worker, sender)) continue;
    if (wanted-- == 0) return worker;
  }
  return workers.front();  // not reached: `local` replicas were counted above
}

ExpertRoutingTable ExpertRoutingTable::single_worker(
    const std::map<int64_t, std::vector<uint8_t>>& present_by_layer) {
  ExpertRoutingTable table;
  for (const auto& [layer, present] : present_by_layer) {
    std::vector<std::vector<int>>& experts = table.expert_workers[layer];
    experts.resize(present.size());
    for (size_t e = 0; e < present.size(); ++e)
      if (present[e]) experts[e] = {0};
  }
  return table;
}

}  // namespace epic
