// From a model directory and the placement flags to a PlacementPlan, and from a plan to the
// worker-side routing table. Shared by `epic run` and `epic plan`.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "coordinator/placement.h"
#include "worker/expert_routing_table.h"
#include "worker/model_config.h"
#include "worker/model_weights.h"

namespace epic::cli {

struct PlacementFlags {
  int num_workers = 1;
  std::optional<int64_t> slots;
  std::optional<uint64_t> budget_bytes;
  std::string load_profile;                   // path, or empty for uniform
  ScalarType weight_type = ScalarType::kF32;  // how a worker keeps expert weights (see model_weights.h)
  std::vector<int> worker_node =
      {};  // the node of each worker (comm/node_topology.h); empty or all 0: one node
  // --expert-budget (checked): plan for that budget of resident experts per worker as well
  // (PlacementRequest::resident_slots); "" for none.
  std::string expert_budget = {};
};

// Bytes one expert occupies on a worker when its weights are kept as `weight_type` (the
// checkpoint's BF16, or F32): what --budget-bytes counts.
uint64_t resident_expert_bytes(const ModelConfig& config, ScalarType weight_type);

PlacementPlan make_placement(const ModelConfig& config, const ExpertInventory& inventory,
                             const PlacementFlags& flags);

ExpertRoutingTable routing_table_from_plan(const PlacementPlan& plan);

// Text table of the per-layer balance: layer, experts, slots, replicas, max/mean load; on several nodes
// also the expected rows and bytes (rows of row_bytes each, dispatch plus combine) that cross between
// nodes per token, flat and hierarchical (coordinator/placement_traffic.h).
std::string balance_table(const PlacementPlan& plan, uint64_t row_bytes = 0);

}  // namespace epic::cli
