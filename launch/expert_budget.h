// --expert-budget: how many of a worker's experts stay in backend memory (worker/expert_store.h), per
// MoE layer or in total, and the store's other flags, checked and turned into ExpertStoreOptions.
#pragma once

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "coordinator/placement.h"
#include "worker/expert_store.h"
#include "worker/model_weights.h"
#include "worker/offloading_moe_executor.h"
#include "worker/step_demand.h"

namespace epic::cli {

struct ExpertStoreFlags {
  std::string budget;             // "" (every expert resident), "N" per layer, "P%" of each layer, "total:N"
  std::string tier = "host";      // host | disk: where the other experts wait
  std::string eviction = "lru";   // lru | lfu | usefulness
  std::string on_miss = "wait";   // wait | substitute | read (worker/offloading_moe_executor.h)
  double usefulness_decay = 0.9;  // per step, of the usefulness score
  std::string prefetch = "next-layer";  // next-layer | none (worker/offloading_moe_executor.h)
  // --on-miss read: at most this many of a layer's missed experts copied into its slots after a step (the
  // most wanted); 0: every miss (ExpertStoreOptions::admit_per_layer).
  int64_t admit_per_step = 0;
  // --host-budget (with --expert-tier disk): a pinned host cache of this many of each layer's experts
  // between the resident ones and the checkpoint, in --expert-budget's grammar; "" for none.
  std::string host_budget{};

  bool enabled() const { return !budget.empty(); }
};

// Checks every flag's spelling and range (Error(kInvalidArgument) naming the flag and the fix) without
// the model: before MPI starts.
void check_expert_store_flags(const ExpertStoreFlags& flags);

// The per-layer slots of the budget over the layers' present experts: "N" = N per layer (capped at the
// layer's experts), "P%" = P percent of each layer's present experts rounded to nearest (at least 1),
// "total:N" = N split in proportion to the layers' present experts (split_residency_budget).
// `flag` names the budget's flag in errors.
ResidencyBudget expert_budget_slots(const std::string& budget, const ExpertInventory& inventory,
                                    const std::string& flag = "--expert-budget");

// The store's options from its flags (checked by check_expert_store_flags): the tier, the budget's slots
// over `hosted` (the experts this worker keeps, as inspect_experts reports them), the eviction policy and
// its decay, the host cache's budget; and, as LoadOptions has them, the weight type, the missing and
// non-finite policies and which experts this worker hosts (every present one when hosts_expert is empty).
ExpertStoreOptions expert_store_options(
    const ExpertStoreFlags& flags, const ExpertInventory& hosted, std::optional<ScalarType> weight_type,
    bool allow_missing_experts, bool allow_nonfinite_weights,
    std::function<bool(int64_t layer, int64_t expert_id)> hosts_expert = {});

// The planner's input for a budget (PlacementRequest::resident_slots): from one worker's hosted experts per
// MoE layer, the slots expert_budget_slots gives each layer over them.
std::function<std::map<int64_t, int64_t>(const std::map<int64_t, int64_t>&)> budget_resident_slots(
    const std::string& budget);

// The planner's view of a budget: per worker and MoE layer, the slots the budget gives the experts the plan
// places there, and the share of the worker's expected load (the plan's expert_load, a replica's share
// split evenly) that its hottest experts would serve if they stayed resident: the demand hit rate a
// static cache would reach. Per layer the lowest and the mean over the workers that host experts.
struct LayerResidencyEstimate {
  int64_t layer = 0;
  int64_t min_slots = 0, max_slots = 0;
  double min_resident_share = 1.0, mean_resident_share = 1.0;
  // The costliest worker's expected time (its load, each pick past its resident experts at miss_cost, as the
  // planner weighs them: PlacementRequest::miss_cost) over the mean worker's load with every expert
  // resident: 1 for a balanced layer that never misses. What the budget-aware plan lowers.
  double max_cost_over_resident = 1.0;
};
std::vector<LayerResidencyEstimate> expected_resident_share(const PlacementPlan& plan,
                                                            const std::string& budget);
// load_only: the same figures for the plan made without the budget (a column beside each layer's), or null.
std::string residency_estimate_table(const std::vector<LayerResidencyEstimate>& estimates,
                                     const std::string& budget,
                                     const std::vector<LayerResidencyEstimate>* load_only = nullptr);

// What the store did over a run, as JSON (hits, misses, evictions, bytes moved per tier, seconds stalled,
// substituted picks, resident bytes measured) and as one line for stderr.
nlohmann::json expert_store_report(const ExpertStore& store, const OffloadStats& offload,
                                   const ExpertStoreFlags& flags);
std::string expert_store_summary(const nlohmann::json& report);

// Under mpirun the exchanges (host or NCCL) compute the received rows through the store: their demand
// counts (each received pick a hit or a miss) as the report's demand figures.
OffloadStats exchange_store_stats(const StoreDemandCounts& demand, const ExpertStore& store);

}  // namespace epic::cli
