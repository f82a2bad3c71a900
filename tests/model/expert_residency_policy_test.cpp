// The expert cache's residency bookkeeping: hand-worked eviction sequences for each policy, pinning,
// counters, the total -> per-layer budget split on uneven layers, bad input, and random
// access streams checked against reference models (a std::list for LRU, full histories for all).
#include "worker/expert_residency_policy.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <list>
#include <random>
#include <set>
#include <string>

#include "kernels/error.h"
#include "tests/support/expect_error.h"

namespace epic {
namespace {

using testing::expect_error;

// Expert ids of the hand-worked sequences, named as in their comments. b's id is above a's so that a
// tie resolved by recency is told apart from one resolved by id.
constexpr int64_t kA = 10, kB = 11, kC = 12, kD = 13;
constexpr int64_t kLayer = 3;

ResidencyBudget one_layer(int64_t slots) { return ResidencyBudget{{{kLayer, slots}}}; }

// What the caller does per router pick: record it, and bring the expert in on a miss.
Admission access(ExpertResidencySet& set, int64_t expert_id, float weight, int64_t step) {
  set.record_use(kLayer, expert_id, weight, step);
  return set.admit(kLayer, expert_id, step);
}

// evicted_expert as a number for the comparisons (-1: none).
int64_t evicted(const Admission& admission) { return admission.evicted_expert.value_or(-1); }

struct Pick {
  int64_t expert_id;
  float weight;
};

struct EvictionCase {
  const char* name;
  std::vector<Pick> picks;  // all at step 0, decay 1: usefulness is the plain sum of weights
  int64_t lru_victim, lfu_victim, usefulness_victim;
};

// Capacity 2; each sequence ends with the pick that forces the eviction.
TEST(ExpertResidencySet, HandWorkedEvictionsPerPolicy) {
  const std::vector<EvictionCase> cases = {
      // a b a c: a was picked after b, twice, with more weight (1.0 vs 0.5): every policy drops b.
      {"a b a c", {{kA, 0.5f}, {kB, 0.5f}, {kA, 0.5f}, {kC, 0.5f}}, kB, kB, kB},
      // a a b c: b is the more recent (LRU drops a), a has 2 picks to b's 1 (LFU drops b), and b's
      // one weight 0.9 beats a's 0.1 + 0.1 = 0.2 (usefulness drops a).
      {"a a b c", {{kA, 0.1f}, {kA, 0.1f}, {kB, 0.9f}, {kC, 0.5f}}, kA, kB, kA},
      // b a c: one pick each, equal weights: LFU and usefulness tie and fall back to recency, which
      // drops b (the lower id, a, would be the wrong answer).
      {"b a c", {{kB, 0.5f}, {kA, 0.5f}, {kC, 0.5f}}, kB, kB, kB},
  };
  for (const EvictionCase& c : cases) {
    for (EvictionPolicy policy : {EvictionPolicy::kLru, EvictionPolicy::kLfu, EvictionPolicy::kUsefulness}) {
      SCOPED_TRACE(std::string(c.name) + ", " + std::string(eviction_policy_name(policy)));
      const int64_t expected = policy == EvictionPolicy::kLru   ? c.lru_victim
                               : policy == EvictionPolicy::kLfu ? c.lfu_victim
                                                                : c.usefulness_victim;
      ExpertResidencySet set(one_layer(2), policy, 1.0);
      for (size_t i = 0; i + 1 < c.picks.size(); ++i) {
        EXPECT_EQ(-1, evicted(access(set, c.picks[i].expert_id, c.picks[i].weight, 0))) << "pick " << i;
      }
      const Admission last = access(set, c.picks.back().expert_id, c.picks.back().weight, 0);
      EXPECT_TRUE(last.resident);
      EXPECT_EQ(expected, evicted(last));
      EXPECT_FALSE(set.resident(kLayer, expected));
      EXPECT_TRUE(set.resident(kLayer, kC));
      EXPECT_EQ(1, set.counters().evictions);
    }
  }
}

// An admission without a pick (a prefetch) counts as recent: capacity 2, a picked, b admitted
// unpicked, c picked: LRU drops a, not the newcomer b.
TEST(ExpertResidencySet, AdmissionWithoutAPickCountsAsRecentForLru) {
  ExpertResidencySet set(one_layer(2), EvictionPolicy::kLru, 1.0);
  access(set, kA, 0.5f, 0);
  ASSERT_TRUE(set.admit(kLayer, kB, 0).resident);
  EXPECT_EQ(0, set.use_count(kLayer, kB));
  EXPECT_EQ(kA, evicted(access(set, kC, 0.5f, 0)));
}

// Capacity 1: a a b evicts a, then a comes back; LFU counts a's picks while it was out (3 against
// b's 1), so a's return evicts b, and b's next return evicts a only once b has more picks.
TEST(ExpertResidencySet, LfuCountsPicksMadeWhileNotResident) {
  ExpertResidencySet set(one_layer(1), EvictionPolicy::kLfu, 1.0);
  access(set, kA, 0.5f, 0);
  access(set, kA, 0.5f, 0);
  EXPECT_EQ(kA, evicted(access(set, kB, 0.5f, 0)));
  set.record_use(kLayer, kA, 0.5f, 1);  // a missed: 3 picks, b resident with 1
  EXPECT_EQ(3, set.use_count(kLayer, kA));
  EXPECT_EQ(kB, evicted(set.admit(kLayer, kA, 1)));
  EXPECT_EQ(std::vector<int64_t>{kA}, set.resident_experts(kLayer));
}

// Decay 0.5 per step, capacity 2. a is picked at step 0 with weight 0.9; b at step t with 0.2; c
// arrives at step 4. At step 4: a = 0.9 * 0.5^4 = 0.05625, b = 0.2 * 0.5^(4-t).
//   t = 2: b = 0.2 * 0.25 = 0.05 < 0.05625, so the light b goes (not enough steps since a's pick);
//   t = 3: b = 0.2 * 0.5 = 0.1 > 0.05625, so the old heavy a goes.
// (Powers of 0.5 are exact, so the scores are compared exactly.)
TEST(ExpertResidencySet, UsefulnessOldHeavyExpertLosesOnlyAfterEnoughSteps) {
  for (const auto& [b_step, victim] : std::vector<std::pair<int64_t, int64_t>>{{2, kB}, {3, kA}}) {
    SCOPED_TRACE("b picked at step " + std::to_string(b_step));
    ExpertResidencySet set(one_layer(2), EvictionPolicy::kUsefulness, 0.5);
    access(set, kA, 0.9f, 0);
    access(set, kB, 0.2f, b_step);
    set.record_use(kLayer, kC, 0.1f, 4);
    // The weights are floats: 0.9f and 0.2f, not 0.9 and 0.2, times the exact powers.
    EXPECT_DOUBLE_EQ(double(0.9f) * 0.0625, set.usefulness(kLayer, kA, 4));
    EXPECT_DOUBLE_EQ(double(0.2f) * (b_step == 2 ? 0.25 : 0.5), set.usefulness(kLayer, kB, 4));
    EXPECT_EQ(victim, evicted(set.admit(kLayer, kC, 4)));
  }
}

// Lazy decay gives the same number as decaying every step: picks of 0.5 at steps 0 and 1 with decay
// 0.5 are 0.5 * 0.5 + 0.5 = 0.75 at step 1, and 0.75 * 0.5^2 = 0.1875 at step 3; a third pick of
// 0.25 at step 3 makes 0.4375. With decay 1 the score is the plain sum, 1.25.
TEST(ExpertResidencySet, UsefulnessIsADecayedSumOfRoutingWeights) {
  ExpertResidencySet halving(one_layer(4), EvictionPolicy::kUsefulness, 0.5);
  ExpertResidencySet keeping(one_layer(4), EvictionPolicy::kUsefulness, 1.0);
  for (ExpertResidencySet* set : {&halving, &keeping}) {
    set->record_use(kLayer, kA, 0.5f, 0);
    set->record_use(kLayer, kA, 0.5f, 1);
  }
  EXPECT_DOUBLE_EQ(0.75, halving.usefulness(kLayer, kA, 1));
  EXPECT_DOUBLE_EQ(0.1875, halving.usefulness(kLayer, kA, 3));
  halving.record_use(kLayer, kA, 0.25f, 3);
  keeping.record_use(kLayer, kA, 0.25f, 3);
  EXPECT_DOUBLE_EQ(0.4375, halving.usefulness(kLayer, kA, 3));
  EXPECT_DOUBLE_EQ(1.25, keeping.usefulness(kLayer, kA, 7));
  EXPECT_EQ(3, halving.use_count(kLayer, kA));
  EXPECT_EQ(0.0, halving.usefulness(kLayer, kB, 3));  // never picked
}

// record_uses(n, sum) is n record_use calls whose weights sum to `sum` (exactly here: powers of two), and a
// count of zero or a bad sum is refused.
TEST(ExpertResidencySet, RecordUsesIsThatManyPicksWithTheirWeightsSummed) {
  ExpertResidencySet one_by_one(one_layer(4), EvictionPolicy::kUsefulness, 0.5);
  ExpertResidencySet summed(one_layer(4), EvictionPolicy::kUsefulness, 0.5);
  for (float weight : {0.5f, 0.25f, 0.125f}) one_by_one.record_use(kLayer, kA, weight, 2);
  summed.record_uses(kLayer, kA, 3, 0.875, 2);
  EXPECT_EQ(summed.use_count(kLayer, kA), one_by_one.use_count(kLayer, kA));
  EXPECT_DOUBLE_EQ(summed.usefulness(kLayer, kA, 4), one_by_one.usefulness(kLayer, kA, 4));
  EXPECT_EQ(summed.counters().misses, 3);
  expect_error([&] { summed.record_uses(kLayer, kA, 0, 0.5, 2); }, ErrorCode::kInvalidArgument,
               {"0 uses", "at least one"});
  expect_error([&] { summed.record_uses(kLayer, kA, 2, -1.0, 2); }, ErrorCode::kInvalidArgument,
               {"finite and >= 0"});
}

// LRU, capacity 2: a b resident, a the least recent. With a pinned, c evicts b. With a and c pinned
// there is no room for d: refused, nothing changes. After unpin_all, d evicts a (least recent).
TEST(ExpertResidencySet, PinnedExpertsAreNeverEvicted) {
  ExpertResidencySet set(one_layer(2), EvictionPolicy::kLru, 1.0);
  access(set, kA, 0.5f, 0);
  access(set, kB, 0.5f, 0);
  set.pin(kLayer, kA);
  EXPECT_EQ(kB, evicted(access(set, kC, 0.5f, 0)));
  set.pin(kLayer, kC);
  const Admission refused = access(set, kD, 0.5f, 0);
  EXPECT_FALSE(refused.resident);
  EXPECT_EQ(-1, evicted(refused));
  EXPECT_EQ((std::vector<int64_t>{kA, kC}), set.resident_experts(kLayer));
  EXPECT_EQ(1, set.counters().refused_admissions);
  set.unpin_all();
  EXPECT_FALSE(set.pinned(kLayer, kA));
  EXPECT_EQ(kA, evicted(set.admit(kLayer, kD, 1)));
  EXPECT_EQ((std::vector<int64_t>{kC, kD}), set.resident_experts(kLayer));
}

// The same under the score policies: the pinned expert has the lowest count and score, the next one
// goes.
TEST(ExpertResidencySet, PinsHoldUnderLfuAndUsefulness) {
  for (EvictionPolicy policy : {EvictionPolicy::kLfu, EvictionPolicy::kUsefulness}) {
    SCOPED_TRACE(std::string(eviction_policy_name(policy)));
    ExpertResidencySet set(one_layer(2), policy, 0.9);
    access(set, kA, 0.1f, 0);  // a: 1 pick, 0.1
    access(set, kB, 0.4f, 0);  // b: 2 picks, 0.8
    access(set, kB, 0.4f, 0);
    set.pin(kLayer, kA);
    EXPECT_EQ(kB, evicted(access(set, kC, 0.5f, 1)));
  }
}

TEST(ExpertResidencySet, CapacityZeroKeepsTheLayerOffTheTier) {
  ExpertResidencySet set(ResidencyBudget{{{kLayer, 0}, {kLayer + 1, 1}}}, EvictionPolicy::kLru, 1.0);
  for (int i = 0; i < 3; ++i) {
    const Admission admission = access(set, kA, 0.5f, i);
    EXPECT_FALSE(admission.resident);
    EXPECT_EQ(-1, evicted(admission));
  }
  EXPECT_TRUE(set.resident_experts(kLayer).empty());
  const ResidencyCounters counters = set.layer_counters(kLayer);
  EXPECT_EQ(0, counters.hits);
  EXPECT_EQ(3, counters.misses);
  EXPECT_EQ(0, counters.evictions);
  EXPECT_EQ(3, counters.refused_admissions);
  EXPECT_EQ(0, set.capacity(kLayer));
  EXPECT_EQ(1, set.capacity(kLayer + 1));
}

// Layer 1 (2 slots): a b a c a -> miss miss hit miss(evicts b) hit. Layer 2 (1 slot): a a b ->
// miss hit miss(evicts a). Admitting a resident expert changes nothing and counts nothing.
TEST(ExpertResidencySet, CountsHitsMissesAndEvictionsPerLayer) {
  ExpertResidencySet set(ResidencyBudget{{{1, 2}, {2, 1}}}, EvictionPolicy::kLru, 1.0);
  auto pick = [&](int64_t layer, int64_t expert_id) {
    const bool was_resident = set.resident(layer, expert_id);
    set.record_use(layer, expert_id, 0.5f, 0);
    if (!was_resident) {
      EXPECT_TRUE(set.admit(layer, expert_id, 0).resident);
    }
  };
  for (int64_t expert_id : {kA, kB, kA, kC, kA}) pick(1, expert_id);
  for (int64_t expert_id : {kA, kA, kB}) pick(2, expert_id);
  const Admission again = set.admit(1, kA, 0);
  EXPECT_TRUE(again.resident);
  EXPECT_EQ(-1, evicted(again));

  const ResidencyCounters layer1 = set.layer_counters(1), layer2 = set.layer_counters(2),
                          total = set.counters();
  EXPECT_EQ(2, layer1.hits);
  EXPECT_EQ(3, layer1.misses);
  EXPECT_EQ(1, layer1.evictions);
  EXPECT_EQ(1, layer2.hits);
  EXPECT_EQ(2, layer2.misses);
  EXPECT_EQ(1, layer2.evictions);
  EXPECT_EQ(3, total.hits);
  EXPECT_EQ(5, total.misses);
  EXPECT_EQ(2, total.evictions);
  EXPECT_EQ(0, total.refused_admissions);
  EXPECT_EQ((std::vector<int64_t>{kA, kC}), set.resident_experts(1));
  EXPECT_EQ(std::vector<int64_t>{kB}, set.resident_experts(2));
}

std::map<int64_t, std::vector<uint8_t>> layers_with_present_counts(const std::map<int64_t, int64_t>& counts,
                                                                   int64_t num_experts) {
  std::map<int64_t, std::vector<uint8_t>> present_by_layer;
  for (const auto& [layer, count] : counts) {
    // Masked experts spread through the layer, as pruning leaves them.
    std::vector<uint8_t>& present = present_by_layer[layer];
    present.assign(num_experts, 0);
    for (int64_t i = 0; i < count; ++i) present[(i * 7) % num_experts] = 1;
  }
  return present_by_layer;
}

// Layers 1-4 with 29, 24, 29, 26 present experts (108), layer 5 with none, total 50:
// shares 50*29/108 = 13.43 (remainder 1450 % 108 = 46), 50*24/108 = 11.11 (12), 13.43 (46),
// 50*26/108 = 12.04 (4). Floors 13 + 11 + 13 + 12 = 49; the one slot left goes to the largest
// remainder, 46, tied between layers 1 and 3: layer 1. Layer 5 gets 0.
TEST(ResidencyBudgetSplit, ProportionalToPresentExpertsOnUnevenLayers) {
  const auto present = layers_with_present_counts({{1, 29}, {2, 24}, {3, 29}, {4, 26}, {5, 0}}, 32);
  const ResidencyBudget budget = split_residency_budget(50, present);
  EXPECT_EQ((std::map<int64_t, int64_t>{{1, 14}, {2, 11}, {3, 13}, {4, 12}, {5, 0}}), budget.slots_by_layer);
  EXPECT_EQ(50, budget.total_slots());
}

// Layers with 2, 60, 60 present experts (122), total 10: layer 0's share is 10*2/122 = 0.16, so it
// gets 1; the other two share 9 slots over 120 experts: 4.5 each, floors 4 + 4, equal remainders,
// the last slot to the lower id.
TEST(ResidencyBudgetSplit, SmallLayerGetsOneSlotAndTheOthersShareTheRest) {
  const auto present = layers_with_present_counts({{0, 2}, {1, 60}, {2, 60}}, 64);
  EXPECT_EQ((std::map<int64_t, int64_t>{{0, 1}, {1, 5}, {2, 4}}),
            split_residency_budget(10, present).slots_by_layer);
  // Exactly one slot per layer is the smallest budget; one less is an error naming the minimum.
  EXPECT_EQ((std::map<int64_t, int64_t>{{0, 1}, {1, 1}, {2, 1}}),
            split_residency_budget(3, present).slots_by_layer);
  expect_error([&] { split_residency_budget(2, present); }, ErrorCode::kInvalidArgument,
               {"budget of 2", "3 MoE layers", "at least 3"});
  expect_error([&] { split_residency_budget(-1, present); }, ErrorCode::kInvalidArgument, {"-1", "negative"});
}

// A budget that covers every present expert gives each layer all of them, never more.
TEST(ResidencyBudgetSplit, BudgetAboveThePresentExpertsHoldsThemAll) {
  const auto present = layers_with_present_counts({{1, 29}, {2, 24}, {7, 0}}, 32);
  const std::map<int64_t, int64_t> all = {{1, 29}, {2, 24}, {7, 0}};
  EXPECT_EQ(all, split_residency_budget(53, present).slots_by_layer);
  EXPECT_EQ(all, split_residency_budget(1000, present).slots_by_layer);
  EXPECT_TRUE(split_residency_budget(0, {}).slots_by_layer.empty());
}

// Random layer sizes and budgets: the sum is min(total, present), every layer with experts has
// 1..present slots, more present experts never means fewer slots, and when no layer was raised to
// one slot every layer is within one slot of its exact share.
TEST(ResidencyBudgetSplit, RandomLayersKeepTheInvariants) {
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  for (int trial = 0; trial < 2000; ++trial) {
    SCOPED_TRACE("trial " + std::to_string(trial));
    std::map<int64_t, int64_t> counts;
    const int num_layers = std::uniform_int_distribution<int>(1, 60)(rng);
    int64_t num_present = 0, num_layers_with_experts = 0;
    for (int layer = 0; layer < num_layers; ++layer) {
      const int64_t count = std::uniform_int_distribution<int64_t>(0, 8)(rng) == 0
                                ? 0
                                : std::uniform_int_distribution<int64_t>(1, 64)(rng);
      counts[layer] = count;
      num_present += count;
      num_layers_with_experts += count > 0 ? 1 : 0;
    }
    const int64_t total =
        std::uniform_int_distribution<int64_t>(num_layers_with_experts, num_present + 10)(rng);
    const ResidencyBudget budget = split_residency_budget(total, layers_with_present_counts(counts, 64));
    ASSERT_EQ(std::min(total, num_present), budget.total_slots());
    bool any_raised = false;
    for (const auto& [layer, count] : counts) {
      const int64_t slots = budget.slots_by_layer.at(layer);
      ASSERT_EQ(count == 0 ? 0 : 1, std::min<int64_t>(slots, 1)) << "layer " << layer;
      ASSERT_LE(slots, count) << "layer " << layer;
      any_raised = any_raised || (count > 0 && total * count < num_present);
      for (const auto& [other, other_count] : counts) {
        if (count > other_count) {
          ASSERT_GE(slots, budget.slots_by_layer.at(other)) << layer << " vs " << other;
        }
      }
    }
    if (any_raised || total >= num_present) continue;
    for (const auto& [layer, count] : counts) {
      const double share = double(total) * double(count) / double(num_present);
      ASSERT_LT(std::abs(double(budget.slots_by_layer.at(layer)) - share), 1.0) << "layer " << layer;
    }
  }
}

TEST(ExpertResidencySet, PolicyNamesRoundTripAndUnknownNamesListTheValidOnes) {
  for (EvictionPolicy policy : {EvictionPolicy::kLru, EvictionPolicy::kLfu, EvictionPolicy::kUsefulness}) {
    EXPECT_EQ(policy, parse_eviction_policy(eviction_policy_name(policy)));
  }
  EXPECT_EQ("usefulness", eviction_policy_name(EvictionPolicy::kUsefulness));
  for (const char* name : {"LRU", "", "fifo", "lru "}) {
    SCOPED_TRACE(name);
    expect_error([&] { parse_eviction_policy(name); }, ErrorCode::kInvalidArgument,
                 {"--eviction-policy", "'" + std::string(name) + "'", "lru", "lfu", "usefulness"});
  }
}

TEST(ExpertResidencySet, BadInputIsAnErrorNamingWhatIsWrong) {
  for (double decay : {0.0, -0.1, 1.5, std::numeric_limits<double>::quiet_NaN()}) {
    SCOPED_TRACE(decay);
    expect_error([&] { ExpertResidencySet(one_layer(2), EvictionPolicy::kUsefulness, decay); },
                 ErrorCode::kInvalidArgument, {"usefulness decay", "(0, 1]"});
    // Checked whatever the policy, so a bad flag never waits for a policy switch to fail.
    expect_error([&] { ExpertResidencySet(one_layer(2), EvictionPolicy::kLru, decay); },
                 ErrorCode::kInvalidArgument, {"usefulness decay"});
  }
  expect_error(
      [] {
        ExpertResidencySet(ResidencyBudget{{{0, 2}, {4, -1}}}, EvictionPolicy::kLru, 1.0);
      },
      ErrorCode::kInvalidArgument, {"layer 4", "-1 slots", "use 0"});

  ExpertResidencySet set(ResidencyBudget{{{1, 2}, {2, 2}}}, EvictionPolicy::kUsefulness, 0.9);
  expect_error([&] { set.record_use(3, kA, 0.5f, 0); }, ErrorCode::kInvalidArgument,
               {"record_use", "layer 3", "no expert residency budget", "1, 2"});
  expect_error([&] { (void)set.admit(0, kA, 0); }, ErrorCode::kInvalidArgument, {"admit", "layer 0"});
  expect_error([&] { set.pin(1, -2); }, ErrorCode::kInvalidArgument, {"pin", "expert id -2", "negative"});
  for (float weight :
       {-0.5f, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    expect_error([&] { set.record_use(1, kA, weight, 0); }, ErrorCode::kInvalidArgument,
                 {"layer 1", "routing weight", "finite and >= 0"});
  }
  EXPECT_EQ(0, set.use_count(1, kA));  // a refused pick leaves no trace
  set.record_use(1, kA, 0.5f, 5);
  expect_error([&] { set.record_use(1, kA, 0.5f, 4); }, ErrorCode::kInvalidArgument,
               {"step 4", "before step 5", "must not decrease"});
  expect_error([&] { (void)set.admit(2, kB, 3); }, ErrorCode::kInvalidArgument, {"admit", "step 3"});
  expect_error([&] { set.usefulness(1, kA, 2); }, ErrorCode::kInvalidArgument, {"usefulness", "step 2"});
  EXPECT_EQ(1, set.counters().misses);
}

// LRU against the textbook model: per layer a std::list of the resident experts, most recent at the
// front; a hit moves to the front; a miss takes a free slot or drops the backmost unpinned expert.
// Random picks over layers of 3, 1, 0 and 8 slots, 12 experts each, a new step (and unpin_all) every
// 8 picks, and 30% of picks pinned, so refusals (every slot pinned) happen too.
TEST(ExpertResidencySet, LruMatchesAListModelOverRandomAccesses) {
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  const std::map<int64_t, int64_t> capacity = {{0, 3}, {1, 1}, {5, 0}, {7, 8}};
  const std::vector<int64_t> layers = {0, 1, 5, 7};
  constexpr int64_t kNumExperts = 12;
  ExpertResidencySet set(ResidencyBudget{capacity}, EvictionPolicy::kLru, 1.0);

  struct ListLayer {
    std::list<int64_t> recency;  // front: most recently used
    std::set<int64_t> pinned;
    ResidencyCounters counters;
  };
  std::map<int64_t, ListLayer> model;
  int64_t step = 0;
  for (int access = 0; access < 10000; ++access) {
    if (access % 8 == 0) {
      ++step;
      set.unpin_all();
      for (auto& [layer, list_layer] : model) list_layer.pinned.clear();
    }
    const int64_t layer = layers[std::uniform_int_distribution<size_t>(0, layers.size() - 1)(rng)];
    const int64_t expert_id = std::uniform_int_distribution<int64_t>(0, kNumExperts - 1)(rng);
    ListLayer& list_layer = model[layer];
    auto it = std::find(list_layer.recency.begin(), list_layer.recency.end(), expert_id);
    const bool hit = it != list_layer.recency.end();
    ASSERT_EQ(hit, set.resident(layer, expert_id)) << "access " << access;
    set.record_use(layer, expert_id, std::uniform_real_distribution<float>(0.0f, 1.0f)(rng), step);
    if (hit) {
      list_layer.counters.hits += 1;
      list_layer.recency.splice(list_layer.recency.begin(), list_layer.recency, it);
    } else {
      list_layer.counters.misses += 1;
    }
    if (std::uniform_int_distribution<int>(0, 9)(rng) < 3) {
      set.pin(layer, expert_id);
      list_layer.pinned.insert(expert_id);
    }
    if (!hit) {
      int64_t expected_victim = -1;
      bool admitted = capacity.at(layer) > 0;
      if (admitted && static_cast<int64_t>(list_layer.recency.size()) >= capacity.at(layer)) {
        auto victim = std::find_if(list_layer.recency.rbegin(), list_layer.recency.rend(),
                                   [&](int64_t id) { return list_layer.pinned.count(id) == 0; });
        if (victim == list_layer.recency.rend()) {
          admitted = false;
        } else {
          expected_victim = *victim;
          list_layer.recency.erase(std::next(victim).base());
          list_layer.counters.evictions += 1;
        }
      }
      if (admitted) list_layer.recency.push_front(expert_id);
      if (!admitted) list_layer.counters.refused_admissions += 1;
      const Admission admission = set.admit(layer, expert_id, step);
      ASSERT_EQ(admitted, admission.resident) << "access " << access << " layer " << layer;
      ASSERT_EQ(expected_victim, evicted(admission)) << "access " << access << " layer " << layer;
    }
    std::vector<int64_t> expected(list_layer.recency.begin(), list_layer.recency.end());
    std::sort(expected.begin(), expected.end());
    ASSERT_EQ(expected, set.resident_experts(layer)) << "access " << access << " layer " << layer;
  }
  int64_t total_refused = 0;
  for (int64_t layer : layers) {
    SCOPED_TRACE("layer " + std::to_string(layer));
    const ResidencyCounters got = set.layer_counters(layer), want = model[layer].counters;
    EXPECT_EQ(want.hits, got.hits);
    EXPECT_EQ(want.misses, got.misses);
    EXPECT_EQ(want.evictions, got.evictions);
    EXPECT_EQ(want.refused_admissions, got.refused_admissions);
    total_refused += got.refused_admissions;
  }
  EXPECT_EQ(10000, set.counters().hits + set.counters().misses);
  EXPECT_GT(total_refused, 0) << "the stream never filled a layer with pins: the pin path went untested";
}

// Every policy against a model that keeps each expert's whole pick history and recomputes the
// victim's key from it at each eviction: the pick count, and the usefulness summed afresh as
// sum(weight * decay^(step - pick step)) instead of the lazy running score. The two sums round
// differently, so a usefulness victim may differ only when the model's scores of the two are within
// 1e-9 relative (a near-tie), and at most twice in a run.
TEST(ExpertResidencySet, EveryPolicyMatchesAFullHistoryModel) {
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  for (EvictionPolicy policy : {EvictionPolicy::kLru, EvictionPolicy::kLfu, EvictionPolicy::kUsefulness}) {
    SCOPED_TRACE(std::string(eviction_policy_name(policy)));
    std::mt19937 rng(seed);
    constexpr double kDecay = 0.9;
    constexpr int64_t kNumExperts = 10;
    const std::map<int64_t, int64_t> capacity = {{2, 4}, {3, 2}};
    ExpertResidencySet set(ResidencyBudget{capacity}, policy, kDecay);

    struct History {
      std::vector<std::pair<int64_t, float>> picks;  // (step, weight)
      uint64_t last_touch = 0;
    };
    struct ModelLayer {
      std::set<int64_t> resident, pinned;
      std::map<int64_t, History> history;
    };
    std::map<int64_t, ModelLayer> model;
    uint64_t clock = 0;
    int near_ties = 0;
    auto usefulness = [&](const History& history, int64_t step) {
      double sum = 0;
      for (const auto& [pick_step, weight] : history.picks)
        sum += weight * std::pow(kDecay, double(step - pick_step));
      return sum;
    };
    int64_t step = 0;
    for (int access = 0; access < 10000; ++access) {
      if (access % 6 == 0) {
        step += std::uniform_int_distribution<int64_t>(0, 2)(rng);  // steps may repeat or skip
        set.unpin_all();
        for (auto& [layer, model_layer] : model) model_layer.pinned.clear();
      }
      const int64_t layer = std::uniform_int_distribution<int64_t>(2, 3)(rng);
      // Skewed picks (expert e about twice as likely as e+2) so counts and scores separate.
      const int64_t expert_id =
          std::min<int64_t>(kNumExperts - 1, std::geometric_distribution<int64_t>(0.3)(rng));
      const float weight = std::uniform_real_distribution<float>(0.0f, 1.0f)(rng);
      ModelLayer& model_layer = model[layer];
      History& history = model_layer.history[expert_id];
      history.picks.emplace_back(step, weight);
      history.last_touch = ++clock;
      set.record_use(layer, expert_id, weight, step);
      ASSERT_EQ(int64_t(history.picks.size()), set.use_count(layer, expert_id));
      const double expected_score = usefulness(history, step);
      ASSERT_NEAR(expected_score, set.usefulness(layer, expert_id, step), 1e-9 * expected_score)
          << "access " << access;
      if (std::uniform_int_distribution<int>(0, 4)(rng) == 0) {
        set.pin(layer, expert_id);
        model_layer.pinned.insert(expert_id);
      }
      if (model_layer.resident.count(expert_id) != 0) continue;

      // The model's victim: the smallest (key, last touch) among unpinned residents.
      auto key = [&](int64_t id) {
        const History& h = model_layer.history.at(id);
        const double primary = policy == EvictionPolicy::kLru   ? 0.0
                               : policy == EvictionPolicy::kLfu ? double(h.picks.size())
                                                                : usefulness(h, step);
        return std::make_pair(primary, h.last_touch);
      };
      std::optional<int64_t> victim;
      bool full = static_cast<int64_t>(model_layer.resident.size()) >= capacity.at(layer);
      if (full) {
        for (int64_t id : model_layer.resident) {
          if (model_layer.pinned.count(id) == 0 && (!victim || key(id) < key(*victim))) victim = id;
        }
      }
      const Admission admission = set.admit(layer, expert_id, step);
      ASSERT_EQ(!full || victim.has_value(), admission.resident) << "access " << access;
      if (!admission.resident) continue;
      if (full) {
        ASSERT_TRUE(admission.evicted_expert.has_value()) << "access " << access;
        const int64_t got = *admission.evicted_expert;
        if (got != *victim) {
          ASSERT_EQ(EvictionPolicy::kUsefulness, policy) << "access " << access;
          ASSERT_TRUE(model_layer.resident.count(got) != 0 && model_layer.pinned.count(got) == 0)
              << "access " << access << ": evicted " << got << ", not an unpinned resident";
          const double want = key(*victim).first, have = key(got).first;
          ASSERT_LE(have - want, 1e-9 * want) << "access " << access << ": evicted " << got << " (score "
                                              << have << ") over " << *victim << " (score " << want << ")";
          ++near_ties;
        }
        model_layer.resident.erase(got);
      } else {
        ASSERT_FALSE(admission.evicted_expert.has_value()) << "access " << access;
      }
      model_layer.resident.insert(expert_id);
      model_layer.history[expert_id].last_touch = ++clock;
      const std::vector<int64_t> expected(model_layer.resident.begin(), model_layer.resident.end());
      ASSERT_EQ(expected, set.resident_experts(layer)) << "access " << access;
    }
    EXPECT_LE(near_ties, 2) << "usefulness victims that differ from the model's beyond rare near-ties";
    EXPECT_GT(set.counters().evictions, 1000) << "too few evictions to exercise the policy";
  }
}

}  // namespace
}  // namespace epic
