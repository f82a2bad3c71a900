// Placement planner properties over many random models (uneven and masked expert counts, 1..9
// workers, uniform and Zipf profiles): every rule a plan keeps, determinism, greedy replica choice;
// then balance against round robin on Zipf(1.2), and the even split of worker_for.
#include <gtest/gtest.h>

#include <iostream>
#include <limits>
#include <map>
#include <set>

#include "coordinator/placement.h"
#include "tests/placement/placement_test_support.h"

namespace epic {
namespace {

using testing::all_present;
using testing::expected_slots;
using testing::fresh_seed;
using testing::random_request;
using testing::seed_trace;
using testing::zipf_counts;

// The load the planner must assume for an expert: the profile count, or 1 per present expert when
// the profile lacks the layer or has only zeros for its present experts; 0 for masked experts.
std::vector<double> expected_loads(const PlacementRequest& request, const LayerExperts& layer) {
  std::vector<double> load(layer.num_experts, 0.0);
  double total = 0.0;
  auto entry = request.profile.load.find(layer.layer);
  for (int64_t expert = 0; expert < layer.num_experts; ++expert) {
    if (layer.present[expert] && entry != request.profile.load.end()) load[expert] = entry->second[expert];
    total += load[expert];
  }
  if (total == 0.0) {
    for (int64_t expert = 0; expert < layer.num_experts; ++expert)
      load[expert] = layer.present[expert] ? 1.0 : 0.0;
  }
  return load;
}

// Every rule of a planner's plan, checked from the request alone.
void check_plan(const PlacementRequest& request, const PlacementPlan& plan) {
  std::vector<LayerExperts> layers = request.layers;
  std::sort(layers.begin(), layers.end(), [](const auto& a, const auto& b) { return a.layer < b.layer; });
  const int num_workers = request.num_workers;
  ASSERT_EQ(num_workers, plan.num_workers);
  ASSERT_EQ(layers.size(), plan.layers.size());
  for (size_t i = 0; i < layers.size(); ++i) {
    const LayerExperts& experts = layers[i];
    const LayerPlacement& placement = plan.layers[i];
    SCOPED_TRACE("layer " + std::to_string(experts.layer));
    ASSERT_EQ(experts.layer, placement.layer);
    ASSERT_EQ(&plan.layer(experts.layer), &placement);
    ASSERT_EQ(experts.num_experts, placement.num_experts);
    const int64_t slots = expected_slots(request, experts);
    ASSERT_EQ(slots, placement.slots_per_worker);
    ASSERT_EQ(static_cast<size_t>(num_workers), placement.worker_experts.size());
    ASSERT_EQ(static_cast<size_t>(experts.num_experts), placement.expert_workers.size());

    int64_t placed_replicas = 0;
    for (int worker = 0; worker < num_workers; ++worker) {
      const std::vector<int64_t>& hosted = placement.worker_experts[worker];
      ASSERT_LE(static_cast<int64_t>(hosted.size()), slots) << "worker " << worker << " is over its slots";
      for (size_t k = 0; k < hosted.size(); ++k) {
        ASSERT_GE(hosted[k], 0);
        ASSERT_LT(hosted[k], experts.num_experts);
        ASSERT_TRUE(experts.present[hosted[k]])
            << "masked expert " << hosted[k] << " placed on worker " << worker;
        if (k > 0) {
          ASSERT_LT(hosted[k - 1], hosted[k]) << "worker " << worker << ": duplicate or unsorted replica";
        }
        const auto& holders = placement.expert_workers[hosted[k]];
        ASSERT_TRUE(std::binary_search(holders.begin(), holders.end(), worker))
            << "expert_workers[" << hosted[k] << "] lacks worker " << worker;
        ASSERT_TRUE(plan.hosts(worker, experts.layer, hosted[k]));
      }
      placed_replicas += static_cast<int64_t>(hosted.size());
    }
    // Slots never exceed the present experts, so replicas fill every slot.
    EXPECT_EQ(num_workers * slots, placed_replicas) << "spare slots left empty";

    int64_t listed_replicas = 0;
    for (int64_t expert = 0; expert < experts.num_experts; ++expert) {
      const std::vector<int>& holders = placement.expert_workers[expert];
      if (!experts.present[expert]) {
        ASSERT_TRUE(holders.empty()) << "masked expert " << expert << " has replicas";
        continue;
      }
      ASSERT_FALSE(holders.empty()) << "present expert " << expert << " is placed nowhere";
      ASSERT_LE(holders.size(), static_cast<size_t>(num_workers));
      ASSERT_TRUE(std::is_sorted(holders.begin(), holders.end()));
      listed_replicas += static_cast<int64_t>(holders.size());
    }
    ASSERT_EQ(placed_replicas, listed_replicas) << "expert_workers and worker_experts disagree";

    const std::vector<double> load = expected_loads(request, experts);
    ASSERT_EQ(load, placement.expert_load);
    const double total = std::accumulate(load.begin(), load.end(), 0.0);
    double worker_total = 0.0;
    for (int worker = 0; worker < num_workers; ++worker) {
      double expected = 0.0;
      for (int64_t expert : placement.worker_experts[worker]) {
        expected += load[expert] / static_cast<double>(placement.expert_workers[expert].size());
      }
      EXPECT_NEAR(expected, placement.worker_load[worker], 1e-9 * total) << "worker " << worker;
      worker_total += placement.worker_load[worker];
    }
    EXPECT_NEAR(total, worker_total, 1e-9 * total) << "worker loads do not add up to the layer's load";
    const double mean = worker_total / num_workers;
    const double max = *std::max_element(placement.worker_load.begin(), placement.worker_load.end());
    EXPECT_NEAR(max / mean, placement.max_over_mean_load(), 1e-12);

    // Replicas went greedily to the largest load per replica: no expert that could take another
    // replica would have a larger per-replica load than the last replica some expert received.
    double best_unreplicated = 0.0;
    double worst_replicated = std::numeric_limits<double>::infinity();
    for (int64_t expert = 0; expert < experts.num_experts; ++expert) {
      const double replicas = static_cast<double>(placement.expert_workers[expert].size());
      if (replicas == 0) continue;
      if (replicas < num_workers) best_unreplicated = std::max(best_unreplicated, load[expert] / replicas);
      if (replicas > 1) worst_replicated = std::min(worst_replicated, load[expert] / (replicas - 1));
    }
    EXPECT_LE(best_unreplicated, worst_replicated * (1 + 1e-12)) << "a replica went to a cooler expert";
  }
}

TEST(PlacementProperties, RandomModelsAndProfiles) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937_64 rng(seed);
  constexpr int kNumCases = 600;
  for (int index = 0; index < kNumCases; ++index) {
    std::string description;
    PlacementRequest request = random_request(rng, description);
    SCOPED_TRACE("case " + std::to_string(index) + ": " + description);
    const PlacementPlan plan = plan_placement(request);
    ASSERT_NO_FATAL_FAILURE(check_plan(request, plan));

    // Deterministic, and independent of the order in which the request lists its layers.
    const std::string json_text = plan.to_json_text();
    ASSERT_EQ(json_text, plan_placement(request).to_json_text());
    std::reverse(request.layers.begin(), request.layers.end());
    ASSERT_EQ(json_text, plan_placement(request).to_json_text());

    // The baseline keeps the same rules apart from filling spare slots.
    const PlacementPlan baseline = round_robin_placement(request);
    for (const LayerPlacement& layer : baseline.layers) {
      for (int64_t expert = 0; expert < layer.num_experts; ++expert) {
        if (!layer.expert_workers[expert].empty()) {
          ASSERT_EQ(std::vector<int>{static_cast<int>(expert % request.num_workers)},
                    layer.expert_workers[expert]);
        }
      }
    }
  }
}

// Found by search: with many ties, greedy packing ends with free slots only on workers that
// already hold the next expert's replica, and the planner must move an expert to make room.
TEST(PlacementProperties, PackingThatRunsOutOfEligibleWorkers) {
  const std::vector<std::pair<int64_t, std::vector<double>>> cases = {
      {11, {2, 2, 2, 1, 2, 2, 1, 1, 1, 1, 1, 1, 2, 2, 1, 1, 1}},
      {9, {1, 2, 1, 2, 2, 2, 1, 1, 2, 2, 1, 2}},
      {8, {1, 1, 2, 1, 1, 2, 2, 1, 2, 1, 1, 2, 1}},
      {9, {2, 1, 2, 1, 2, 1, 1, 1, 2, 2, 2, 1, 2}},
  };
  for (const auto& [slots, counts] : cases) {
    PlacementRequest request;
    request.num_workers = 3;
    request.slots_per_worker = slots;
    request.layers = {all_present(0, static_cast<int64_t>(counts.size()))};
    request.profile.load[0] = counts;
    SCOPED_TRACE("slots " + std::to_string(slots) + ", " + std::to_string(counts.size()) + " experts");
    const PlacementPlan plan = plan_placement(request);
    ASSERT_NO_FATAL_FAILURE(check_plan(request, plan));
    EXPECT_LE(plan.layer(0).max_over_mean_load(), 1.1);
  }
}

// Zipf(1.2) over 128 experts on 8 workers with 2 spare slots each: replicas of the hottest experts
// and largest-first packing must beat round robin clearly (the hottest expert alone carries about
// a quarter of the tokens, twice a worker's fair share).
TEST(PlacementBalance, ZipfBeatsRoundRobin) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937_64 rng(seed);
  double planner_worst = 0.0;
  double round_robin_best = std::numeric_limits<double>::infinity();
  for (int trial = 0; trial < 20; ++trial) {
    PlacementRequest request;
    request.num_workers = 8;
    request.slots_per_worker = 16 + 2;
    request.layers = {all_present(0, 128)};
    request.profile.load[0] = zipf_counts(128, 1.2, rng);
    SCOPED_TRACE("trial " + std::to_string(trial));
    const double planner = plan_placement(request).layer(0).max_over_mean_load();
    request.slots_per_worker.reset();  // round robin ignores slots
    const double round_robin = round_robin_placement(request).layer(0).max_over_mean_load();
    if (trial < 3) {
      std::cout << "[ balance  ] Zipf(1.2), 128 experts, 8 workers, 18 slots: planner max/mean " << planner
                << ", round robin " << round_robin << "\n";
    }
    EXPECT_LE(planner, 0.8 * round_robin);
    EXPECT_LE(planner, 1.3);
    planner_worst = std::max(planner_worst, planner);
    round_robin_best = std::min(round_robin_best, round_robin);
  }
  std::cout << "[ balance  ] over 20 profiles: planner worst " << planner_worst << ", round robin best "
            << round_robin_best << "\n";
}

TEST(PlacementBalance, UniformExactDivisionIsPerfect) {
  for (int64_t slots : {16, 18, 20}) {
    SCOPED_TRACE("slots " + std::to_string(slots));
    PlacementRequest request;
    request.num_workers = 8;
    request.slots_per_worker = slots;
    request.layers = {all_present(0, 128)};
    const PlacementPlan plan = plan_placement(request);
    EXPECT_EQ(1.0, plan.layer(0).max_over_mean_load());
    for (const auto& hosted : plan.layer(0).worker_experts)
      EXPECT_EQ(static_cast<size_t>(slots), hosted.size());
  }
}

// Hand-checked small case: 2 workers, 2 slots, loads 6/2/1: expert 0 takes the spare slot
// (6 > 2 > 1), its replicas 3+3 go to workers 0 and 1, then expert 1 to worker 0 (ties: lower
// worker), expert 2 to worker 1: loads 5 and 4.
TEST(PlacementBalance, SmallCaseByHand) {
  PlacementRequest request;
  request.num_workers = 2;
  request.slots_per_worker = 2;
  request.layers = {all_present(0, 3)};
  request.profile.load[0] = {6, 2, 1};
  const PlacementPlan plan = plan_placement(request);
  const LayerPlacement& layer = plan.layer(0);
  EXPECT_EQ((std::vector<std::vector<int64_t>>{{0, 1}, {0, 2}}), layer.worker_experts);
  EXPECT_EQ((std::vector<std::vector<int>>{{0, 1}, {0}, {1}}), layer.expert_workers);
  EXPECT_EQ((std::vector<double>{5, 4}), layer.worker_load);
  EXPECT_DOUBLE_EQ(5.0 / 4.5, layer.max_over_mean_load());
}

TEST(PlacementBalance, AllZeroLoadIsUniform) {
  EXPECT_EQ(1.0, LayerPlacement{}.max_over_mean_load());
  LayerPlacement idle;
  idle.worker_load = {0, 0, 0};
  EXPECT_EQ(1.0, idle.max_over_mean_load());
}

TEST(PlacementWorkerFor, OccurrencesSplitEvenlyOverReplicas) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937_64 rng(seed);
  PlacementRequest request;
  request.num_workers = 7;
  request.slots_per_worker = 17;  // 105 present experts need 15: 14 spare replicas
  LayerExperts layer = all_present(3, 112);
  for (int64_t expert = 0; expert < 112; expert += 16) layer.present[expert] = 0;
  request.layers = {layer};
  request.profile.load[3] = zipf_counts(112, 1.3, rng);
  const PlacementPlan plan = plan_placement(request);
  const LayerPlacement& placement = plan.layer(3);

  const uint64_t first_key = rng() >> 1;  // any start: the split depends only on the key mod replicas
  const uint64_t num_occurrences = 1000 + rng() % 100;
  int replicated = 0;
  for (int64_t expert = 0; expert < 112; ++expert) {
    if (!layer.present[expert]) continue;
    std::map<int, uint64_t> counts;
    for (uint64_t key = first_key; key < first_key + num_occurrences; ++key) {
      const int worker = plan.worker_for(3, expert, key);
      ASSERT_TRUE(plan.hosts(worker, 3, expert)) << "expert " << expert << " sent to worker " << worker;
      ASSERT_EQ(worker, plan.worker_for(3, expert, key)) << "not deterministic";
      ++counts[worker];
    }
    ASSERT_EQ(placement.expert_workers[expert].size(), counts.size())
        << "expert " << expert << ": a replica is idle";
    uint64_t low = UINT64_MAX, high = 0;
    for (const auto& [worker, count] : counts) {
      low = std::min(low, count);
      high = std::max(high, count);
    }
    EXPECT_LE(high - low, 1u) << "expert " << expert << " replicas get " << low << " to " << high
                              << " occurrences";
    if (counts.size() > 1) ++replicated;
  }
  EXPECT_GT(replicated, 0) << "the case should have replicated experts";
}

TEST(PlacementWorkerFor, MaskedUnknownExpertOrLayerIsAnInternalError) {
  PlacementRequest request;
  request.num_workers = 2;
  LayerExperts layer = all_present(5, 4);
  layer.present[2] = 0;
  request.layers = {layer};
  const PlacementPlan plan = plan_placement(request);
  testing::expect_error([&] { plan.worker_for(5, 2, 0); }, ErrorCode::kInternal,
                        {"layer 5", "expert 2", "masked"});
  testing::expect_error([&] { plan.worker_for(5, 4, 0); }, ErrorCode::kInternal,
                        {"expert 4", "out of range"});
  testing::expect_error([&] { plan.worker_for(5, -1, 0); }, ErrorCode::kInternal,
                        {"expert -1", "out of range"});
  testing::expect_error([&] { plan.worker_for(6, 0, 0); }, ErrorCode::kInternal, {"no MoE layer 6"});
  testing::expect_error([&] { plan.hosts(2, 5, 0); }, ErrorCode::kInternal, {"worker 2", "out of range"});
  EXPECT_FALSE(plan.hosts(0, 5, 2));
  EXPECT_FALSE(plan.hosts(1, 5, 2));
}

}  // namespace
}  // namespace epic
