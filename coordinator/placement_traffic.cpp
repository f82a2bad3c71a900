// Expected inter-node rows per token (placement_traffic.h).
#include "coordinator/placement_traffic.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "kernels/error.h"

namespace epic {

InterNodeTraffic expected_inter_node_traffic(const LayerPlacement& layer, const std::vector<int>& worker_node,
                                             int64_t top_k) {
  InterNodeTraffic traffic;
  const int num_workers = static_cast<int>(layer.worker_experts.size());
  if (worker_node.empty()) return traffic;
  if (static_cast<int>(worker_node.size()) != num_workers || top_k < 1)
    throw Error(ErrorCode::kInvalidArgument, "inter-node traffic: " + std::to_string(worker_node.size()) +
                                                 " worker nodes for " + std::to_string(num_workers) +
                                                 " workers, top-k " + std::to_string(top_k));
  const int num_nodes = *std::max_element(worker_node.begin(), worker_node.end()) + 1;
  if (num_nodes < 2) return traffic;
  const double total = std::accumulate(layer.expert_load.begin(), layer.expert_load.end(), 0.0);
  if (total <= 0) return traffic;
  const double k = static_cast<double>(top_k);
  for (int sender = 0; sender < num_workers; ++sender) {
    const int home = worker_node[sender];
    std::vector<double> served(num_nodes, 0.0);  // share of a slot served on each node
    for (size_t expert = 0; expert < layer.expert_workers.size(); ++expert) {
      const std::vector<int>& replicas = layer.expert_workers[expert];
      const double share = layer.expert_load[expert] / total;
      if (replicas.empty() || share == 0) continue;
      const bool local =
          std::any_of(replicas.begin(), replicas.end(), [&](int w) { return worker_node[w] == home; });
      if (local) {
        served[home] += share;
        continue;
      }
      for (int worker : replicas) served[worker_node[worker]] += share / static_cast<double>(replicas.size());
    }
    traffic.flat_rows_per_token += k * (1.0 - served[home]);
    for (int node = 0; node < num_nodes; ++node) {
      if (node == home) continue;
      traffic.hierarchical_rows_per_token += 1.0 - std::pow(std::max(0.0, 1.0 - served[node]), k);
    }
  }
  traffic.flat_rows_per_token /= num_workers;
  traffic.hierarchical_rows_per_token /= num_workers;
  return traffic;
}

InterNodeBytes expected_inter_node_bytes(const LayerPlacement& layer, const std::vector<int>& worker_node,
                                         int64_t top_k, uint64_t row_bytes) {
  const InterNodeTraffic rows = expected_inter_node_traffic(layer, worker_node, top_k);
  const double bytes = static_cast<double>(row_bytes);
  return {2.0 * rows.flat_rows_per_token * bytes, 2.0 * rows.hierarchical_rows_per_token * bytes};
}

InterNodeBytes expected_inter_node_bytes(const PlacementPlan& plan, uint64_t row_bytes) {
  InterNodeBytes total;
  if (plan.worker_node.empty() || plan.experts_per_token < 1) return total;
  for (const LayerPlacement& layer : plan.layers) {
    const InterNodeBytes bytes =
        expected_inter_node_bytes(layer, plan.worker_node, plan.experts_per_token, row_bytes);
    total.flat += bytes.flat;
    total.hierarchical += bytes.hierarchical;
  }
  return total;
}

}  // namespace epic
