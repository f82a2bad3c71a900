// The device search both grouped expert FFN kernels (tiled and streaming) start with: grid.y
// enumerates work items over the experts' row groups in expert order, and each block finds its own
// from the group offsets on the device (no host sync, so the launch is graph capturable).
#pragma once

#include <cstdint>

#include "kernels/cuda/expert_address.cuh"

namespace epic::cuda_kernels {

// Rows per work item for find_group_chunk: one item per non-empty group, however long.
constexpr int kWholeGroup = 0;
// Experts read by each lane per round: one round of loads covers 32 * 4 = 128 experts.
constexpr int kExpertsPerLane = 4;

struct GroupChunk {
  int local;  // the expert's slot in the weight stack; -1: no work item for this block
  int row_begin;
  int row_end;
};

__device__ __forceinline__ int chunks_of(int rows, int rows_per_chunk) {
  return (rows + rows_per_chunk - 1) / rows_per_chunk;
}

// Work items in a group of `rows` rows: chunks of kChunkRows, or 1 for a non-empty whole group.
template <int kChunkRows>
__device__ __forceinline__ int work_items_of(int rows) {
  if constexpr (kChunkRows == kWholeGroup) {
    return rows > 0 ? 1 : 0;
  } else {
    return chunks_of(rows, kChunkRows);
  }
}

// The `target`-th work item (a chunk of kChunkRows rows, or a whole group with kWholeGroup) over
// all experts' groups in expert order, found by warp 0 with one round of loads per 128 experts.
// Called by the whole block (it ends with __syncthreads); local is -1 for a target past the last
// item and for rows of an expert not hosted here (expert_slot -1: local_index -1, or no address).
template <int kChunkRows>
__device__ GroupChunk find_group_chunk(const int32_t* offsets, const int32_t* local_index,
                                       const int64_t* addresses, int64_t num_experts, int target) {
  __shared__ GroupChunk found;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    if (lane == 0) found.local = -1;
    __syncwarp();
    int chunks_before = 0;
    for (int64_t base = 0; base < num_experts; base += 32 * kExpertsPerLane) {
      const int64_t first = base + static_cast<int64_t>(lane) * kExpertsPerLane;
      int bounds[kExpertsPerLane + 1];
      int local[kExpertsPerLane];
#pragma unroll
      for (int i = 0; i <= kExpertsPerLane; ++i) {
        const int64_t expert = first + i < num_experts ? first + i : num_experts;
        bounds[i] = offsets[expert];
        if (i < kExpertsPerLane)
          local[i] = first + i < num_experts ? expert_slot(local_index, addresses, first + i) : -1;
      }
      int lane_chunks = 0;
#pragma unroll
      for (int i = 0; i < kExpertsPerLane; ++i)
        lane_chunks += work_items_of<kChunkRows>(bounds[i + 1] - bounds[i]);
      int inclusive = lane_chunks;
#pragma unroll
      for (int offset = 1; offset < 32; offset *= 2) {
        const int from_below = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (lane >= offset) inclusive += from_below;
      }
      int cursor = chunks_before + inclusive - lane_chunks;
      if (target >= cursor && target < cursor + lane_chunks) {
#pragma unroll
        for (int i = 0; i < kExpertsPerLane; ++i) {
          const int count = work_items_of<kChunkRows>(bounds[i + 1] - bounds[i]);
          if (target >= cursor && target < cursor + count) {
            if constexpr (kChunkRows == kWholeGroup) {
              found.local = local[i];
              found.row_begin = bounds[i];
              found.row_end = bounds[i + 1];
            } else {
              const int row_begin = bounds[i] + (target - cursor) * kChunkRows;
              found.local = local[i];
              found.row_begin = row_begin;
              found.row_end = min(bounds[i + 1], row_begin + kChunkRows);
            }
          }
          cursor += count;
        }
      }
      chunks_before += __shfl_sync(0xffffffffu, inclusive, 31);
      if (chunks_before > target) break;  // uniform over the warp
    }
  }
  __syncthreads();
  return found;
}

}  // namespace epic::cuda_kernels
