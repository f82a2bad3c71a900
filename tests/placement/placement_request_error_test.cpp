// Placement requests the planner must refuse, one test per error, each checking the code and the
// words that tell the user what is wrong and the minimum that works; and the budget arithmetic.
#include <gtest/gtest.h>

#include <limits>

#include "coordinator/placement.h"
#include "tests/placement/placement_test_support.h"

namespace epic {
namespace {

using testing::all_present;
using testing::expect_error;
using testing::expect_same_plan;

constexpr ErrorCode kBad = ErrorCode::kInvalidArgument;
constexpr uint64_t kExpertBytes = 9 * 1024 * 1024;  // one Qwen3-Omni expert in bf16

PlacementRequest two_layers_of_128(int num_workers) {
  PlacementRequest request;
  request.num_workers = num_workers;
  request.layers = {all_present(0, 128), all_present(1, 128)};
  return request;
}

TEST(PlacementRequestErrors, TooFewSlotsNamesTheLayerAndTheMinimum) {
  PlacementRequest request;
  request.num_workers = 3;
  LayerExperts small = all_present(0, 6);
  LayerExperts large = all_present(4, 11);
  large.present[10] = 0;  // 10 present over 3 workers: 4 slots
  request.layers = {small, large};
  request.slots_per_worker = 3;
  expect_error([&] { plan_placement(request); }, kBad,
               {"slots_per_worker 3", "layer 4", "10 present experts", "3 workers", "minimum is 4"});
  request.slots_per_worker = 4;
  EXPECT_EQ(4, plan_placement(request).layer(4).slots_per_worker);
  EXPECT_EQ(4, plan_placement(request).layer(0).slots_per_worker);
  request.slots_per_worker = 0;
  expect_error([&] { plan_placement(request); }, kBad, {"slots_per_worker is 0", "at least 1"});
}

TEST(PlacementRequestErrors, ZeroWorkers) {
  PlacementRequest request = two_layers_of_128(0);
  expect_error([&] { plan_placement(request); }, kBad, {"num_workers is 0", "at least 1"});
  expect_error([&] { round_robin_placement(request); }, kBad, {"num_workers is 0"});
  request.num_workers = -2;
  expect_error([&] { plan_placement(request); }, kBad, {"num_workers is -2"});
}

TEST(PlacementRequestErrors, BudgetTooSmallGivesTheMinimumBudget) {
  PlacementRequest request = two_layers_of_128(8);
  request.expert_bytes = kExpertBytes;
  // 128 experts over 8 workers need 16 slots in each of 2 layers: 32 experts of 9 MiB.
  const uint64_t minimum = 16 * kExpertBytes * 2;
  request.budget_bytes = minimum - 1;
  expect_error([&] { plan_placement(request); }, kBad,
               {"budget_bytes", "15 slots per worker per layer", "2 MoE layers", "layer 0",
                "minimum budget is " + std::to_string(minimum) + " bytes", "288.0 MiB"});
  request.budget_bytes = 1;
  expect_error([&] { plan_placement(request); }, kBad, {"0 slots", std::to_string(minimum)});
}

TEST(PlacementRequestErrors, BudgetSlotsAreFlooredAndCappedPerLayer) {
  PlacementRequest request = two_layers_of_128(8);
  request.layers.push_back(all_present(7, 20));  // a small layer: capped at its 20 experts
  request.expert_bytes = kExpertBytes;
  const uint64_t per_slot = kExpertBytes * 3;
  request.budget_bytes = 24 * per_slot + per_slot - 1;  // pays for 24 slots, not 25
  const PlacementPlan plan = plan_placement(request);
  EXPECT_EQ(24, plan.layer(0).slots_per_worker);
  EXPECT_EQ(24, plan.layer(1).slots_per_worker);
  EXPECT_EQ(20, plan.layer(7).slots_per_worker);
  for (int worker = 0; worker < 8; ++worker) EXPECT_EQ(20u, plan.layer(7).worker_experts[worker].size());
}

TEST(PlacementRequestErrors, BudgetNeedsExpertBytesAndExcludesSlots) {
  PlacementRequest request = two_layers_of_128(8);
  request.budget_bytes = uint64_t{1} << 40;
  expect_error([&] { plan_placement(request); }, kBad, {"expert_bytes is 0"});
  request.expert_bytes = kExpertBytes;
  request.slots_per_worker = 16;
  expect_error([&] { plan_placement(request); }, kBad, {"both slots_per_worker and budget_bytes"});
}

TEST(PlacementRequestErrors, ProfileCountMismatchNamesLayerAndBothCounts) {
  PlacementRequest request;
  request.num_workers = 2;
  request.layers = {all_present(1, 8), all_present(3, 12)};
  request.profile.load[3] = std::vector<double>(10, 1.0);
  expect_error([&] { plan_placement(request); }, kBad, {"layer 3", "10 counts", "12 experts"});
  expect_error([&] { round_robin_placement(request); }, kBad, {"layer 3", "10 counts", "12 experts"});
}

TEST(PlacementRequestErrors, ProfileLayerNotInTheModel) {
  PlacementRequest request;
  request.num_workers = 2;
  request.layers = {all_present(1, 8)};
  request.profile.load[2] = std::vector<double>(8, 1.0);
  expect_error([&] { plan_placement(request); }, kBad, {"layer 2", "not a MoE layer"});
}

TEST(PlacementRequestErrors, NegativeOrNonFiniteProfileCount) {
  PlacementRequest request;
  request.num_workers = 2;
  request.layers = {all_present(1, 4)};
  request.profile.load[1] = {1, -3, 2, 2};
  expect_error([&] { plan_placement(request); }, kBad, {"layer 1 expert 1", "non-negative"});
  request.profile.load[1] = {1, 2, std::numeric_limits<double>::infinity(), 2};
  expect_error([&] { plan_placement(request); }, kBad, {"layer 1 expert 2", "finite"});
}

TEST(PlacementRequestErrors, MalformedLayers) {
  PlacementRequest request;
  request.num_workers = 2;
  request.layers = {all_present(1, 4)};
  request.layers[0].present.pop_back();
  expect_error([&] { plan_placement(request); }, kBad, {"layer 1", "present mask of 3 entries", "4 experts"});
  request.layers = {all_present(1, 4), all_present(1, 4)};
  expect_error([&] { plan_placement(request); }, kBad, {"layer 1", "listed twice"});
  request.layers = {all_present(1, 0)};
  expect_error([&] { plan_placement(request); }, kBad, {"layer 1", "0 experts"});
}

// Masked experts take no slot: the minimum counts present experts only, and a fully masked
// layer gets an empty placement rather than an error.
TEST(PlacementRequestErrors, MaskedExpertsLowerTheMinimum) {
  PlacementRequest request;
  request.num_workers = 4;
  LayerExperts layer = all_present(0, 10);
  layer.present[0] = layer.present[9] = 0;
  LayerExperts empty{2, 3, {0, 0, 0}};
  request.layers = {layer, empty};
  request.slots_per_worker = 2;  // 8 present over 4 workers
  const PlacementPlan plan = plan_placement(request);
  EXPECT_TRUE(plan.layer(0).expert_workers[0].empty());
  EXPECT_TRUE(plan.layer(0).expert_workers[9].empty());
  EXPECT_EQ(0, plan.layer(2).slots_per_worker);
  EXPECT_EQ(1.0, plan.layer(2).max_over_mean_load());
  expect_same_plan(plan, PlacementPlan::from_json_text(plan.to_json_text(), "masked.json"));
  expect_same_plan(plan, PlacementPlan::from_cereal_bytes(plan.to_cereal_bytes()));
}

}  // namespace
}  // namespace epic
