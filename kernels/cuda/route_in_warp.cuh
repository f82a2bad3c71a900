// The router's choice for one token, made by one warp (Backend::route_top_k's math): shared by the
// route_top_k kernel and the fused few-token MoE kernels (routed_moe_fused.cu), which repeat it in
// every block instead of waiting for another launch, so the two give the same ids and weights bit
// for bit.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "kernels/cuda/scalar_access.cuh"

namespace epic::cuda_kernels {

struct Choice {
  float probability;
  int32_t expert;  // -1: none
};

// Called by a whole warp; lane l holds experts l, l + 32, ... (kExpertsPerLane of them, so up to
// 32 * kExpertsPerLane experts) in registers; logit(e) returns expert e's logit as fp32. The softmax
// is max-subtracted fp32 over the present experts with the reference's expression
// exp(logit - max) / denominator; then top_k (<= 32) rounds each take the first remaining expert in
// the selection order and retire it. Lane j < top_k returns the j-th choice, its probability
// renormalised over the chosen ones when normalize; other lanes return {0, -1}. With own_k < top_k
// (Backend::route_top_k's row_top_k) only the first own_k choices are the token's: the sum that
// renormalises them stops there, and lanes own_k..top_k-1 return the padding {0, first choice}.
// A round is two warp reductions in hardware (redux.sync, sm_80+) rather than a shuffle tree: the
// largest probability (a probability is >= +0, so its bits order as the values do; +1 keeps 0 for
// "no candidate"), then the lowest expert id among the lanes holding it.
template <int kExpertsPerLane, class LogitOf>
__device__ __forceinline__ Choice route_in_warp(LogitOf logit, const uint8_t* present, int64_t num_experts,
                                                int64_t top_k, bool normalize, int64_t own_k) {
  constexpr int kWarp = access::kWarpSize;
  const int lane = threadIdx.x % kWarp;
  float probability[kExpertsPerLane];
  bool is_present[kExpertsPerLane];
  // Every load first (the mask and the logit of an expert do not wait on each other).
#pragma unroll
  for (int c = 0; c < kExpertsPerLane; ++c) {
    const int64_t expert = lane + c * kWarp;
    const bool exists = expert < num_experts;
    is_present[c] = exists && present[expert] != 0;
    probability[c] = exists ? logit(expert) : 0.0f;
  }
  uint32_t remaining = 0;  // bit c: expert lane + 32 c is present and not chosen yet
  float max_logit = -INFINITY;
#pragma unroll
  for (int c = 0; c < kExpertsPerLane; ++c) {
    if (is_present[c]) {
      remaining |= 1u << c;
      max_logit = fmaxf(max_logit, probability[c]);
    }
  }
  max_logit = access::warp_max(max_logit);
  float denominator = 0.0f;
#pragma unroll
  for (int c = 0; c < kExpertsPerLane; ++c) {
    probability[c] = (remaining & (1u << c)) ? expf(probability[c] - max_logit) : 0.0f;
    denominator += probability[c];  // absent experts add +0: the sum is unchanged
  }
  denominator = access::warp_sum(denominator);
#pragma unroll
  for (int c = 0; c < kExpertsPerLane; ++c) probability[c] = __fdiv_rn(probability[c], denominator);

  Choice mine{0.0f, -1};  // lane j: the j-th choice
  float selected_sum = 0.0f;
  for (int64_t j = 0; j < top_k; ++j) {
    uint32_t key = 0;  // this lane's first remaining expert in the selection order, as bits + 1
    int32_t expert = INT_MAX;
#pragma unroll
    for (int c = 0; c < kExpertsPerLane; ++c) {  // ascending id: strict > keeps the lower id on a tie
      const uint32_t candidate = __float_as_uint(probability[c]) + 1u;
      if ((remaining & (1u << c)) && candidate > key) {
        key = candidate;
        expert = lane + c * kWarp;
      }
    }
    const uint32_t best_key = __reduce_max_sync(access::kFullWarpMask, key);
    const int32_t best_expert = __reduce_min_sync(access::kFullWarpMask, key == best_key ? expert : INT_MAX);
    const Choice best =
        best_key == 0 ? Choice{-1.0f, -1} : Choice{__uint_as_float(best_key - 1u), best_expert};
    if (best.expert >= 0 && best.expert % kWarp == lane) remaining &= ~(1u << (best.expert / kWarp));
    if (lane == j) mine = best;
    if (j < own_k) selected_sum = __fadd_rn(selected_sum, best.probability);  // in selection order
  }
  if (normalize && lane < own_k) mine.probability = __fdiv_rn(mine.probability, selected_sum);
  const int32_t first_choice = __shfl_sync(access::kFullWarpMask, mine.expert, 0);
  if (lane >= own_k && lane < top_k) mine = Choice{0.0f, first_choice};
  return mine;
}

}  // namespace epic::cuda_kernels
