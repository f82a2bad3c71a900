// The expert cache's residency bookkeeping: the budget split and the eviction policies
// (expert_residency_policy.h).
#include "worker/expert_residency_policy.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <utility>

#include "kernels/error.h"

namespace epic {

EvictionPolicy parse_eviction_policy(std::string_view text) {
  if (text == "lru") return EvictionPolicy::kLru;
  if (text == "lfu") return EvictionPolicy::kLfu;
  if (text == "usefulness") return EvictionPolicy::kUsefulness;
  throw Error(ErrorCode::kInvalidArgument,
              "--eviction-policy: unknown policy '" + std::string(text) + "' (use lru, lfu or usefulness)");
}

std::string_view eviction_policy_name(EvictionPolicy policy) {
  switch (policy) {
    case EvictionPolicy::kLfu:
      return "lfu";
    case EvictionPolicy::kUsefulness:
      return "usefulness";
    case EvictionPolicy::kLru:
      break;
  }
  return "lru";
}

int64_t ResidencyBudget::total_slots() const {
  int64_t total = 0;
  for (const auto& [layer, slots] : slots_by_layer) total += slots;
  return total;
}

ResidencyBudget split_residency_budget(int64_t total_slots,
                                       const std::map<int64_t, std::vector<uint8_t>>& present_by_layer) {
  EPIC_CHECK(total_slots >= 0, ErrorCode::kInvalidArgument,
             "expert residency budget of " + std::to_string(total_slots) +
                 " experts: the budget counts experts and cannot be negative");
  ResidencyBudget budget;
  std::map<int64_t, int64_t> num_present_by_layer;  // layers with experts only
  int64_t num_present = 0;
  for (const auto& [layer, present] : present_by_layer) {
    const int64_t count = std::count_if(present.begin(), present.end(), [](uint8_t p) { return p != 0; });
    budget.slots_by_layer[layer] = count;  // everything fits; cut below when it does not
    if (count > 0) num_present_by_layer[layer] = count;
    num_present += count;
  }
  if (total_slots >= num_present) return budget;
  const int64_t num_layers = static_cast<int64_t>(num_present_by_layer.size());
  EPIC_CHECK(total_slots >= num_layers, ErrorCode::kInvalidArgument,
             "expert residency budget of " + std::to_string(total_slots) +
                 " experts cannot give each of the " + std::to_string(num_layers) +
                 " MoE layers one slot (a layer without a resident expert misses on every token): raise the "
                 "budget to at least " +
                 std::to_string(num_layers) + " experts");

  // A layer whose share is under one slot gets one; the others share what it leaves, which can push
  // another layer under one, so repeat. `remaining_slots` never drops below the open layers' count
  // (it starts at >= num_layers and each forced layer takes one of each), so some layer stays open.
  std::vector<int64_t> open_layers;
  for (const auto& [layer, count] : num_present_by_layer) open_layers.push_back(layer);
  int64_t remaining_slots = total_slots, remaining_present = num_present;
  for (;;) {
    std::vector<int64_t> still_open, forced;
    for (int64_t layer : open_layers) {
      // share = remaining_slots * count / remaining_present < 1, in integers.
      (remaining_slots * num_present_by_layer[layer] < remaining_present ? forced : still_open)
          .push_back(layer);
    }
    if (forced.empty()) break;
    for (int64_t layer : forced) {
      budget.slots_by_layer[layer] = 1;
      remaining_slots -= 1;
      remaining_present -= num_present_by_layer[layer];
    }
    open_layers = std::move(still_open);
  }
  EPIC_CHECK(
      !open_layers.empty() && remaining_present > 0, ErrorCode::kInternal,
      "expert residency budget split left no layer to share " + std::to_string(remaining_slots) + " slots");

  // Largest remainder: each open layer gets the floor of its share, and the slots the floors leave go
  // to the largest fractional parts (exact, as integer remainders), ties to the lower layer id. A share
  // is below the layer's expert count (remaining_slots < remaining_present), so +1 never exceeds it.
  std::vector<std::tuple<int64_t, int64_t>> by_remainder;  // (-remainder, layer): ascending = wanted order
  int64_t leftover = remaining_slots;
  for (int64_t layer : open_layers) {
    const int64_t product = remaining_slots * num_present_by_layer[layer];
    budget.slots_by_layer[layer] = product / remaining_present;
    leftover -= product / remaining_present;
    by_remainder.emplace_back(-(product % remaining_present), layer);
  }
  std::sort(by_remainder.begin(), by_remainder.end());
  for (int64_t i = 0; i < leftover; ++i) budget.slots_by_layer[std::get<1>(by_remainder[i])] += 1;
  return budget;
}

ExpertResidencySet::ExpertResidencySet(ResidencyBudget budget, EvictionPolicy policy, double usefulness_decay)
    : policy_(policy), usefulness_decay_(usefulness_decay) {
  // Written as a negated range so NaN fails too.
  EPIC_CHECK(usefulness_decay > 0.0 && usefulness_decay <= 1.0, ErrorCode::kInvalidArgument,
             "usefulness decay must be in (0, 1] (the share of a score kept per step; 1 keeps it all), got " +
                 std::to_string(usefulness_decay));
  for (const auto& [layer, slots] : budget.slots_by_layer) {
    EPIC_CHECK(slots >= 0, ErrorCode::kInvalidArgument,
               "expert residency budget: layer " + std::to_string(layer) + " has " + std::to_string(slots) +
                   " slots; use 0 to keep the layer off this tier");
    layers_[layer].capacity = slots;
  }
}

ExpertResidencySet::LayerState& ExpertResidencySet::layer_state(int64_t layer, int64_t expert_id,
                                                                const char* operation) {
  return const_cast<LayerState&>(std::as_const(*this).layer_state(layer, expert_id, operation));
}

const ExpertResidencySet::LayerState& ExpertResidencySet::layer_state(int64_t layer, int64_t expert_id,
                                                                      const char* operation) const {
  auto it = layers_.find(layer);
  if (it == layers_.end()) {
    std::string known = layers_.empty() ? "none" : "";
    for (const auto& [id, state] : layers_) known += (known.empty() ? "" : ", ") + std::to_string(id);
    throw Error(ErrorCode::kInvalidArgument,
                std::string(operation) + ": layer " + std::to_string(layer) +
                    " has no expert residency budget (budgeted layers: " + known +
                    "); budget every MoE layer, with 0 slots for one kept off this tier");
  }
  EPIC_CHECK(expert_id >= 0, ErrorCode::kInvalidArgument,
             std::string(operation) + ": layer " + std::to_string(layer) + " expert id " +
                 std::to_string(expert_id) + " is negative");
  return it->second;
}

void ExpertResidencySet::check_step(int64_t step, const char* operation) const {
  EPIC_CHECK(step >= latest_step_, ErrorCode::kInvalidArgument,
             std::string(operation) + ": step " + std::to_string(step) + " is before step " +
                 std::to_string(latest_step_) +
                 ", already recorded; steps must not decrease (the usefulness decay counts them forward)");
}

double ExpertResidencySet::decayed_score(const ExpertUsage& usage, int64_t step) const {
  // Lazy decay: the score is stored as of its last update and decayed on read, so a pick costs O(1)
  // instead of decaying every expert every step.
  if (usage.score == 0.0 || step == usage.score_step) return usage.score;
  return usage.score * std::pow(usefulness_decay_, static_cast<double>(step - usage.score_step));
}

bool ExpertResidencySet::evicts_before(const ExpertUsage& a, double score_a, const ExpertUsage& b,
                                       double score_b) const {
  switch (policy_) {
    case EvictionPolicy::kLfu:
      if (a.use_count != b.use_count) return a.use_count < b.use_count;
      break;
    case EvictionPolicy::kUsefulness:
      if (score_a != score_b) return score_a < score_b;
      break;
    case EvictionPolicy::kLru:
      break;
  }
  return a.last_touch < b.last_touch;
}

int64_t ExpertResidencySet::capacity(int64_t layer) const {
  return layer_state(layer, 0, "capacity").capacity;
}

bool ExpertResidencySet::resident(int64_t layer, int64_t expert_id) const {
  return layer_state(layer, expert_id, "resident").resident.count(expert_id) != 0;
}

std::vector<int64_t> ExpertResidencySet::resident_experts(int64_t layer) const {
  const std::set<int64_t>& resident = layer_state(layer, 0, "resident_experts").resident;
  return {resident.begin(), resident.end()};
}

void ExpertResidencySet::record_use(int64_t layer, int64_t expert_id, float routing_weight, int64_t step) {
  record_uses(layer, expert_id, 1, routing_weight, step);
}

void ExpertResidencySet::record_uses(int64_t layer, int64_t expert_id, int64_t uses, double weight_sum,
                                     int64_t step) {
  LayerState& state = layer_state(layer, expert_id, "record_use");
  check_step(step, "record_use");
  EPIC_CHECK(uses >= 1, ErrorCode::kInvalidArgument,
             "record_uses: layer " + std::to_string(layer) + " expert " + std::to_string(expert_id) +
                 " got " + std::to_string(uses) + " uses; record at least one");
  // A NaN would stay in the score forever and make every comparison false.
  EPIC_CHECK(std::isfinite(weight_sum) && weight_sum >= 0.0, ErrorCode::kInvalidArgument,
             "record_use: layer " + std::to_string(layer) + " expert " + std::to_string(expert_id) +
                 " has routing weight " + std::to_string(weight_sum) +
                 "; routing weights must be finite and >= 0");
  latest_step_ = step;
  (state.resident.count(expert_id) != 0 ? state.counters.hits : state.counters.misses) += uses;
  ExpertUsage& usage = state.usage[expert_id];
  usage.use_count += uses;
  usage.last_touch = ++touch_clock_;
  usage.score = decayed_score(usage, step) + weight_sum;
  usage.score_step = step;
}

Admission ExpertResidencySet::admit(int64_t layer, int64_t expert_id, int64_t step) {
  LayerState& state = layer_state(layer, expert_id, "admit");
  check_step(step, "admit");
  latest_step_ = step;
  if (state.resident.count(expert_id) != 0) return {true, std::nullopt};

  Admission admission;
  if (static_cast<int64_t>(state.resident.size()) >= state.capacity) {
    // Ascending ids with a strict comparison: a full tie keeps the lower id as the victim.
    const ExpertUsage* victim_usage = nullptr;
    double victim_score = 0;
    for (int64_t candidate : state.resident) {
      if (state.pinned.count(candidate) != 0) continue;
      const ExpertUsage& usage = state.usage.at(candidate);
      const double score = decayed_score(usage, step);
      if (victim_usage == nullptr || evicts_before(usage, score, *victim_usage, victim_score)) {
        victim_usage = &usage;
        victim_score = score;
        admission.evicted_expert = candidate;
      }
    }
    if (!admission.evicted_expert) {
      state.counters.refused_admissions += 1;
      return admission;
    }
    state.resident.erase(*admission.evicted_expert);
    state.counters.evictions += 1;
  }
  state.resident.insert(expert_id);
  state.usage[expert_id].last_touch = ++touch_clock_;  // a newcomer is not the next victim
  admission.resident = true;
  return admission;
}

void ExpertResidencySet::pin(int64_t layer, int64_t expert_id) {
  layer_state(layer, expert_id, "pin").pinned.insert(expert_id);
}

void ExpertResidencySet::unpin_all() {
  for (auto& [layer, state] : layers_) state.pinned.clear();
}

bool ExpertResidencySet::pinned(int64_t layer, int64_t expert_id) const {
  return layer_state(layer, expert_id, "pinned").pinned.count(expert_id) != 0;
}

int64_t ExpertResidencySet::use_count(int64_t layer, int64_t expert_id) const {
  const LayerState& state = layer_state(layer, expert_id, "use_count");
  auto it = state.usage.find(expert_id);
  return it == state.usage.end() ? 0 : it->second.use_count;
}

double ExpertResidencySet::usefulness(int64_t layer, int64_t expert_id, int64_t step) const {
  const LayerState& state = layer_state(layer, expert_id, "usefulness");
  check_step(step, "usefulness");
  auto it = state.usage.find(expert_id);
  return it == state.usage.end() ? 0.0 : decayed_score(it->second, step);
}

ResidencyCounters ExpertResidencySet::counters() const {
  ResidencyCounters total;
  for (const auto& [layer, state] : layers_) {
    total.hits += state.counters.hits;
    total.misses += state.counters.misses;
    total.evictions += state.counters.evictions;
    total.refused_admissions += state.counters.refused_admissions;
  }
  return total;
}

ResidencyCounters ExpertResidencySet::layer_counters(int64_t layer) const {
  return layer_state(layer, 0, "layer_counters").counters;
}

}  // namespace epic
