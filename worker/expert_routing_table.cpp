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

int ExpertRoutingTable::worker_for(int64_t layer, int64_t expert_id, uint64_t occurrence_key) const {
  auto it = expert_workers.find(layer);
  if (it == expert_workers.end() || expert_id < 0 || expert_id >= static_cast<int64_t>(it->second.size()) ||
      it->second[expert_id].empty())
    throw Error(ErrorCode::kInternal, "no worker hosts layer " + std::to_string(layer) + " expert " +
                                          std::to_string(expert_id) + " in the placement plan");
  const std::vector<int>& workers = it->second[expert_id];
  return workers[occurrence_key % workers.size()];
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
