// ExpertParallelMoeExecutor with --on-miss substitute (expert_parallel_moe.h): the router's choice is made on
// the sending worker, the residency lives on the hosting one, so every step starts by gathering which experts
// are resident where; a sender then replaces a token's pick of an expert that is not resident on every worker
// hosting it (any replica may receive the row) by the most probable routable expert that is, with the
// router's weights of the final choice (substitute_missing_picks, as the one-process executor).
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "worker/expert_parallel_moe.h"
#include "worker/missing_expert_substitution.h"
#include "worker/routing_policy.h"
#include "worker/workspace.h"

namespace epic {

void ExpertParallelMoeExecutor::begin_step(int64_t /*max_rows_on_any_rank*/) {
  if (!substitute_) return;
  // Per MoE layer and expert this worker's view: 1 resident here, 0 hosted here but not resident, 2 not
  // hosted here (no say). Layers ascending: every rank lists the same entries.
  const ExpertStore& store = resident_ffn_->store();
  const int rank = comm_.rank();
  std::vector<uint8_t> mine;
  for (const auto& [layer, workers] : table_.expert_workers) {
    for (size_t e = 0; e < workers.size(); ++e) {
      const auto expert = static_cast<int64_t>(e);
      mine.push_back(!table_.hosts(rank, layer, expert) ? 2 : store.resident(layer, expert) ? 1 : 0);
    }
  }
  const std::vector<std::vector<uint8_t>> all = comm_.all_gather_v<uint8_t>(std::span<const uint8_t>(mine));
  resident_everywhere_.clear();
  size_t at = 0;
  for (const auto& [layer, workers] : table_.expert_workers) {
    std::vector<uint8_t>& resident = resident_everywhere_[layer];
    resident.assign(workers.size(), 0);
    for (size_t e = 0; e < workers.size(); ++e, ++at) {
      bool everywhere = !workers[e].empty();  // a masked expert is hosted nowhere
      for (const std::vector<uint8_t>& view : all) everywhere = everywhere && view.at(at) != 0;
      resident[e] = everywhere ? 1 : 0;
    }
  }
}

void ExpertParallelMoeExecutor::substitute_misses(int64_t layer, const RoutedTokens& routed,
                                                  std::vector<int32_t>& expert_ids, Workspace& workspace) {
  const MoeLayerWeights& moe = weights_.layers[layer].moe;
  const int64_t num_experts = moe.num_experts, top_k = routed.expert_ids.dim(1);
  const int64_t num_tokens = routed.expert_ids.dim(0);
  const auto found = resident_everywhere_.find(layer);
  EPIC_CHECK(found != resident_everywhere_.end(), ErrorCode::kInternal,
             "--on-miss substitute: layer " + std::to_string(layer) +
                 " has no residency view (begin_step must run before the step's layers)");
  const std::vector<uint8_t>& resident = found->second;
  const std::function<bool(int64_t)> is_resident = [&](int64_t expert) {
    return expert >= 0 && expert < num_experts && resident[expert];
  };
  bool any_missing = false;
  for (int64_t t = 0; t < num_tokens && !any_missing; ++t)
    any_missing = own_pick_missing(expert_ids.data() + t * top_k, top_k, is_resident);
  if (!any_missing) return;  // the usual case once the caches are warm: no logits read back
  std::vector<float> logits(static_cast<size_t>(num_tokens * num_experts));
  backend_.copy_to_host(workspace.get(kSlotRouterLogits, ScalarType::kF32, {num_tokens, num_experts}), 0,
                        logits.data(), logits.size() * sizeof(float));
  std::vector<float> weights(static_cast<size_t>(num_tokens * top_k));
  backend_.copy_to_host(routed.weights, 0, weights.data(), weights.size() * sizeof(float));
  const std::vector<uint8_t> routable = routable_host_mask(moe, routing(), layer);
  std::vector<float> probs(static_cast<size_t>(num_experts));
  for (int64_t t = 0; t < num_tokens; ++t) {
    int32_t* ids = expert_ids.data() + t * top_k;
    if (!own_pick_missing(ids, top_k, is_resident)) continue;
    routable_softmax(logits.data() + t * num_experts, routable, probs);
    demand_.add_substituted(substitute_missing_picks(ids, weights.data() + t * top_k, top_k, probs, routable,
                                                     is_resident, config_.norm_topk_prob));
  }
  backend_.copy_from_host(routed.expert_ids, 0, expert_ids.data(), expert_ids.size() * sizeof(int32_t));
  backend_.copy_from_host(routed.weights, 0, weights.data(), weights.size() * sizeof(float));
  backend_.synchronize();  // the host vectors are the copies' sources
}

}  // namespace epic
