// The pinned host cache between the expert store's slots and the checkpoint (host_expert_cache.h).
#include "worker/host_expert_cache.h"

#include <algorithm>
#include <string>

#include "kernels/error.h"
#include "worker/forwarding_backend.h"
#include "worker/model_weights.h"
#include "worker/weight_loader.h"

namespace epic {

HostExpertCache::HostExpertCache(const ModelConfig& config, WeightSource& source, Backend& backend,
                                 const std::map<int64_t, std::vector<int64_t>>& hosted_by_layer,
                                 HostExpertCacheOptions options)
    : config_(config), source_(source), backend_(backend), options_(std::move(options)) {
  expert_bytes_ = static_cast<size_t>(3 * config.moe_intermediate_size * config.hidden_size) *
                  scalar_size(options_.weight_type);
  ResidencyBudget capped;
  for (const auto& [layer, hosted] : hosted_by_layer) {
    const auto budget = options_.budget.slots_by_layer.find(layer);
    EPIC_CHECK(budget != options_.budget.slots_by_layer.end(), ErrorCode::kInvalidArgument,
               "host expert cache: the budget has no entry for MoE layer " + std::to_string(layer) +
                   "; budget every MoE layer");
    EPIC_CHECK(budget->second >= 0, ErrorCode::kInvalidArgument,
               "host expert cache: the budget gives layer " + std::to_string(layer) + " " +
                   std::to_string(budget->second) + " slots; a budget counts experts and cannot be negative");
    const int64_t slots = std::min(budget->second, static_cast<int64_t>(hosted.size()));
    capped.slots_by_layer[layer] = slots;
    Layer& state = layers_[layer];
    state.slot_expert.assign(static_cast<size_t>(slots), -1);
    state.loaded.assign(static_cast<size_t>(slots), 0);
    if (slots > 0) state.slots = backend.allocate_staging(static_cast<size_t>(slots) * expert_bytes_);
  }
  residency_ = std::make_unique<ExpertResidencySet>(capped, options_.policy, options_.usefulness_decay);
}

HostExpertCache::~HostExpertCache() = default;

const HostExpertCache::Layer& HostExpertCache::layer_state(int64_t layer, const char* operation) const {
  const auto it = layers_.find(layer);
  EPIC_CHECK(it != layers_.end(), ErrorCode::kInvalidArgument,
             std::string("host expert cache ") + operation + ": layer " + std::to_string(layer) +
                 " is not a MoE layer of this model");
  return it->second;
}

HostCacheFetch HostExpertCache::fetch(int64_t layer, const std::vector<int64_t>& experts, int64_t step) {
  Layer& state = const_cast<Layer&>(layer_state(layer, "fetch"));
  const int64_t capacity = static_cast<int64_t>(state.slot_expert.size());
  EPIC_CHECK(static_cast<int64_t>(experts.size()) <= capacity, ErrorCode::kInvalidArgument,
             "host expert cache: layer " + std::to_string(layer) + " was asked for " +
                 std::to_string(experts.size()) + " experts at once but caches " + std::to_string(capacity) +
                 "; the host budget must be at least the device budget");
  HostCacheFetch result;
  result.bytes.resize(experts.size());
  result.was_cached.assign(experts.size(), 0);
  // Pinned while admitted: a later miss of this call never evicts an earlier one's slot.
  residency_->unpin_all();
  for (int64_t expert : experts) residency_->pin(layer, expert);
  struct Read {
    size_t position;  // in `experts`
    int64_t slot;
  };
  std::vector<Read> reads;
  for (size_t k = 0; k < experts.size(); ++k) {
    const int64_t expert = experts[k];
    auto cached = state.slot_of.find(expert);
    if (cached != state.slot_of.end() && state.loaded[cached->second]) {
      result.was_cached[k] = 1;
      result.hits += 1;
    } else if (cached != state.slot_of.end()) {  // admitted, but its read failed: read it again
      reads.push_back({k, cached->second});
    } else {
      const Admission admission = residency_->admit(layer, expert, step);
      EPIC_CHECK(admission.resident, ErrorCode::kInternal,
                 "host expert cache: layer " + std::to_string(layer) + " refused expert " +
                     std::to_string(expert) + " with " + std::to_string(experts.size()) + " pinned of " +
                     std::to_string(capacity) + " slots");
      int64_t slot = -1;
      if (admission.evicted_expert) {
        const int64_t victim = *admission.evicted_expert;
        slot = state.slot_of.at(victim);
        state.slot_of.erase(victim);
        result.evictions += 1;
        result.evicted.push_back(victim);
      } else {
        slot = std::find(state.slot_expert.begin(), state.slot_expert.end(), -1) - state.slot_expert.begin();
        EPIC_CHECK(slot < capacity, ErrorCode::kInternal,
                   "host expert cache: layer " + std::to_string(layer) + " admitted expert " +
                       std::to_string(expert) + " without eviction but has no free slot");
      }
      state.slot_expert[slot] = expert;
      state.slot_of[expert] = slot;
      state.loaded[slot] = 0;
      reads.push_back({k, slot});
    }
  }
  residency_->unpin_all();
  result.misses = static_cast<int64_t>(reads.size());

  if (!reads.empty()) {
    const int64_t hidden = config_.hidden_size, inter = config_.moe_intermediate_size;
    const size_t gate_up_bytes = static_cast<size_t>(2 * inter * hidden) * scalar_size(options_.weight_type);
    const Tensor slots(state.slots->data(), options_.weight_type, MemorySpace::kHost,
                       {capacity, 3 * inter * hidden});
    std::vector<TensorLoad> loads;
    for (const Read& read : reads) {
      const std::vector<std::string> names = expert_tensor_names(config_, layer, experts[read.position]);
      const size_t base = static_cast<size_t>(read.slot) * expert_bytes_;
      loads.push_back({names[0], {inter, hidden}, slots, base});
      loads.push_back({names[1], {inter, hidden}, slots, base + gate_up_bytes / 2});
      loads.push_back({names[2], {hidden, inter}, slots, base + gate_up_bytes});
    }
    HostMemoryView host_memory(backend_);
    WeightLoadOptions load_options;
    load_options.allow_nonfinite_weights = options_.allow_nonfinite_weights;
    load_options.num_threads = options_.reader_threads;
    // On a throw the slots stay admitted but not loaded: the next fetch reads them again.
    result.source_bytes_read = load_tensors(source_, host_memory, loads, load_options).bytes_read;
    for (const Read& read : reads) state.loaded[read.slot] = 1;
  }
  for (size_t k = 0; k < experts.size(); ++k)
    result.bytes[k] = static_cast<const uint8_t*>(state.slots->data()) +
                      static_cast<size_t>(state.slot_of.at(experts[k])) * expert_bytes_;
  stats_.hits += result.hits;
  stats_.misses += result.misses;
  stats_.evictions += result.evictions;
  stats_.source_bytes_read += result.source_bytes_read;
  return result;
}

void HostExpertCache::record_uses(int64_t layer, int64_t expert_id, int64_t uses, double weight_sum,
                                  int64_t step) {
  residency_->record_uses(layer, expert_id, uses, weight_sum, step);
}

bool HostExpertCache::cached(int64_t layer, int64_t expert_id) const {
  const Layer& state = layer_state(layer, "cached");
  const auto it = state.slot_of.find(expert_id);
  return it != state.slot_of.end() && state.loaded[it->second];
}

std::vector<int64_t> HostExpertCache::cached_experts(int64_t layer) const {
  const Layer& state = layer_state(layer, "cached_experts");
  std::vector<int64_t> experts;
  for (const auto& [expert, slot] : state.slot_of)
    if (state.loaded[slot]) experts.push_back(expert);
  return experts;  // a map: ascending already
}

int64_t HostExpertCache::capacity(int64_t layer) const {
  return static_cast<int64_t>(layer_state(layer, "capacity").slot_expert.size());
}

uint64_t HostExpertCache::bytes() const {
  uint64_t total = 0;
  for (const auto& [layer, state] : layers_)
    if (state.slots) total += state.slots->size();
  return total;
}

}  // namespace epic
