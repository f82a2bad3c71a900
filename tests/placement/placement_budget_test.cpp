// The planner with an expert budget (coordinator/placement_residency.h, PlacementRequest::resident_slots):
// a worker's expected cost is its load plus (miss_cost - 1) x the load past its hottest `resident` experts.
// Checked: the cost function against a brute-force reading of its definition; a hand-worked layer where
// load-balanced packing leaves one worker with every miss; and, on random Zipf layers with fresh seeds, that
// the pass keeps every rule of a plan (each expert's replica count, no expert twice on a worker, slots, the
// nodes that hold each expert), never raises the largest cost, and stops only where no single swap lowers
// the costliest worker below its cost.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "coordinator/placement.h"
#include "coordinator/placement_residency.h"
#include "tests/placement/placement_test_support.h"

namespace epic {
namespace {

using testing::fresh_seed;
using testing::seed_trace;

// The definition, computed plainly: sort the hosted weights, the resident are the first `resident`.
double cost_by_definition(std::vector<int64_t> hosted, const std::vector<double>& weight, int64_t resident,
                          double miss_cost) {
  std::sort(hosted.begin(), hosted.end(), [&](int64_t a, int64_t b) { return weight[a] > weight[b]; });
  double load = 0, miss = 0;
  for (size_t i = 0; i < hosted.size(); ++i) {
    load += weight[hosted[i]];
    if (static_cast<int64_t>(i) >= resident) miss += weight[hosted[i]];
  }
  return load + (miss_cost - 1.0) * miss;
}

double largest_cost(const std::vector<std::vector<int64_t>>& hosted, const std::vector<double>& weight,
                    const std::vector<int64_t>& resident, double miss_cost) {
  double largest = 0;
  for (size_t w = 0; w < hosted.size(); ++w)
    largest = std::max(largest, expected_budget_cost(hosted[w], weight, resident[w], miss_cost));
  return largest;
}

TEST(PlacementBudget, CostIsLoadPlusTheMissesAtTheirCost) {
  const std::vector<double> weight = {10, 4, 4, 4, 3, 3, 1, 1};
  EXPECT_DOUBLE_EQ(expected_miss_load({0, 4, 6, 7}, weight, 1), 5.0);
  EXPECT_DOUBLE_EQ(expected_budget_cost({0, 4, 6, 7}, weight, 1, 16.0), 15.0 + 15.0 * 5.0);
  EXPECT_DOUBLE_EQ(expected_budget_cost({0, 4, 6, 7}, weight, 0, 16.0), 16.0 * 15.0);
  EXPECT_DOUBLE_EQ(expected_budget_cost({0, 4, 6, 7}, weight, 9, 16.0), 15.0);  // all resident
  EXPECT_DOUBLE_EQ(expected_budget_cost({}, weight, 2, 16.0), 0.0);
}

// Two workers of four slots, one resident each. Load-balanced packing gives 10,3,1,1 | 4,4,4,3 (15 each):
// the second worker's misses are 11 against the first's 5, a cost of 15 + 15 x 11 = 180. The pass trades
// load for misses until no swap helps, and must end below that.
TEST(PlacementBudget, HandWorkedLayerMovesMissesOffTheCostliestWorker) {
  const std::vector<double> weight = {10, 4, 4, 4, 3, 3, 1, 1};
  std::vector<std::vector<int64_t>> hosted = {{0, 4, 6, 7}, {1, 2, 3, 5}};
  const std::vector<int64_t> resident = {1, 1};
  const double before = largest_cost(hosted, weight, resident, 16.0);
  EXPECT_DOUBLE_EQ(before, 180.0);
  const int64_t swaps = balance_budget_cost(hosted, weight, resident, {}, 16.0, 100);
  EXPECT_GT(swaps, 0);
  const double after = largest_cost(hosted, weight, resident, 16.0);
  EXPECT_LT(after, before);
  // The best plan of all 70 splits bounds what a swap search can reach.
  double best = before;
  for (int mask = 0; mask < 256; ++mask) {
    if (__builtin_popcount(mask) != 4) continue;
    std::vector<std::vector<int64_t>> split(2);
    for (int64_t e = 0; e < 8; ++e) split[(mask >> e) & 1].push_back(e);
    best = std::min(best, largest_cost(split, weight, resident, 16.0));
  }
  EXPECT_GE(after, best);
  EXPECT_LE(after, best * 1.15) << "the swap search ends far from the best split";
  for (const auto& experts : hosted) EXPECT_EQ(experts.size(), 4u);
  // miss_cost 1: cost is load alone, and the balanced split cannot be improved.
  std::vector<std::vector<int64_t>> balanced = {{0, 4, 6, 7}, {1, 2, 3, 5}};
  EXPECT_EQ(balance_budget_cost(balanced, weight, resident, {}, 1.0, 100), 0);
}

// No single legal swap between the costliest worker and another (same node) lowers the pair below it.
bool no_improving_swap(const std::vector<std::vector<int64_t>>& hosted, const std::vector<double>& weight,
                       const std::vector<int64_t>& resident, const std::vector<int>& node, double miss_cost) {
  const int64_t workers = static_cast<int64_t>(hosted.size());
  int64_t high = 0;
  for (int64_t w = 1; w < workers; ++w)
    if (expected_budget_cost(hosted[w], weight, resident[w], miss_cost) >
        expected_budget_cost(hosted[high], weight, resident[high], miss_cost))
      high = w;
  const double current = expected_budget_cost(hosted[high], weight, resident[high], miss_cost);
  for (int64_t other = 0; other < workers; ++other) {
    if (other == high || (!node.empty() && node[other] != node[high])) continue;
    for (int64_t out : hosted[high]) {
      if (std::count(hosted[other].begin(), hosted[other].end(), out)) continue;
      for (int64_t in : hosted[other]) {
        if (std::count(hosted[high].begin(), hosted[high].end(), in)) continue;
        std::vector<int64_t> a = hosted[high], b = hosted[other];
        *std::find(a.begin(), a.end(), out) = in;
        *std::find(b.begin(), b.end(), in) = out;
        const double pair = std::max(cost_by_definition(a, weight, resident[high], miss_cost),
                                     cost_by_definition(b, weight, resident[other], miss_cost));
        if (pair < current * (1 - 1e-9)) return false;
      }
    }
  }
  return true;
}

TEST(PlacementBudget, RandomLayersKeepThePlanRulesAndEndAtALocalBest) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937_64 rng(seed);
  for (int round = 0; round < 40; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    const int64_t workers = 2 + static_cast<int64_t>(rng() % 5);
    const int64_t experts = workers * (2 + static_cast<int64_t>(rng() % 6)) + static_cast<int64_t>(rng() % 3);
    const std::vector<double> counts = testing::zipf_counts(experts, 0.6 + 0.2 * (rng() % 5), rng);
    std::vector<double> weight = counts;
    // A random legal layout: each expert on one worker, a few replicated (weight split between them).
    const int64_t slots = (experts + workers - 1) / workers + static_cast<int64_t>(rng() % 2);
    std::vector<std::vector<int64_t>> hosted(static_cast<size_t>(workers));
    std::vector<int64_t> order(static_cast<size_t>(experts));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    for (size_t i = 0; i < order.size(); ++i) hosted[i % workers].push_back(order[i]);
    std::vector<int64_t> replicas(static_cast<size_t>(experts), 1);
    for (int64_t w = 0; w < workers; ++w)
      while (static_cast<int64_t>(hosted[w].size()) < slots) {
        const int64_t expert = static_cast<int64_t>(rng() % experts);
        if (std::count(hosted[w].begin(), hosted[w].end(), expert)) continue;
        hosted[w].push_back(expert);
        ++replicas[expert];
      }
    for (int64_t e = 0; e < experts; ++e) weight[e] /= static_cast<double>(replicas[e]);
    for (auto& list : hosted) std::sort(list.begin(), list.end());
    std::vector<int64_t> resident(static_cast<size_t>(workers));
    for (int64_t& r : resident) r = static_cast<int64_t>(rng() % (slots + 1));
    std::vector<int> node;
    if (rng() % 2) {
      for (int64_t w = 0; w < workers; ++w) node.push_back(static_cast<int>(w % 2));
    }
    const double miss_cost = 1.0 + static_cast<double>(rng() % 32);
    auto node_holdings = [&](const std::vector<std::vector<int64_t>>& layout) {
      std::map<std::pair<int, int64_t>, int> held;
      for (int64_t w = 0; w < workers; ++w)
        for (int64_t e : layout[w]) ++held[{node.empty() ? 0 : node[w], e}];
      return held;
    };
    const auto holdings_before = node_holdings(hosted);
    const double before = largest_cost(hosted, weight, resident, miss_cost);
    const int64_t max_swaps = 1000;
    const int64_t swaps = balance_budget_cost(hosted, weight, resident, node, miss_cost, max_swaps);
    EXPECT_LE(largest_cost(hosted, weight, resident, miss_cost), before * (1 + 1e-12));
    EXPECT_EQ(node_holdings(hosted), holdings_before) << "an expert changed node, or its replica count";
    for (int64_t w = 0; w < workers; ++w) {
      EXPECT_EQ(static_cast<int64_t>(hosted[w].size()), slots);
      EXPECT_TRUE(std::is_sorted(hosted[w].begin(), hosted[w].end()));
      EXPECT_EQ(std::set<int64_t>(hosted[w].begin(), hosted[w].end()).size(), hosted[w].size())
          << "an expert twice on worker " << w;
    }
    if (swaps < max_swaps) {
      EXPECT_TRUE(no_improving_swap(hosted, weight, resident, node, miss_cost));
    }
  }
}

// Through plan_placement: a budget changes the plan only by swaps (every rule holds: the planner's self
// check would throw), and the largest expected cost of every layer is no higher than the plan without it.
TEST(PlacementBudget, PlanWithABudgetIsNoCostlierThanThePlanWithout) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937_64 rng(seed);
  PlacementRequest request;
  request.num_workers = 4;
  for (int64_t layer = 0; layer < 3; ++layer) {
    request.layers.push_back(testing::all_present(layer, 32 + 4 * layer));
    request.profile.load[layer] = testing::zipf_counts(32 + 4 * layer, 1.0, rng);
  }
  const PlacementPlan without = plan_placement(request);
  const int64_t resident = 3;
  request.resident_slots = [&](const std::map<int64_t, int64_t>& hosted) {
    std::map<int64_t, int64_t> slots;
    for (const auto& [layer, count] : hosted) slots[layer] = std::min(count, resident);
    return slots;
  };
  const PlacementPlan with = plan_placement(request);
  for (size_t i = 0; i < with.layers.size(); ++i) {
    SCOPED_TRACE("layer " + std::to_string(with.layers[i].layer));
    const LayerPlacement& a = without.layers[i];
    const LayerPlacement& b = with.layers[i];
    EXPECT_EQ(a.slots_per_worker, b.slots_per_worker);
    std::vector<double> weight(a.expert_load.size(), 0.0);
    for (size_t e = 0; e < weight.size(); ++e)
      weight[e] = a.expert_load[e] / static_cast<double>(a.expert_workers[e].size());
    const std::vector<int64_t> residents(4, resident);
    EXPECT_LE(largest_cost(b.worker_experts, weight, residents, request.miss_cost),
              largest_cost(a.worker_experts, weight, residents, request.miss_cost) * (1 + 1e-12));
    for (size_t e = 0; e < weight.size(); ++e)
      EXPECT_EQ(a.expert_workers[e].size(), b.expert_workers[e].size());
  }
}

}  // namespace
}  // namespace epic
