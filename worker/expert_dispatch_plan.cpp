// The host reference of the dispatch layout (expert_dispatch_plan.h).
#include "worker/expert_dispatch_plan.h"

#include <string>

#include "kernels/error.h"

namespace epic {

ReplicaTable flatten_replicas(const ExpertRoutingTable& table, int64_t layer, int64_t num_experts) {
  ReplicaTable flat;
  flat.offsets.assign(static_cast<size_t>(num_experts) + 1, 0);
  const auto it = table.expert_workers.find(layer);
  for (int64_t expert = 0; expert < num_experts; ++expert) {
    if (it != table.expert_workers.end() && expert < static_cast<int64_t>(it->second.size()))
      for (int worker : it->second[expert]) flat.workers.push_back(worker);
    flat.offsets[expert + 1] = static_cast<int32_t>(flat.workers.size());
  }
  return flat;
}

DispatchPlan plan_dispatch(const std::vector<int32_t>& expert_ids, const std::vector<float>& weights,
                           int64_t num_tokens, int64_t top_k, int rank, int num_ranks,
                           const ReplicaTable& replicas) {
  const int64_t num_slots = num_tokens * top_k;
  const int64_t num_experts = static_cast<int64_t>(replicas.offsets.size()) - 1;
  EPIC_CHECK(static_cast<int64_t>(expert_ids.size()) == num_slots &&
                 static_cast<int64_t>(weights.size()) == num_slots,
             ErrorCode::kInternal, "plan_dispatch: routing of " + std::to_string(expert_ids.size()) +
                                       " slots for " + std::to_string(num_slots));
  DispatchPlan plan;
  plan.destination.resize(static_cast<size_t>(num_slots));
  std::vector<uint64_t> occurrences(static_cast<size_t>(num_experts), 0);
  for (int64_t slot = 0; slot < num_slots; ++slot) {
    const int64_t expert = expert_ids[slot];
    const int32_t num_replicas =
        expert >= 0 && expert < num_experts ? replicas.offsets[expert + 1] - replicas.offsets[expert] : 0;
    if (num_replicas == 0)
      throw Error(ErrorCode::kInternal, "no worker hosts expert " + std::to_string(expert) +
                                            " in the placement plan");
    const uint64_t key = occurrences[expert]++ + static_cast<uint64_t>(rank);
    plan.destination[slot] = replicas.workers[replicas.offsets[expert] + key % static_cast<uint64_t>(num_replicas)];
  }
  plan.send_counts.assign(num_ranks, 0);
  plan.send_pairs.assign(num_ranks, 0);
  plan.send_position.assign(static_cast<size_t>(num_ranks * num_tokens), -1);
  for (int r = 0; r < num_ranks; ++r) {
    for (int64_t token = 0; token < num_tokens; ++token) {
      bool sent = false;
      for (int64_t j = 0; j < top_k; ++j) sent = sent || plan.destination[token * top_k + j] == r;
      if (!sent) continue;
      plan.send_position[r * num_tokens + token] = static_cast<int32_t>(plan.send_counts[r]++);
      plan.sent_token.push_back(static_cast<int32_t>(token));
      for (int64_t j = 0; j < top_k; ++j) {
        const int64_t slot = token * top_k + j;
        const bool here = plan.destination[slot] == r;
        plan.sent_expert_ids.push_back(here ? expert_ids[slot] : -1);
        plan.sent_weights.push_back(here ? weights[slot] : 0.0f);
        plan.send_pairs[r] += here;
      }
    }
  }
  return plan;
}

}  // namespace epic
