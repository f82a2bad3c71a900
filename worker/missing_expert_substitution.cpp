// One token's substitution of missing experts (missing_expert_substitution.h).
#include "worker/missing_expert_substitution.h"

#include <cmath>
#include <string>

#include "kernels/backend.h"
#include "kernels/error.h"

namespace epic {

bool own_pick_missing(const int32_t* ids, int64_t top_k, const std::function<bool(int64_t)>& resident) {
  const int64_t own_k = own_top_k(ids, top_k);
  for (int64_t j = 0; j < own_k; ++j)
    if (!resident(ids[j])) return true;
  return false;
}

int64_t substitute_missing_picks(int32_t* ids, float* weights, int64_t top_k, const std::vector<float>& probs,
                                 const std::vector<uint8_t>& routable,
                                 const std::function<bool(int64_t)>& resident, bool norm_topk_prob,
                                 const std::function<void(int64_t, float)>& on_substituted) {
  const int64_t num_experts = static_cast<int64_t>(routable.size());
  // The token's own k: the step's other slots are padding (its first choice again, weight 0).
  if (!own_pick_missing(ids, top_k, resident)) return 0;
  const int64_t own_k = own_top_k(ids, top_k);
  std::vector<uint8_t> taken(static_cast<size_t>(num_experts), 0);
  for (int64_t j = 0; j < own_k; ++j) taken[ids[j]] = 1;
  std::vector<int64_t> chosen(static_cast<size_t>(own_k));
  int64_t substituted = 0;
  for (int64_t j = 0; j < own_k; ++j) {
    chosen[j] = ids[j];
    if (resident(ids[j])) continue;
    int64_t best = -1;
    for (int64_t e = 0; e < num_experts; ++e) {
      if (!routable[e] || taken[e] || !resident(e)) continue;
      // A NaN would never compare above anything and pass the pick over in silence.
      EPIC_CHECK(std::isfinite(probs[e]), ErrorCode::kInvalidArgument,
                 "--on-miss substitute: expert " + std::to_string(e) + " has router probability " +
                     std::to_string(probs[e]) + "; a non-finite probability cannot rank a substitute");
      if (best < 0 || probs[e] > probs[best]) best = e;
    }
    if (best < 0) continue;  // nothing resident to take its place: this pick waits
    if (on_substituted) on_substituted(ids[j], weights[j]);
    chosen[j] = best;
    taken[best] = 1;
    ++substituted;
  }
  float chosen_mass = 0;
  for (int64_t j = 0; j < own_k; ++j) chosen_mass += probs[chosen[j]];
  for (int64_t j = 0; j < top_k; ++j) {  // padding follows the first choice, still weighted zero
    ids[j] = static_cast<int32_t>(chosen[j < own_k ? j : 0]);
    if (j < own_k) weights[j] = norm_topk_prob ? probs[chosen[j]] / chosen_mass : probs[chosen[j]];
  }
  return substituted;
}

}  // namespace epic
