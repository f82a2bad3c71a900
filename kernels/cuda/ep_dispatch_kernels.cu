// The expert-parallel layout, pack, unpack and combine kernels (ep_dispatch_kernels.h). Plain loops
// over grid-stride indices: these move bytes and count, the expert FFN is elsewhere.
#include <cuda_bf16.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/ep_dispatch_kernels.h"
#include "kernels/cuda/ep_dispatch_record.cuh"
#include "kernels/cuda/scalar_access.cuh"

namespace epic::ep_kernels {
namespace {

using cuda_kernels::access::capped_blocks;
using cuda_kernels::access::from_float;
using cuda_kernels::access::kFullWarpMask;
using cuda_kernels::access::kWarpSize;
using cuda_kernels::access::to_float;

constexpr int kThreads = 256;
constexpr int kLayoutThreads = 1024;

__device__ int64_t block_start(const int64_t* send_counts, int rank) {
  int64_t start = 0;
  for (int r = 0; r < rank; ++r) start += send_counts[r];
  return start;
}

__global__ void slot_destinations_kernel(const int32_t* expert_ids, const int32_t* sorted_position,
                                         const int32_t* expert_offsets, const int32_t* replica_offsets,
                                         const int32_t* replica_workers, int64_t num_slots, int rank,
                                         int32_t* destination) {
  for (int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; s < num_slots;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t expert = expert_ids[s];
    const int32_t first = replica_offsets[expert];
    const int32_t replicas = replica_offsets[expert + 1] - first;
    if (replicas <= 0) {
      destination[s] = -1;
      continue;
    }
    // Unsigned 64-bit like the host's key, so the modulo agrees for every occurrence count.
    const uint64_t key =
        static_cast<uint64_t>(sorted_position[s] - expert_offsets[expert]) + static_cast<uint64_t>(rank);
    destination[s] = replica_workers[first + static_cast<int32_t>(key % static_cast<uint64_t>(replicas))];
  }
}

// Block-wide exclusive scan of one value per thread; returns the exclusive prefix, total in *total.
__device__ int64_t block_exclusive_scan(int64_t value, int64_t* total) {
  __shared__ int64_t warp_totals[kLayoutThreads / kWarpSize];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  __syncthreads();  // a previous call's readers are done with warp_totals
  int64_t inclusive = value;
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const int64_t other = __shfl_up_sync(kFullWarpMask, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == kWarpSize - 1) warp_totals[warp] = inclusive;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t running = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x / kWarpSize); ++w) {
      const int64_t t = warp_totals[w];
      warp_totals[w] = running;
      running += t;
    }
    *total = running;
  }
  __syncthreads();
  return warp_totals[warp] + inclusive - value;
}

// One block per rank; each thread owns a contiguous run of tokens, so positions ascend with tokens.
__global__ void rank_layout_kernel(const int32_t* destination, int64_t num_tokens, int64_t top_k,
                                   int32_t* send_position, int64_t* send_counts, int64_t* send_pairs) {
  __shared__ int64_t total_tokens, total_pairs;
  const int rank = blockIdx.x;
  const int64_t per_thread = (num_tokens + blockDim.x - 1) / blockDim.x;
  const int64_t begin = min(num_tokens, threadIdx.x * per_thread);
  const int64_t end = min(num_tokens, begin + per_thread);
  int64_t tokens = 0, pairs = 0;
  for (int64_t t = begin; t < end; ++t) {
    int64_t here = 0;
    for (int64_t j = 0; j < top_k; ++j) here += destination[t * top_k + j] == rank;
    tokens += here > 0;
    pairs += here;
  }
  int64_t position = block_exclusive_scan(tokens, &total_tokens);
  block_exclusive_scan(pairs, &total_pairs);
  for (int64_t t = begin; t < end; ++t) {
    bool here = false;
    for (int64_t j = 0; j < top_k; ++j) here = here || destination[t * top_k + j] == rank;
    send_position[rank * num_tokens + t] = here ? static_cast<int32_t>(position++) : -1;
  }
  if (threadIdx.x == 0) {
    send_counts[rank] = total_tokens;
    send_pairs[rank] = total_pairs;
  }
}

// One block per (token, rank) pair (grid-stride): the row copied in 16-byte words where aligned.
template <class Word>
__global__ void pack_dispatch_kernel(const char* hidden, const int32_t* expert_ids, const float* weights,
                                     const int32_t* destination, const int32_t* send_position,
                                     const int64_t* send_counts, int64_t num_tokens, int64_t top_k,
                                     int64_t row_bytes, int num_ranks, int64_t record_bytes, char* records) {
  for (int64_t pair = blockIdx.x; pair < num_tokens * num_ranks; pair += gridDim.x) {
    const int rank = static_cast<int>(pair / num_tokens);
    const int64_t token = pair - rank * num_tokens;
    const int32_t position = send_position[rank * num_tokens + token];
    if (position < 0) continue;
    write_dispatch_record<Word>(hidden, expert_ids, weights, destination, token, top_k, rank, row_bytes,
                                records + (block_start(send_counts, rank) + position) * record_bytes);
  }
}

__global__ void unpack_metadata_kernel(const char* records, int64_t num_received, int64_t top_k,
                                       int64_t row_bytes, int64_t record_bytes, int32_t unused_expert,
                                       int32_t* expert_ids, float* weights) {
  for (int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; s < num_received * top_k;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = s / top_k, j = s - i * top_k;
    const int32_t* record_ids = reinterpret_cast<const int32_t*>(records + i * record_bytes + row_bytes);
    const float* record_weights = reinterpret_cast<const float*>(record_ids + top_k);
    expert_ids[s] = record_ids[j] < 0 ? unused_expert : record_ids[j];
    weights[s] = record_weights[j];
  }
}

template <class Word>
__global__ void gather_record_rows_kernel(const char* records, int64_t record_bytes, int64_t row_bytes,
                                          const int32_t* source_record, int64_t num_rows, char* out) {
  const int64_t words = row_bytes / static_cast<int64_t>(sizeof(Word));
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const Word* source = reinterpret_cast<const Word*>(records + source_record[row] * record_bytes);
    Word* target = reinterpret_cast<Word*>(out + row * row_bytes);
    for (int64_t w = threadIdx.x; w < words; w += blockDim.x) target[w] = source[w];
  }
}

template <class T>
__global__ void partial_sums_kernel(const T* expert_out, const int32_t* expert_ids, int32_t unused_expert,
                                    const int32_t* sorted_position, const float* weights,
                                    int64_t num_received, int64_t top_k, int64_t hidden, float* partial) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < num_received * hidden;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / hidden, column = e - i * hidden;
    float sum = 0.0f;
    for (int64_t j = 0; j < top_k; ++j) {
      if (expert_ids[i * top_k + j] == unused_expert) continue;
      const float value = to_float(expert_out[sorted_position[i * top_k + j] * hidden + column]);
      sum = __fadd_rn(sum, __fmul_rn(weights[i * top_k + j], value));
    }
    partial[e] = sum;
  }
}

template <class TOut>
__global__ void combine_partials_kernel(const float* returned, const int32_t* send_position,
                                        const int64_t* send_counts, int64_t num_tokens, int num_ranks,
                                        int64_t hidden, TOut* out) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < num_tokens * hidden;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = e / hidden, column = e - t * hidden;
    float sum = 0.0f;
    int64_t start = 0;
    for (int r = 0; r < num_ranks; ++r) {
      const int32_t position = send_position[r * num_tokens + t];
      if (position >= 0) sum = __fadd_rn(sum, returned[(start + position) * hidden + column]);
      start += send_counts[r];
    }
    out[e] = from_float<TOut>(sum);
  }
}

bool aligned16(const void* p, int64_t stride) {
  return cuda_kernels::access::aligned16(p) && stride % 16 == 0;
}

// sorted_weights[sorted_position[s]] = weights[s] for the slots of real experts (those sort first).
__global__ void scatter_slot_weights_kernel(const int32_t* expert_ids, const float* weights,
                                            const int32_t* sorted_position, int64_t num_slots,
                                            int64_t num_experts, float* sorted_weights) {
  for (int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; s < num_slots;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t expert = expert_ids[s];
    if (expert >= 0 && expert < num_experts) sorted_weights[sorted_position[s]] = weights[s];
  }
}

constexpr int kUseSumThreads = 128;

// One block per expert over its group [offsets[e], offsets[e + 1]): each thread a strided partial, then a
// shared-memory tree; the order depends only on the group's size, so the sum is the same every run.
__global__ void expert_use_sums_kernel(const float* sorted_weights, const int32_t* expert_offsets,
                                       int64_t num_slots, int32_t* uses, float* weight_sums) {
  __shared__ float partial_weight[kUseSumThreads];
  __shared__ int32_t partial_uses[kUseSumThreads];
  const int64_t expert = blockIdx.x;
  const int64_t begin = expert_offsets[expert];
  const int64_t end = min(static_cast<int64_t>(expert_offsets[expert + 1]), num_slots);
  float weight = 0.0f;
  int32_t count = 0;
  for (int64_t p = begin + threadIdx.x; p < end; p += kUseSumThreads) {
    const float w = sorted_weights[p];
    if (w > 0.0f) {
      weight += w;
      count += 1;
    }
  }
  partial_weight[threadIdx.x] = weight;
  partial_uses[threadIdx.x] = count;
  __syncthreads();
  for (int half = kUseSumThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      partial_weight[threadIdx.x] += partial_weight[threadIdx.x + half];
      partial_uses[threadIdx.x] += partial_uses[threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    weight_sums[expert] = partial_weight[0];
    uses[expert] = partial_uses[0];
  }
}

}  // namespace

int64_t dispatch_record_bytes(int64_t hidden, ScalarType act, int64_t top_k) {
  const int64_t bytes = hidden * static_cast<int64_t>(scalar_size(act)) + top_k * 8;
  return (bytes + 15) / 16 * 16;
}

void slot_destinations(const int32_t* expert_ids, const int32_t* sorted_position,
                       const int32_t* expert_offsets, const int32_t* replica_offsets,
                       const int32_t* replica_workers, int64_t num_slots, int rank, int32_t* destination,
                       cudaStream_t stream) {
  if (num_slots == 0) return;
  slot_destinations_kernel<<<capped_blocks(num_slots, kThreads), kThreads, 0, stream>>>(
      expert_ids, sorted_position, expert_offsets, replica_offsets, replica_workers, num_slots, rank,
      destination);
  EPIC_CUDA_CHECK_LAUNCH();
}

void rank_layout(const int32_t* destination, int64_t num_tokens, int64_t top_k, int num_ranks,
                 int32_t* send_position, int64_t* send_counts, int64_t* send_pairs, cudaStream_t stream) {
  if (num_ranks == 0) return;
  rank_layout_kernel<<<num_ranks, kLayoutThreads, 0, stream>>>(destination, num_tokens, top_k, send_position,
                                                               send_counts, send_pairs);
  EPIC_CUDA_CHECK_LAUNCH();
}

void pack_dispatch(const void* hidden, ScalarType act, const int32_t* expert_ids, const float* weights,
                   const int32_t* destination, const int32_t* send_position, const int64_t* send_counts,
                   int64_t num_tokens, int64_t top_k, int64_t hidden_size, int num_ranks,
                   int64_t record_bytes, void* send_records, cudaStream_t stream) {
  if (num_tokens == 0) return;
  const int64_t row_bytes = hidden_size * static_cast<int64_t>(scalar_size(act));
  const unsigned blocks = capped_blocks(num_tokens * num_ranks, 1);
  const auto* source = static_cast<const char*>(hidden);
  auto* target = static_cast<char*>(send_records);
  if (aligned16(hidden, row_bytes) && aligned16(send_records, record_bytes))
    pack_dispatch_kernel<int4><<<blocks, kThreads, 0, stream>>>(source, expert_ids, weights, destination,
                                                                send_position, send_counts, num_tokens, top_k,
                                                                row_bytes, num_ranks, record_bytes, target);
  else
    pack_dispatch_kernel<uint16_t><<<blocks, kThreads, 0, stream>>>(
        source, expert_ids, weights, destination, send_position, send_counts, num_tokens, top_k, row_bytes,
        num_ranks, record_bytes, target);
  EPIC_CUDA_CHECK_LAUNCH();
}

void expert_use_sums(const int32_t* expert_ids, const float* weights, const int32_t* sorted_position,
                     const int32_t* expert_offsets, int64_t num_slots, int64_t num_experts,
                     float* sorted_weights, int32_t* uses, float* weight_sums, cudaStream_t stream) {
  if (num_experts == 0) return;
  if (num_slots > 0) {
    scatter_slot_weights_kernel<<<capped_blocks(num_slots, kThreads), kThreads, 0, stream>>>(
        expert_ids, weights, sorted_position, num_slots, num_experts, sorted_weights);
    EPIC_CUDA_CHECK_LAUNCH();
  }
  expert_use_sums_kernel<<<static_cast<unsigned>(num_experts), kUseSumThreads, 0, stream>>>(
      sorted_weights, expert_offsets, num_slots, uses, weight_sums);
  EPIC_CUDA_CHECK_LAUNCH();
}

void unpack_metadata(const void* records, int64_t num_received, int64_t top_k, int64_t row_bytes,
                     int64_t record_bytes, int32_t unused_expert, int32_t* expert_ids, float* weights,
                     cudaStream_t stream) {
  if (num_received == 0) return;
  unpack_metadata_kernel<<<capped_blocks(num_received * top_k, kThreads), kThreads, 0, stream>>>(
      static_cast<const char*>(records), num_received, top_k, row_bytes, record_bytes, unused_expert,
      expert_ids, weights);
  EPIC_CUDA_CHECK_LAUNCH();
}

void gather_record_rows(const void* records, int64_t record_bytes, int64_t row_bytes,
                        const int32_t* source_record, int64_t num_rows, void* out, cudaStream_t stream) {
  if (num_rows == 0) return;
  const unsigned blocks = capped_blocks(num_rows, 1);
  const auto* source = static_cast<const char*>(records);
  auto* target = static_cast<char*>(out);
  if (aligned16(records, record_bytes) && aligned16(out, row_bytes))
    gather_record_rows_kernel<int4>
        <<<blocks, kThreads, 0, stream>>>(source, record_bytes, row_bytes, source_record, num_rows, target);
  else
    gather_record_rows_kernel<uint16_t>
        <<<blocks, kThreads, 0, stream>>>(source, record_bytes, row_bytes, source_record, num_rows, target);
  EPIC_CUDA_CHECK_LAUNCH();
}

void partial_sums(const void* expert_out, ScalarType act, const int32_t* expert_ids, int32_t unused_expert,
                  const int32_t* sorted_position, const float* weights, int64_t num_received, int64_t top_k,
                  int64_t hidden_size, float* partial, cudaStream_t stream) {
  if (num_received == 0 || hidden_size == 0) return;
  cuda_kernels::access::dispatch_float_type(act, "ep partial_sums", [&](auto tag) {
    using T = typename decltype(tag)::type;
    partial_sums_kernel<T><<<capped_blocks(num_received * hidden_size, kThreads), kThreads, 0, stream>>>(
        static_cast<const T*>(expert_out), expert_ids, unused_expert, sorted_position, weights, num_received,
        top_k, hidden_size, partial);
  });
  EPIC_CUDA_CHECK_LAUNCH();
}

void combine_partials(const float* returned, const int32_t* send_position, const int64_t* send_counts,
                      int64_t num_tokens, int num_ranks, int64_t hidden_size, void* out, ScalarType out_type,
                      cudaStream_t stream) {
  if (num_tokens == 0 || hidden_size == 0) return;
  cuda_kernels::access::dispatch_float_type(out_type, "ep combine_partials", [&](auto tag) {
    using TOut = typename decltype(tag)::type;
    combine_partials_kernel<TOut><<<capped_blocks(num_tokens * hidden_size, kThreads), kThreads, 0, stream>>>(
        returned, send_position, send_counts, num_tokens, num_ranks, hidden_size, static_cast<TOut*>(out));
  });
  EPIC_CUDA_CHECK_LAUNCH();
}

}  // namespace epic::ep_kernels
