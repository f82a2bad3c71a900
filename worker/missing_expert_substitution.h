// --on-miss substitute's choice for one token, shared by the one-process executor
// (worker/offloading_moe_executor.cpp) and the expert-parallel one (worker/expert_parallel_substitute.cpp),
// which differ only in what "resident" means (the store's own slots, or resident on every worker hosting
// the expert).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace epic {

// Each of the token's own picks (its first own_top_k slots) whose expert is not resident goes to the most
// probable routable expert that is resident and not already taken by the token (ties to the lower id); then
// the token's weights become the router's probabilities of its final choice, renormalised over them where
// the model does (norm_topk_prob), exactly as route_top_k weighs a choice. A pick with no resident
// substitute stays (its executor waits for it or reads it); padding slots follow the first choice with
// weight 0. Nothing changes when every own pick is resident.
//   ids, weights: the token's top_k slots, rewritten in place. probs: routable_softmax of its logits (one per
//   expert); routable: the routing mask. on_substituted(expert, weight): each replaced pick's original
//   expert and weight, before the rewrite. Returns the picks replaced.
// Whether any of the token's own picks is not resident (the callers skip the softmax of tokens without).
bool own_pick_missing(const int32_t* ids, int64_t top_k, const std::function<bool(int64_t)>& resident);

int64_t substitute_missing_picks(int32_t* ids, float* weights, int64_t top_k, const std::vector<float>& probs,
                                 const std::vector<uint8_t>& routable,
                                 const std::function<bool(int64_t)>& resident, bool norm_topk_prob,
                                 const std::function<void(int64_t, float)>& on_substituted = {});

}  // namespace epic
