// `epic plan`: the expert placement for N workers, printed as JSON with its balance figures.
// Reads only config.json, the index and shard headers (no tensor data).
#include <cstdio>

#include "comm/node_topology.h"
#include "coordinator/placement.h"
#include "kernels/error.h"
#include "kernels/file_io.h"
#include "launch/cli_commands.h"
#include "launch/expert_budget.h"
#include "launch/flag_checks.h"
#include "launch/placement_setup.h"
#include "worker/model_config.h"
#include "worker/model_weights.h"
#include "worker/weight_source.h"

namespace epic::cli {

int plan_command(const PlanArgs& args) {
  check_int_flag("--workers", args.workers, 1, kMaxWorkers);
  // Before any work: the plan's file can be written atomically, the profile is a regular file.
  if (!args.out.empty()) check_output_flag(args.out, "--out");
  if (!args.load_profile.empty()) files::require_regular_file(args.load_profile, "--load-profile");
  if (!args.expert_budget.empty()) check_expert_store_flags({args.expert_budget});
  const ModelConfig config = ModelConfig::load(args.model_dir);
  const std::unique_ptr<WeightSource> checkpoint = open_checkpoint_source(args.model_dir);
  const ExpertInventory inventory = inspect_experts(config, *checkpoint, args.allow_missing_experts);
  // A worker keeps expert weights as the checkpoint stores them (bf16 stays bf16; `epic run
  // --precision bf16` also converts f32 checkpoints, which this estimate does not assume).
  const ScalarType weight_type = stored_weight_type(config, *checkpoint);
  PlacementFlags flags{args.workers, args.slots, args.budget_bytes, args.load_profile, weight_type};
  flags.expert_budget = args.expert_budget;
  if (args.ranks_per_node != 0) {
    check_int_flag("--ranks-per-node", args.ranks_per_node, 1, kMaxWorkers);
    flags.worker_node = NodeTopology::from_ranks_per_node(args.workers, args.ranks_per_node).node_of_rank();
  }
  const PlacementPlan plan = make_placement(config, inventory, flags);
  const std::string json = plan.to_json_text();
  std::printf("%s\n", json.c_str());
  if (!args.out.empty()) files::write_file_atomically(args.out, json + "\n", "--out");
  std::fprintf(stderr, "epic plan: %d workers, %zu MoE layers, %.1f MB per expert (%s resident)\n%s",
               args.workers, plan.layers.size(), resident_expert_bytes(config, weight_type) / 1e6,
               scalar_name(weight_type),
               // Rows travel in the activation type: bf16 when serving on GPUs (fp32 on the cpu backend
               // doubles these bytes).
               balance_table(plan, static_cast<uint64_t>(config.hidden_size) * 2).c_str());
  if (!args.expert_budget.empty()) {
    // The plan above is made for the budget; beside it, what packing for load alone would give.
    PlacementFlags load_only_flags = flags;
    load_only_flags.expert_budget.clear();
    const std::vector<LayerResidencyEstimate> load_only =
        expected_resident_share(make_placement(config, inventory, load_only_flags), args.expert_budget);
    std::fprintf(stderr, "%s",
                 residency_estimate_table(expected_resident_share(plan, args.expert_budget),
                                          args.expert_budget, &load_only)
                     .c_str());
  }
  return 0;
}

}  // namespace epic::cli
