// The running best of a device argmax (argmax_kernels.cu, scoring_kernels.cu): a (value, index)
// candidate, the order that keeps the lowest index among the largest values whatever the split of the
// row, and its warp reduction.
#pragma once

#include <cstdint>

#include "kernels/cuda/scalar_access.cuh"

namespace epic::cuda_kernels {

struct Candidate {
  float value;
  int32_t index;  // -1: no element seen (a thread past the end of a short row or slice)
};

// a is better than b: larger value, or equal value and lower index. NaN never compares larger (the ops
// say what a row holding one gets, so where it lands does not matter).
__device__ __forceinline__ bool better(const Candidate& a, const Candidate& b) {
  if (a.index < 0) return false;
  if (b.index < 0) return true;
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

// The best candidate of the warp, in every lane.
__device__ __forceinline__ Candidate warp_best(Candidate best) {
#pragma unroll
  for (int offset = access::kWarpSize / 2; offset > 0; offset /= 2) {
    const Candidate other{__shfl_xor_sync(access::kFullWarpMask, best.value, offset),
                          __shfl_xor_sync(access::kFullWarpMask, best.index, offset)};
    if (better(other, best)) best = other;
  }
  return best;
}

}  // namespace epic::cuda_kernels
