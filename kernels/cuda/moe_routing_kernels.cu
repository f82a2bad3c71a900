// MoE routing on the GPU: route_top_k (softmax over the present experts and top-k, one warp per
// token), group_by_expert (a stable counting sort of the (token, slot) rows by expert, one block)
// and combine_top_k (the weighted sum of each token's k expert outputs, in slot order).
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/route_in_warp.cuh"
#include "kernels/cuda/scalar_access.cuh"

namespace epic::cuda_kernels {
namespace {

using access::kFullWarpMask;
using access::kVectorElements;
using access::kWarpSize;

// ---- route_top_k -------------------------------------------------------------------------------

constexpr int kRouteWarps = 4;  // tokens per block
constexpr int kMaxRouteExpertsPerLane = 32;
constexpr int64_t kMaxRouteExperts = kMaxRouteExpertsPerLane * kWarpSize;  // 1024
// Lane j keeps the j-th selected weight until the renormalisation.
constexpr int64_t kMaxRouteTopK = kWarpSize;

// One warp per token (route_in_warp.cuh).
template <class T, int kExpertsPerLane>
__global__ void route_top_k_kernel(const T* logits, const uint8_t* present, int32_t* expert_ids,
                                   float* weights, int64_t tokens, int64_t num_experts, int64_t top_k,
                                   bool normalize, const int32_t* row_top_k) {
  dependent::wait_for_previous();  // dependent_launch.cuh: before any global access
  dependent::release_next();
  const int lane = threadIdx.x % kWarpSize;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kRouteWarps + threadIdx.x / kWarpSize;
  if (token >= tokens) return;  // the whole warp
  const T* row = logits + token * num_experts;
  // Out-of-range entries clamp to [1, top_k] (the host checks them; the CPU reference names them).
  const int64_t asked = row_top_k == nullptr ? top_k : row_top_k[token];
  const int64_t own_k = asked < 1 ? 1 : (asked > top_k ? top_k : asked);
  const Choice mine = route_in_warp<kExpertsPerLane>([row](int64_t e) { return access::to_float(row[e]); },
                                                     present, num_experts, top_k, normalize, own_k);
  if (lane < top_k) {
    expert_ids[token * top_k + lane] = mine.expert;
    weights[token * top_k + lane] = mine.probability;
  }
}

template <class T, int kExpertsPerLane>
void launch_route_top_k(const void* logits, const uint8_t* present, int32_t* expert_ids, float* weights,
                        int64_t tokens, int64_t num_experts, int64_t top_k, bool normalize,
                        const int32_t* row_top_k, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>((tokens + kRouteWarps - 1) / kRouteWarps);
  dependent::launch(route_top_k_kernel<T, kExpertsPerLane>, dim3(blocks), dim3(kRouteWarps * kWarpSize), 0,
                    stream, static_cast<const T*>(logits), present, expert_ids, weights, tokens, num_experts,
                    top_k, normalize, row_top_k);
}

// ---- group_by_expert ---------------------------------------------------------------------------

constexpr int kGroupThreads = 1024;
constexpr int kGroupWarps = kGroupThreads / kWarpSize;
// Dynamic shared memory within the 48 KiB a block gets without an opt-in attribute, leaving room
// for the scan's static array.
constexpr size_t kGroupSharedBytes = 47 * 1024;

// Exclusive prefix sum of data[0, n) in place, by the whole block; returns the total to every
// thread. Each thread scans a contiguous chunk, the chunk totals are scanned across the block.
__device__ int32_t block_exclusive_scan(int32_t* data, int64_t n) {
  __shared__ int32_t warp_totals[kGroupWarps];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t per_thread = (n + blockDim.x - 1) / blockDim.x;
  const int64_t begin = min(n, threadIdx.x * per_thread);
  const int64_t end = min(n, begin + per_thread);
  int32_t chunk_total = 0;
  for (int64_t i = begin; i < end; ++i) chunk_total += data[i];
  int32_t inclusive = chunk_total;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const int32_t other = __shfl_up_sync(kFullWarpMask, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == kWarpSize - 1) warp_totals[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int32_t warp_inclusive = lane < kGroupWarps ? warp_totals[lane] : 0;
#pragma unroll
    for (int offset = 1; offset < kWarpSize; offset *= 2) {
      const int32_t other = __shfl_up_sync(kFullWarpMask, warp_inclusive, offset);
      if (lane >= offset) warp_inclusive += other;
    }
    if (lane < kGroupWarps) warp_totals[lane] = warp_inclusive;  // now inclusive over warps
  }
  __syncthreads();
  int32_t running = (warp > 0 ? warp_totals[warp - 1] : 0) + inclusive - chunk_total;
  for (int64_t i = begin; i < end; ++i) {
    const int32_t value = data[i];
    data[i] = running;
    running += value;
  }
  const int32_t total = warp_totals[kGroupWarps - 1];
  __syncthreads();  // data and warp_totals are final for every thread before anyone reuses them
  return total;
}

// Places the slots [begin, end) of one segment, a warp's work: each slot goes to its expert's cursor
// plus its rank among the same expert's earlier lanes of the chunk (match_any), so the order is slot
// order within an expert. cursor[e] (shared, this warp's) starts at the segment's first position for
// expert e and is moved past each chunk's rows. Out-of-range ids get sorted_position -1.
__device__ void place_segment(const int32_t* expert_ids, int64_t begin, int64_t end, int32_t num_experts,
                              int64_t top_k, int32_t* cursor, int lane, int32_t* source_row,
                              int32_t* sorted_position) {
  const unsigned lanes_before = (1u << lane) - 1u;
  for (int64_t chunk = begin; chunk < end; chunk += kWarpSize) {
    const int64_t slot = chunk + lane;
    int32_t expert = slot < end ? expert_ids[slot] : -1;
    const bool valid = expert >= 0 && expert < num_experts;
    if (!valid) expert = -1;  // one group for everything that is not placed
    const unsigned peers = __match_any_sync(kFullWarpMask, expert);
    const int32_t base = valid ? cursor[expert] : 0;
    const int32_t rank = __popc(peers & lanes_before);
    __syncwarp();  // every peer has read the cursor before the first peer moves it
    if (valid) {
      const int32_t position = base + rank;
      sorted_position[slot] = position;
      source_row[position] = static_cast<int32_t>(slot / top_k);
      if (rank == 0) cursor[expert] = base + __popc(peers);
    } else if (slot < end) {
      sorted_position[slot] = -1;
    }
    __syncwarp();  // the moved cursors are visible to the next chunk
  }
}

// One block of kGroupThreads. The slots are cut into num_segments contiguous segments, one warp
// each; shared memory holds cursor[segment][expert] (num_segments x num_experts) and
// totals[expert]. 1) each segment warp counts its slots per expert; 2) per expert, the segments'
// counts become exclusive prefixes and the experts' totals an exclusive scan (the offsets);
// 3) each segment warp walks its slots in order, 32 at a time, and places each slot at its
// expert's cursor plus its rank among the same expert's earlier lanes (match_any), so the order
// is slot order within an expert: stable and deterministic. Out-of-range ids are left unsorted
// (sorted_position -1) rather than written out of bounds.
__global__ void __launch_bounds__(kGroupThreads)
    group_by_expert_kernel(const int32_t* expert_ids, int64_t slots, int32_t num_experts, int64_t top_k,
                           int num_segments, int32_t* expert_offsets, int32_t* source_row,
                           int32_t* sorted_position) {
  extern __shared__ int32_t shared[];
  dependent::wait_for_previous();  // dependent_launch.cuh: before any global access
  dependent::release_next();

  int32_t* cursor = shared;                                                     // [num_segments][num_experts]
  int32_t* totals = shared + static_cast<int64_t>(num_segments) * num_experts;  // [num_experts]
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t table_size = static_cast<int64_t>(num_segments) * num_experts;
  for (int64_t i = threadIdx.x; i < table_size + num_experts; i += blockDim.x) shared[i] = 0;
  __syncthreads();

  const int64_t segment_length =
      ((slots + num_segments - 1) / num_segments + kWarpSize - 1) / kWarpSize * kWarpSize;
  const int64_t segment_begin = min(slots, warp * segment_length);
  const int64_t segment_end = min(slots, segment_begin + segment_length);
  const bool segment_warp = warp < num_segments;
  int32_t* my_cursor = cursor + static_cast<int64_t>(warp) * num_experts;

  if (segment_warp) {
    for (int64_t slot = segment_begin + lane; slot < segment_end; slot += kWarpSize) {
      const int32_t expert = expert_ids[slot];
      if (expert >= 0 && expert < num_experts) atomicAdd(&my_cursor[expert], 1);  // a count: order-free
    }
  }
  __syncthreads();

  for (int32_t expert = threadIdx.x; expert < num_experts; expert += blockDim.x) {
    int32_t running = 0;
    for (int segment = 0; segment < num_segments; ++segment) {
      int32_t& entry = cursor[static_cast<int64_t>(segment) * num_experts + expert];
      const int32_t count = entry;
      entry = running;
      running += count;
    }
    totals[expert] = running;
  }
  __syncthreads();
  const int32_t total = block_exclusive_scan(totals, num_experts);
  for (int32_t expert = threadIdx.x; expert < num_experts; expert += blockDim.x) {
    expert_offsets[expert] = totals[expert];
    for (int segment = 0; segment < num_segments; ++segment)
      cursor[static_cast<int64_t>(segment) * num_experts + expert] += totals[expert];
  }
  if (threadIdx.x == 0) expert_offsets[num_experts] = total;
  __syncthreads();

  if (!segment_warp) return;
  place_segment(expert_ids, segment_begin, segment_end, num_experts, top_k, my_cursor, lane, source_row,
                sorted_position);
}

// ---- group_by_expert over many blocks (prefill sizes) -------------------------------------------
//
// The same stable counting sort with the segments spread over the GPU: a warp per segment of
// kSegmentSlots consecutive slots. 1) each warp counts its segment's slots per expert into its
// column of an [experts][segments] table; 2) one block turns each expert's row into exclusive prefixes
// (the segments' starting ranks within the expert) and writes the offsets; 3) each warp places its
// slots from cursor = offsets[e] + its prefix, in slot order (match_any ranks, as the one-block
// kernel). A single block walking 131072 slots took ~0.15 ms on an H200.

constexpr int kSegmentSlots = 512;  // 16 chunks of 32 slots a warp; 256 segments for 131072 slots
constexpr int kSegmentThreads = 256;
constexpr int kSegmentWarps = kSegmentThreads / kWarpSize;
constexpr int64_t kMaxSegmentExperts = 1024;  // a warp's histogram in shared memory: 8 x 4 KiB

__global__ void __launch_bounds__(kSegmentThreads)
    count_segments_kernel(const int32_t* expert_ids, int64_t slots, int32_t num_experts, int64_t segments,
                          int32_t* table) {
  extern __shared__ int32_t histograms[];  // [kSegmentWarps][num_experts]
  dependent::wait_for_previous();          // dependent_launch.cuh: before any global access
  dependent::release_next();
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t segment = static_cast<int64_t>(blockIdx.x) * kSegmentWarps + warp;
  if (segment >= segments) return;  // the whole warp; no block barrier follows
  int32_t* histogram = histograms + static_cast<int64_t>(warp) * num_experts;
  for (int32_t e = lane; e < num_experts; e += kWarpSize) histogram[e] = 0;
  __syncwarp();
  const int64_t begin = segment * kSegmentSlots;
  const int64_t end = min(slots, begin + kSegmentSlots);
  for (int64_t slot = begin + lane; slot < end; slot += kWarpSize) {
    const int32_t expert = expert_ids[slot];
    if (expert >= 0 && expert < num_experts) atomicAdd(&histogram[expert], 1);
  }
  __syncwarp();
  for (int32_t e = lane; e < num_experts; e += kWarpSize) table[e * segments + segment] = histogram[e];
}

// A warp per expert's row of the table: 128 segments a round (4 consecutive ones a lane, a shuffle scan of
// the lanes' sums, the running carry), then the experts' totals scanned by the block.
constexpr int kScanPerLane = 4;
__global__ void __launch_bounds__(kGroupThreads)
    scan_segments_kernel(int32_t* table, int64_t segments, int32_t num_experts, int32_t* expert_offsets) {
  __shared__ int32_t totals[kMaxSegmentExperts];
  dependent::wait_for_previous();
  dependent::release_next();
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  for (int32_t e = warp; e < num_experts; e += kGroupWarps) {
    int32_t carry = 0;
    for (int64_t base = 0; base < segments; base += kScanPerLane * kWarpSize) {
      int32_t counts[kScanPerLane];
      int32_t lane_sum = 0;
#pragma unroll
      for (int i = 0; i < kScanPerLane; ++i) {
        const int64_t segment = base + lane * kScanPerLane + i;
        counts[i] = segment < segments ? table[e * segments + segment] : 0;
        lane_sum += counts[i];
      }
      int32_t inclusive = lane_sum;
#pragma unroll
      for (int offset = 1; offset < kWarpSize; offset *= 2) {
        const int32_t other = __shfl_up_sync(kFullWarpMask, inclusive, offset);
        if (lane >= offset) inclusive += other;
      }
      int32_t running = carry + inclusive - lane_sum;
#pragma unroll
      for (int i = 0; i < kScanPerLane; ++i) {
        const int64_t segment = base + lane * kScanPerLane + i;
        if (segment < segments) table[e * segments + segment] = running;
        running += counts[i];
      }
      carry += __shfl_sync(kFullWarpMask, inclusive, kWarpSize - 1);
    }
    if (lane == 0) totals[e] = carry;
  }
  __syncthreads();
  const int32_t total = block_exclusive_scan(totals, num_experts);
  for (int32_t e = threadIdx.x; e < num_experts; e += blockDim.x) expert_offsets[e] = totals[e];
  if (threadIdx.x == 0) expert_offsets[num_experts] = total;
}

__global__ void __launch_bounds__(kSegmentThreads)
    place_segments_kernel(const int32_t* expert_ids, int64_t slots, int32_t num_experts, int64_t top_k,
                          int64_t segments, const int32_t* table, const int32_t* expert_offsets,
                          int32_t* source_row, int32_t* sorted_position) {
  extern __shared__ int32_t cursors[];  // [kSegmentWarps][num_experts]
  dependent::wait_for_previous();
  dependent::release_next();
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t segment = static_cast<int64_t>(blockIdx.x) * kSegmentWarps + warp;
  if (segment >= segments) return;
  int32_t* cursor = cursors + static_cast<int64_t>(warp) * num_experts;
  for (int32_t e = lane; e < num_experts; e += kWarpSize)
    cursor[e] = expert_offsets[e] + table[e * segments + segment];
  __syncwarp();
  const int64_t begin = segment * kSegmentSlots;
  place_segment(expert_ids, begin, min(slots, begin + kSegmentSlots), num_experts, top_k, cursor, lane,
                source_row, sorted_position);
}

// ---- combine_top_k -----------------------------------------------------------------------------

// out[t, :] = sum_j weights[t, j] * expert_out[sorted_position[t * k + j], :] in fp32, j ascending,
// each product and sum rounded separately (no FMA contraction), as the reference computes it.
template <int kVec, class T, class TOut>
__global__ void combine_top_k_kernel(const T* expert_out, const int32_t* sorted_position,
                                     const float* weights, int64_t tokens, int64_t top_k, int64_t hidden,
                                     TOut* out) {
  dependent::wait_for_previous();  // dependent_launch.cuh: before any global access
  dependent::release_next();
  const int64_t vectors_per_row = hidden / kVec;
  const int64_t total = tokens * vectors_per_row;
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < total;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t token = v / vectors_per_row;
    const int64_t column = (v - token * vectors_per_row) * kVec;
    float sum[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) sum[i] = 0.0f;
    for (int64_t j = 0; j < top_k; ++j) {
      const float weight = weights[token * top_k + j];
      const int64_t source = sorted_position[token * top_k + j];
      float values[kVec];
      access::load_vector<kVec>(expert_out + source * hidden + column, values);
#pragma unroll
      for (int i = 0; i < kVec; ++i) sum[i] = __fadd_rn(sum[i], __fmul_rn(weight, values[i]));
    }
    access::store_vector<kVec>(out + token * hidden + column, sum);
  }
}

constexpr int kCombineThreads = 256;

// ---- count_routed_slots -------------------------------------------------------------------------

constexpr int kCountThreads = 256;

// One thread per slot: integer atomics, so the tallies are exact whatever the order.
__global__ void count_routed_slots_kernel(const int32_t* expert_ids, int64_t tokens, int64_t top_k,
                                          const int32_t* real_tokens, unsigned long long* expert_counts,
                                          int64_t num_experts, const int32_t* keys,
                                          unsigned long long* key_counts, int64_t num_keys) {
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t token = slot / top_k, j = slot % top_k;
  const int64_t counted = real_tokens != nullptr ? min(static_cast<int64_t>(*real_tokens), tokens) : tokens;
  if (slot >= tokens * top_k || token >= counted) return;
  const int32_t id = expert_ids[slot];
  if (j > 0 && id == expert_ids[token * top_k]) return;  // is_padding_slot (kernels/backend.h)
  if (id >= 0 && id < num_experts) atomicAdd(expert_counts + id, 1ULL);
  if (keys != nullptr && keys[slot] >= 0 && keys[slot] < num_keys) atomicAdd(key_counts + keys[slot], 1ULL);
}

}  // namespace

void route_top_k(const void* logits, ScalarType type, const uint8_t* present, int32_t* expert_ids,
                 float* weights, int64_t tokens, int64_t num_experts, int64_t top_k, bool normalize,
                 const int32_t* row_top_k, cudaStream_t stream) {
  if (tokens == 0) return;
  EPIC_CHECK(num_experts >= 1 && num_experts <= kMaxRouteExperts && top_k >= 1 && top_k <= kMaxRouteTopK,
             ErrorCode::kUnsupported,
             "route_top_k: the CUDA kernel takes 1.." + std::to_string(kMaxRouteExperts) +
                 " experts and top_k 1.." + std::to_string(kMaxRouteTopK) + ", not " +
                 std::to_string(num_experts) + " experts, top_k " + std::to_string(top_k));
  access::dispatch_float_type(type, "route_top_k", [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    const auto launch = [&](auto experts_per_lane) {
      launch_route_top_k<T, decltype(experts_per_lane)::value>(
          logits, present, expert_ids, weights, tokens, num_experts, top_k, normalize, row_top_k, stream);
    };
    if (num_experts <= 1 * kWarpSize) {
      launch(std::integral_constant<int, 1>{});
    } else if (num_experts <= 2 * kWarpSize) {
      launch(std::integral_constant<int, 2>{});
    } else if (num_experts <= 4 * kWarpSize) {
      launch(std::integral_constant<int, 4>{});
    } else if (num_experts <= 8 * kWarpSize) {
      launch(std::integral_constant<int, 8>{});
    } else if (num_experts <= 16 * kWarpSize) {
      launch(std::integral_constant<int, 16>{});
    } else {
      launch(std::integral_constant<int, 32>{});
    }
  });
  EPIC_CUDA_CHECK_LAUNCH();
}

int64_t group_by_expert_scratch_bytes(int64_t slots, int64_t num_experts) {
  if (slots < kManyBlockGroupMinSlots || num_experts < 1 || num_experts > kMaxSegmentExperts ||
      slots > INT32_MAX)
    return 0;
  const int64_t segments = (slots + kSegmentSlots - 1) / kSegmentSlots;
  return segments * num_experts * static_cast<int64_t>(sizeof(int32_t));
}

void group_by_expert(const int32_t* expert_ids, int64_t slots, int64_t num_experts, int64_t top_k,
                     int32_t* expert_offsets, int32_t* source_row, int32_t* sorted_position, int32_t* scratch,
                     cudaStream_t stream) {
  if (scratch != nullptr && group_by_expert_scratch_bytes(slots, num_experts) > 0 && top_k >= 1) {
    const int64_t segments = (slots + kSegmentSlots - 1) / kSegmentSlots;
    const auto blocks = static_cast<unsigned>((segments + kSegmentWarps - 1) / kSegmentWarps);
    const size_t shared = static_cast<size_t>(kSegmentWarps * num_experts) * sizeof(int32_t);
    const auto experts = static_cast<int32_t>(num_experts);
    dependent::launch(count_segments_kernel, dim3(blocks), dim3(kSegmentThreads), shared, stream, expert_ids,
                      slots, experts, segments, scratch);
    dependent::launch(scan_segments_kernel, dim3(1), dim3(kGroupThreads), 0, stream, scratch, segments,
                      experts, expert_offsets);
    dependent::launch(place_segments_kernel, dim3(blocks), dim3(kSegmentThreads), shared, stream, expert_ids,
                      slots, experts, top_k, segments, static_cast<const int32_t*>(scratch),
                      static_cast<const int32_t*>(expert_offsets), source_row, sorted_position);
    EPIC_CUDA_CHECK_LAUNCH();
    return;
  }
  // As many segment warps as shared memory holds cursor rows for (and no more than there are
  // 32-slot chunks): 32 for 128 experts, 10 for 1024.
  const int64_t words = static_cast<int64_t>(kGroupSharedBytes / sizeof(int32_t));
  const int64_t segments_by_memory = num_experts > 0 ? (words - num_experts) / num_experts : 0;
  EPIC_CHECK(num_experts >= 1 && segments_by_memory >= 1 && slots <= INT32_MAX && top_k >= 1,
             ErrorCode::kUnsupported,
             "group_by_expert: the CUDA kernel takes 1.." + std::to_string(words / 2) +
                 " experts, top_k >= 1 and "
                 "fewer than 2^31 slots, not " +
                 std::to_string(num_experts) + " experts, top_k " + std::to_string(top_k) + ", " +
                 std::to_string(slots) + " slots");
  const int64_t chunks = (slots + kWarpSize - 1) / kWarpSize;
  const int num_segments =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({kGroupWarps, segments_by_memory, chunks})));
  const size_t shared_bytes =
      static_cast<size_t>(num_segments + 1) * static_cast<size_t>(num_experts) * sizeof(int32_t);
  // Even with no slots the offsets are written (all zero), so the launch is unconditional.
  dependent::launch(group_by_expert_kernel, dim3(1), dim3(kGroupThreads), shared_bytes, stream, expert_ids,
                    slots, static_cast<int32_t>(num_experts), top_k, num_segments, expert_offsets, source_row,
                    sorted_position);
  EPIC_CUDA_CHECK_LAUNCH();
}

void count_routed_slots(const int32_t* expert_ids, int64_t tokens, int64_t top_k, const int32_t* real_tokens,
                        int64_t* expert_counts, int64_t num_experts, const int32_t* keys, int64_t* key_counts,
                        int64_t num_keys, cudaStream_t stream) {
  const int64_t slots = tokens * top_k;
  if (slots == 0) return;
  static_assert(sizeof(unsigned long long) == sizeof(int64_t), "64-bit atomics on the I64 counts");
  const auto blocks = static_cast<unsigned>((slots + kCountThreads - 1) / kCountThreads);
  count_routed_slots_kernel<<<blocks, kCountThreads, 0, stream>>>(
      expert_ids, tokens, top_k, real_tokens, reinterpret_cast<unsigned long long*>(expert_counts),
      num_experts, keys, reinterpret_cast<unsigned long long*>(key_counts), num_keys);
  EPIC_CUDA_CHECK_LAUNCH();
}

void combine_top_k(const void* expert_out, ScalarType type, const int32_t* sorted_position,
                   const float* weights, int64_t tokens, int64_t top_k, int64_t hidden, void* out,
                   ScalarType out_type, cudaStream_t stream) {
  if (tokens == 0 || hidden == 0) return;
  const bool vector =
      hidden % kVectorElements == 0 && access::aligned16(expert_out) && access::aligned16(out);
  access::dispatch_float_type(type, "combine_top_k", [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    access::dispatch_float_type(out_type, "combine_top_k", [&](auto out_tag) {
      using TOut = typename decltype(out_tag)::type;
      if (vector) {
        dependent::launch(combine_top_k_kernel<kVectorElements, T, TOut>,
                          dim3(access::capped_blocks(tokens * hidden / kVectorElements, kCombineThreads)),
                          dim3(kCombineThreads), 0, stream, static_cast<const T*>(expert_out),
                          sorted_position, weights, tokens, top_k, hidden, static_cast<TOut*>(out));
      } else {
        dependent::launch(combine_top_k_kernel<1, T, TOut>,
                          dim3(access::capped_blocks(tokens * hidden, kCombineThreads)),
                          dim3(kCombineThreads), 0, stream, static_cast<const T*>(expert_out),
                          sorted_position, weights, tokens, top_k, hidden, static_cast<TOut*>(out));
      }
    });
  });
  EPIC_CUDA_CHECK_LAUNCH();
}

}  // namespace epic::cuda_kernels
