// The expected traffic between nodes of a placement, per token and MoE layer, for both dispatch
// schemes (worker/expert_parallel_moe.h). Assumptions, stated so the figures can be checked: every
// worker sends the same number of tokens; a slot picks expert e with the layer's load share of e; a slot
// is served by a replica on the sender's node when there is one (ExpertRoutingTable::worker_for_sender),
// else evenly by all replicas; for the hierarchical figure the top-k slots of a token are taken as
// independent (top-k picks distinct experts, so it slightly overstates the nodes a token reaches).
#pragma once

#include <cstdint>
#include <vector>

#include "coordinator/placement.h"

namespace epic {

struct InterNodeTraffic {
  // Rows that cross to another node per token on dispatch; the combine sends as many back.
  double flat_rows_per_token = 0;          // a row per (token, slot) served on another node
  double hierarchical_rows_per_token = 0;  // a row per other node that serves one of the token's slots
};

// Zeros when worker_node is empty or names one node. Error(kInvalidArgument) for a worker_node list
// that does not match the layer's workers or top_k < 1.
InterNodeTraffic expected_inter_node_traffic(const LayerPlacement& layer, const std::vector<int>& worker_node,
                                             int64_t top_k);

// Bytes of rows crossing between nodes per token, dispatch and combine together (each moves the rows
// once), for rows of row_bytes each.
struct InterNodeBytes {
  double flat = 0;
  double hierarchical = 0;
};
InterNodeBytes expected_inter_node_bytes(const LayerPlacement& layer, const std::vector<int>& worker_node,
                                         int64_t top_k, uint64_t row_bytes);
// The same summed over every MoE layer of the plan (its worker_node and experts_per_token); zeros for a
// plan without nodes.
InterNodeBytes expected_inter_node_bytes(const PlacementPlan& plan, uint64_t row_bytes);

}  // namespace epic
