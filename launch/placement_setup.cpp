// Placement flags -> PlacementRequest -> plan; plan -> routing table.
#include "launch/placement_setup.h"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <sstream>

#include "coordinator/placement_traffic.h"
#include "kernels/error.h"
#include "launch/expert_budget.h"
#include "launch/flag_checks.h"

namespace epic::cli {

uint64_t resident_expert_bytes(const ModelConfig& config, ScalarType weight_type) {
  return 3ull * config.moe_intermediate_size * config.hidden_size * scalar_size(weight_type);
}

PlacementPlan make_placement(const ModelConfig& config, const ExpertInventory& inventory,
                             const PlacementFlags& flags) {
  if (flags.slots && flags.budget_bytes)
    throw Error(ErrorCode::kInvalidArgument, "give --slots or --budget-bytes, not both");
  // The planner's tables grow with workers x experts: bound the count before they are made.
  check_int_flag("number of workers", flags.num_workers, 1, kMaxWorkers);
  if (flags.slots) check_int_flag("--slots", *flags.slots, 1, std::numeric_limits<int64_t>::max());
  PlacementRequest request;
  request.num_workers = flags.num_workers;
  request.slots_per_worker = flags.slots;
  request.budget_bytes = flags.budget_bytes;
  request.expert_bytes = resident_expert_bytes(config, flags.weight_type);
  const bool several_nodes =
      !flags.worker_node.empty() &&
      std::any_of(flags.worker_node.begin(), flags.worker_node.end(), [](int node) { return node != 0; });
  if (several_nodes) {
    request.worker_node = flags.worker_node;
    request.experts_per_token = config.num_experts_per_tok;
  }
  for (const auto& [layer, experts] : inventory)
    request.layers.push_back({layer, experts.num_experts, experts.present});
  if (!flags.load_profile.empty()) request.profile = LoadProfile::load_file(flags.load_profile);
  if (!flags.expert_budget.empty()) request.resident_slots = budget_resident_slots(flags.expert_budget);
  return plan_placement(request);
}

ExpertRoutingTable routing_table_from_plan(const PlacementPlan& plan) {
  ExpertRoutingTable table;
  table.num_workers = plan.num_workers;
  table.node_of_worker = plan.worker_node;
  for (const LayerPlacement& layer : plan.layers) table.expert_workers[layer.layer] = layer.expert_workers;
  return table;
}

std::string balance_table(const PlacementPlan& plan, uint64_t row_bytes) {
  std::ostringstream out;
  char line[240];
  const bool traffic = !plan.worker_node.empty() && plan.experts_per_token > 0;
  std::snprintf(
      line, sizeof(line), "%6s %8s %6s %9s %14s%s\n", "layer", "experts", "slots", "replicas",
      "max/mean load",
      traffic ? "   inter-node rows/token: flat  hierarchical   bytes/token: flat  hierarchical" : "");
  out << line;
  for (const LayerPlacement& layer : plan.layers) {
    int64_t placed = 0, distinct = 0;
    for (const auto& workers : layer.expert_workers) {
      placed += static_cast<int64_t>(workers.size());
      distinct += workers.empty() ? 0 : 1;
    }
    std::snprintf(line, sizeof(line), "%6lld %8lld %6lld %9lld %14.3f", static_cast<long long>(layer.layer),
                  static_cast<long long>(layer.num_experts), static_cast<long long>(layer.slots_per_worker),
                  static_cast<long long>(placed - distinct), layer.max_over_mean_load());
    out << line;
    if (traffic) {
      const InterNodeTraffic expected =
          expected_inter_node_traffic(layer, plan.worker_node, plan.experts_per_token);
      const InterNodeBytes bytes =
          expected_inter_node_bytes(layer, plan.worker_node, plan.experts_per_token, row_bytes);
      std::snprintf(line, sizeof(line), " %29.3f %13.3f %18.0f %13.0f", expected.flat_rows_per_token,
                    expected.hierarchical_rows_per_token, bytes.flat, bytes.hierarchical);
      out << line;
    }
    out << "\n";
  }
  if (traffic) {
    const InterNodeBytes total = expected_inter_node_bytes(plan, row_bytes);
    std::snprintf(line, sizeof(line),
                  "expected bytes crossing between nodes per token, all MoE layers, dispatch + combine: "
                  "flat %.0f, hierarchical %.0f (%d nodes; rows of %llu bytes)\n",
                  total.flat, total.hierarchical,
                  *std::max_element(plan.worker_node.begin(), plan.worker_node.end()) + 1,
                  static_cast<unsigned long long>(row_bytes));
    out << line;
  }
  return out.str();
}

}  // namespace epic::cli
