// The bookkeeping of an expert cache on one memory tier: which (layer, expert) pairs are resident under
// a per-layer budget, and which one to evict when a missing expert must come in. No memory and no I/O:
// the code that owns the device or pinned-host buffers asks this object what each slot should hold.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string_view>
#include <vector>

namespace epic {

// Which resident expert makes room for a newcomer (--eviction-policy).
// kLru: the least recently used (a use is a router pick; an admission counts as a use for recency).
// kLfu: the fewest router picks, counting picks made while the expert was not resident (they are the
//   demand for it all the same), ties to the least recent.
// kUsefulness: the lowest routing weight summed with an exponential decay per step, ties to the least
//   recent: a rare pick with a large weight counts more than a frequent pick with a tiny one, and old
//   use fades, so an expert that stopped being picked leaves even if it was picked often.
enum class EvictionPolicy { kLru, kLfu, kUsefulness };

// "lru", "lfu", "usefulness"; anything else throws Error(kInvalidArgument) listing them.
EvictionPolicy parse_eviction_policy(std::string_view text);
std::string_view eviction_policy_name(EvictionPolicy policy);

// How many experts each MoE layer may keep resident on the tier, keyed by layer id like
// present_by_layer elsewhere (dense layers have no entry). A per-layer budget rather than one pool:
// every layer runs every step, so a layer starved by a hot neighbour would miss on every token.
struct ResidencyBudget {
  std::map<int64_t, int64_t> slots_by_layer;

  int64_t total_slots() const;
};

// Splits total_slots (experts over all layers) in proportion to each layer's present experts; pruned
// checkpoints are uneven (29 present experts in one layer, 24 in the next). Every layer with experts
// gets at least one slot and never more than it has experts; the slots sum to min(total_slots, present
// experts). A layer whose share is under one slot gets one and the others share what is left; the
// rest is rounded by largest remainder, ties to the lower layer id. Error(kInvalidArgument) when
// total_slots is negative or smaller than the number of layers with experts.
ResidencyBudget split_residency_budget(int64_t total_slots,
                                       const std::map<int64_t, std::vector<uint8_t>>& present_by_layer);

// What admit did. The expert stays out (resident false) only when its layer has no slot it may take:
// capacity 0, or every resident expert pinned by the current step. That is a normal outcome under a
// tight budget, not a bug, so it is returned rather than thrown: the caller serves the expert from the
// lower tier (or substitutes it) for this step and may admit it at a later one.
struct Admission {
  bool resident = false;
  std::optional<int64_t> evicted_expert;  // the expert that made room, when one had to
};

struct ResidencyCounters {
  int64_t hits = 0;                // record_use of a resident expert
  int64_t misses = 0;              // record_use of an expert not resident
  int64_t evictions = 0;           // experts admit pushed out
  int64_t refused_admissions = 0;  // admit calls that found no slot (see Admission)
};

// The resident experts of every budgeted layer and the use history the policy ranks them by. Steps
// are the caller's model steps and must never decrease from one call to the next (the usefulness
// decay counts them forward). Every call with a layer outside the budget, a negative expert id or a
// step that goes back throws Error(kInvalidArgument). Deterministic: the same calls give the same
// evictions (ties end at the lower expert id; nothing iterates an unordered container).
class ExpertResidencySet {
 public:
  // usefulness_decay: the factor a usefulness score keeps per step, in (0, 1] (1: a weighted use
  // count). Checked for every policy, so a bad flag fails whatever the policy. A negative capacity
  // is an Error(kInvalidArgument); capacity 0 keeps the layer off this tier (every use a miss).
  ExpertResidencySet(ResidencyBudget budget, EvictionPolicy policy, double usefulness_decay);

  EvictionPolicy policy() const { return policy_; }
  int64_t capacity(int64_t layer) const;
  bool resident(int64_t layer, int64_t expert_id) const;
  std::vector<int64_t> resident_experts(int64_t layer) const;  // ascending ids

  // One router pick of (layer, expert) with its routing weight (finite, >= 0), resident or not: a hit
  // or a miss, and the expert's recency, use count and usefulness. O(log experts), no scan: it runs
  // for every (token, slot) of every layer.
  void record_use(int64_t layer, int64_t expert_id, float routing_weight, int64_t step);
  // `uses` picks (>= 1) of one expert in one step whose routing weights sum to weight_sum (finite, >= 0):
  // what that many record_use calls do, the score up to the order of the sum (an exchange that sums on the
  // device).
  void record_uses(int64_t layer, int64_t expert_id, int64_t uses, double weight_sum, int64_t step);

  // Makes the expert resident, evicting the policy's victim among the layer's unpinned residents when
  // the layer is full (a scan of the residents, once per miss). Already resident: nothing changes.
  [[nodiscard]] Admission admit(int64_t layer, int64_t expert_id, int64_t step);

  // The experts a step is about to compute stay resident until unpin_all: admit never evicts them.
  // Pinning an expert that is not resident yet is allowed (it is protected once admitted).
  void pin(int64_t layer, int64_t expert_id);
  void unpin_all();
  bool pinned(int64_t layer, int64_t expert_id) const;

  // The history the policies rank by (0 for an expert never picked); usefulness decayed to `step`.
  int64_t use_count(int64_t layer, int64_t expert_id) const;
  double usefulness(int64_t layer, int64_t expert_id, int64_t step) const;

  ResidencyCounters counters() const;  // summed over layers
  ResidencyCounters layer_counters(int64_t layer) const;

 private:
  struct ExpertUsage {
    int64_t use_count = 0;
    uint64_t last_touch = 0;  // touch_clock_ at the last pick or admission: the recency order
    double score = 0;         // usefulness as of score_step
    int64_t score_step = 0;
  };
  struct LayerState {
    int64_t capacity = 0;
    std::set<int64_t> resident;
    std::set<int64_t> pinned;
    std::map<int64_t, ExpertUsage> usage;  // every expert ever picked, pinned or admitted
    ResidencyCounters counters;
  };

  LayerState& layer_state(int64_t layer, int64_t expert_id, const char* operation);
  const LayerState& layer_state(int64_t layer, int64_t expert_id, const char* operation) const;
  void check_step(int64_t step, const char* operation) const;
  double decayed_score(const ExpertUsage& usage, int64_t step) const;
  // Whether `a` (decayed score score_a) goes before `b` (score_b) under the policy; false on a tie.
  bool evicts_before(const ExpertUsage& a, double score_a, const ExpertUsage& b, double score_b) const;

  EvictionPolicy policy_;
  double usefulness_decay_;
  std::map<int64_t, LayerState> layers_;
  uint64_t touch_clock_ = 0;  // one tick per pick or admission, so recency never ties
  int64_t latest_step_ = 0;
};

}  // namespace epic
