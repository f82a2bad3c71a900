// Tallies of routed slots on the backend (expert_load_counter.h).
#include "worker/expert_load_counter.h"

#include "kernels/error.h"

namespace epic {
namespace {

OwnedTensor zeroed_counts(Backend& backend, int64_t entries) {
  OwnedTensor counts = backend.new_tensor(ScalarType::kI64, {entries});
  const std::vector<int64_t> zeros(static_cast<size_t>(entries), 0);
  backend.copy_from_host(counts.view(), 0, zeros.data(), zeros.size() * sizeof(int64_t));
  return counts;
}

std::vector<int64_t> read_counts(Backend& backend, const OwnedTensor& counts) {
  std::vector<int64_t> values(static_cast<size_t>(counts.view().numel()));
  backend.copy_to_host(counts.view(), 0, values.data(), values.size() * sizeof(int64_t));
  return values;
}

}  // namespace

ExpertLoadCounter::ExpertLoadCounter(Backend& backend, const ModelWeights& weights, int num_ranks)
    : backend_(backend) {
  for (size_t layer = 0; layer < weights.layers.size(); ++layer) {
    const LayerWeights& weights_of_layer = weights.layers[layer];
    if (weights_of_layer.is_moe && weights_of_layer.moe.num_experts > 0)
      per_layer_.emplace(static_cast<int64_t>(layer),
                         zeroed_counts(backend, weights_of_layer.moe.num_experts));
  }
  if (num_ranks > 0) per_rank_ = zeroed_counts(backend, num_ranks);
}

void ExpertLoadCounter::count(int64_t layer, const Tensor& expert_ids, const Tensor& real_tokens,
                              const Tensor& destinations) {
  const auto tally = per_layer_.find(layer);
  EPIC_CHECK(tally != per_layer_.end(), ErrorCode::kInternal,
             "expert load: layer " + std::to_string(layer) + " is not a MoE layer of the model");
  const bool by_rank = !is_absent(destinations);
  EPIC_CHECK(by_rank == !per_rank_.empty(), ErrorCode::kInternal,
             "expert load: destination ranks come exactly when the counter was made for ranks");
  backend_.count_routed_slots(expert_ids, real_tokens, tally->second.view(), destinations,
                              by_rank ? per_rank_.view() : Tensor{});
}

ExpertLoad ExpertLoadCounter::read() {
  backend_.synchronize();
  ExpertLoad load;
  for (const auto& [layer, counts] : per_layer_) load.rows_per_expert[layer] = read_counts(backend_, counts);
  if (!per_rank_.empty()) load.rows_per_rank = read_counts(backend_, per_rank_);
  return load;
}

}  // namespace epic
