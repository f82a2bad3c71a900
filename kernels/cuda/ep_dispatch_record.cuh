// The dispatch record both expert-parallel modes send (ep_dispatch_kernels.cu, the normal mode's packed
// blocks; ep_low_latency_kernels.cu, its fixed-size blocks): a token's row, then its top_k expert ids and
// weights, where a slot that goes to another rank reads -1 and 0, so a receiver sees only its own slots.
// Layout and size: dispatch_record_bytes (ep_dispatch_kernels.h).
#pragma once

#include <cstdint>

namespace epic::ep_kernels {

// Written by the calling block (all its threads): the row in Word-sized pieces (row_bytes a multiple of
// sizeof(Word), both addresses aligned to it), the slots of `token` bound for `rank` by `destination`.
template <class Word>
__device__ void write_dispatch_record(const char* hidden, const int32_t* expert_ids, const float* weights,
                                      const int32_t* destination, int64_t token, int64_t top_k, int rank,
                                      int64_t row_bytes, char* record) {
  const Word* source = reinterpret_cast<const Word*>(hidden + token * row_bytes);
  Word* target = reinterpret_cast<Word*>(record);
  for (int64_t w = threadIdx.x; w < row_bytes / static_cast<int64_t>(sizeof(Word)); w += blockDim.x)
    target[w] = source[w];
  int32_t* record_ids = reinterpret_cast<int32_t*>(record + row_bytes);
  float* record_weights = reinterpret_cast<float*>(record_ids + top_k);
  for (int64_t j = threadIdx.x; j < top_k; j += blockDim.x) {
    const bool here = destination[token * top_k + j] == rank;
    record_ids[j] = here ? expert_ids[token * top_k + j] : -1;
    record_weights[j] = here ? weights[token * top_k + j] : 0.0f;
  }
}

}  // namespace epic::ep_kernels
