// --expert-budget's arithmetic (launch/expert_budget.h): the slots a budget gives each layer, and the
// planner's estimate of what a worker's hottest experts serve, on hand-worked plans.
#include "launch/expert_budget.h"

#include <gtest/gtest.h>

#include "kernels/error.h"

namespace epic::cli {
namespace {

ExpertInventory inventory(const std::vector<int64_t>& present_counts, int64_t experts) {
  ExpertInventory out;
  for (size_t layer = 0; layer < present_counts.size(); ++layer) {
    LayerExpertInventory& l = out[static_cast<int64_t>(layer) * 2];  // MoE layers 0, 2, 4, ...
    l.num_experts = experts;
    l.present.assign(static_cast<size_t>(experts), 0);
    for (int64_t e = 0; e < present_counts[layer]; ++e) l.present[e] = 1;
  }
  return out;
}

TEST(ExpertBudget, SlotsPerLayerPercentAndTotal) {
  const ExpertInventory layers = inventory({32, 29, 24}, 32);
  EXPECT_EQ(expert_budget_slots("8", layers).slots_by_layer,
            (std::map<int64_t, int64_t>{{0, 8}, {2, 8}, {4, 8}}));
  EXPECT_EQ(expert_budget_slots("40", layers).slots_by_layer,
            (std::map<int64_t, int64_t>{{0, 32}, {2, 29}, {4, 24}}));
  // 50% of 32, 29 and 24, rounded to nearest (14.5 -> 15).
  EXPECT_EQ(expert_budget_slots("50%", layers).slots_by_layer,
            (std::map<int64_t, int64_t>{{0, 16}, {2, 15}, {4, 12}}));
  // At least one slot per layer.
  EXPECT_EQ(expert_budget_slots("1%", layers).slots_by_layer,
            (std::map<int64_t, int64_t>{{0, 1}, {2, 1}, {4, 1}}));
  const ResidencyBudget total = expert_budget_slots("total:17", layers);
  EXPECT_EQ(total.total_slots(), 17);
  EXPECT_GE(total.slots_by_layer.at(0), total.slots_by_layer.at(4));  // in proportion to the layers' experts
  for (const std::string bad : {"0", "0%", "101%", "total:0", "x", "-3", "5%%", "total:"})
    EXPECT_THROW(check_expert_store_flags({bad}), Error) << bad;
}

// One layer, loads 4, 3, 2, 1 over experts 0..3.
LayerPlacement four_experts(std::vector<std::vector<int64_t>> worker_experts) {
  LayerPlacement layer;
  layer.layer = 0;
  layer.num_experts = 4;
  layer.expert_load = {4, 3, 2, 1};
  layer.expert_workers.resize(4);
  for (size_t w = 0; w < worker_experts.size(); ++w)
    for (int64_t e : worker_experts[w]) layer.expert_workers[e].push_back(static_cast<int>(w));
  layer.worker_experts = std::move(worker_experts);
  return layer;
}

TEST(ExpertBudget, ResidentShareOfTheHottestExperts) {
  PlacementPlan one;
  one.num_workers = 1;
  one.layers = {four_experts({{0, 1, 2, 3}})};
  std::vector<LayerResidencyEstimate> estimate = expected_resident_share(one, "2");
  ASSERT_EQ(estimate.size(), 1u);
  EXPECT_DOUBLE_EQ(estimate[0].mean_resident_share, 0.7);  // (4 + 3) / 10
  EXPECT_EQ(estimate[0].min_slots, 2);
  EXPECT_DOUBLE_EQ(expected_resident_share(one, "100%")[0].min_resident_share, 1.0);

  // Two workers: {0, 1} (loads 4, 3) and {2, 3} (2, 1); one slot each: 4/7 and 2/3.
  PlacementPlan two;
  two.num_workers = 2;
  two.layers = {four_experts({{0, 1}, {2, 3}})};
  estimate = expected_resident_share(two, "1");
  EXPECT_NEAR(estimate[0].min_resident_share, 4.0 / 7.0, 1e-12);
  EXPECT_NEAR(estimate[0].mean_resident_share, (4.0 / 7.0 + 2.0 / 3.0) / 2, 1e-12);
  // The costlier is worker 0: load 7, a miss of 3 at 16x: 7 + 15 x 3 = 52, over the mean load 5.
  EXPECT_NEAR(estimate[0].max_cost_over_resident, 52.0 / 5.0, 1e-12);

  // Expert 0 replicated on both: each replica serves half its load (2). Worker 0 {0, 1}: 3 of 5;
  // worker 1 {0, 2, 3}: 2 of 5 (its hottest is expert 0's half or expert 2, both 2).
  PlacementPlan replicas;
  replicas.num_workers = 2;
  replicas.layers = {four_experts({{0, 1}, {0, 2, 3}})};
  estimate = expected_resident_share(replicas, "1");
  EXPECT_NEAR(estimate[0].min_resident_share, 2.0 / 5.0, 1e-12);
  EXPECT_NEAR(estimate[0].mean_resident_share, 0.5, 1e-12);
  EXPECT_NE(residency_estimate_table(estimate, "1").find("mean share"), std::string::npos);
}

// The planner's budget input: a worker's hosted experts per layer to its resident slots, by the budget's
// rules.
TEST(ExpertBudget, ResidentSlotsForThePlanner) {
  const auto slots = budget_resident_slots("50%");
  EXPECT_EQ(slots({{0, 8}, {2, 5}, {3, 0}}), (std::map<int64_t, int64_t>{{0, 4}, {2, 3}, {3, 0}}));
  EXPECT_EQ(budget_resident_slots("3")({{0, 8}, {2, 2}}), (std::map<int64_t, int64_t>{{0, 3}, {2, 2}}));
}

// The options every command builds its store from: each flag lands in its field, the budget is
// counted over the inventory given (the worker's own experts), and hosts_expert is the one passed.
TEST(ExpertBudget, StoreOptionsFromTheFlags) {
  const ExpertInventory layers = inventory({8, 6}, 8);
  const ExpertStoreOptions options =
      expert_store_options({"50%", "disk", "usefulness", "wait", 0.5, "none"}, layers, ScalarType::kBF16,
                           /*allow_missing_experts=*/true, /*allow_nonfinite_weights=*/true,
                           [](int64_t layer, int64_t expert) { return layer == 2 && expert == 5; });
  EXPECT_EQ(options.tier, ExpertTier::kDisk);
  EXPECT_EQ(options.policy, EvictionPolicy::kUsefulness);
  EXPECT_EQ(options.usefulness_decay, 0.5);
  EXPECT_EQ(options.budget.slots_by_layer, (std::map<int64_t, int64_t>{{0, 4}, {2, 3}}));
  EXPECT_EQ(options.weight_type, ScalarType::kBF16);
  EXPECT_TRUE(options.allow_missing_experts);
  EXPECT_TRUE(options.allow_nonfinite_weights);
  ASSERT_TRUE(options.hosts_expert);
  EXPECT_TRUE(options.hosts_expert(2, 5));
  EXPECT_FALSE(options.hosts_expert(0, 5));

  // Left unset: every present expert hosted, the source's weight type, the strict load checks.
  const ExpertStoreOptions plain = expert_store_options({"2"}, layers, std::nullopt, false, false);
  EXPECT_EQ(plain.tier, ExpertTier::kHost);
  EXPECT_EQ(plain.policy, EvictionPolicy::kLru);
  EXPECT_EQ(plain.usefulness_decay, ExpertStoreOptions{}.usefulness_decay);
  EXPECT_EQ(plain.budget.slots_by_layer, (std::map<int64_t, int64_t>{{0, 2}, {2, 2}}));
  EXPECT_FALSE(plain.weight_type.has_value());
  EXPECT_FALSE(plain.allow_missing_experts);
  EXPECT_FALSE(plain.allow_nonfinite_weights);
  EXPECT_FALSE(plain.hosts_expert);
  EXPECT_TRUE(plain.host_budget.slots_by_layer.empty());
}

// --host-budget is counted over the same inventory as --expert-budget, and must give every layer at least
// the slots the device budget gives it.
TEST(ExpertBudget, HostBudgetFromItsFlag) {
  const ExpertInventory layers = inventory({8, 6}, 8);
  ExpertStoreFlags flags;
  flags.budget = "2";
  flags.tier = "disk";
  flags.host_budget = "75%";
  check_expert_store_flags(flags);
  const ExpertStoreOptions options = expert_store_options(flags, layers, std::nullopt, false, false);
  EXPECT_EQ(options.host_budget.slots_by_layer, (std::map<int64_t, int64_t>{{0, 6}, {2, 5}}));
  flags.host_budget = "total:5";  // 3 + 2: layer 2 gets as many as its slots
  EXPECT_EQ(expert_store_options(flags, layers, std::nullopt, false, false).host_budget.slots_by_layer,
            (std::map<int64_t, int64_t>{{0, 3}, {2, 2}}));
  flags.host_budget = "total:3";  // 2 + 1: layer 2 below its 2 slots
  EXPECT_THROW(expert_store_options(flags, layers, std::nullopt, false, false), Error);
  flags.host_budget = "1";
  EXPECT_THROW(expert_store_options(flags, layers, std::nullopt, false, false), Error);
  flags.tier = "host";
  flags.host_budget = "4";
  EXPECT_THROW(check_expert_store_flags(flags), Error);
}

}  // namespace
}  // namespace epic::cli
