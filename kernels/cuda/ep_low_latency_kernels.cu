// The low-latency pack, unpack, gather and combine kernels (ep_low_latency_kernels.h): the normal mode's
// kernels with fixed block strides and counts read from the block headers on the device.
#include <cuda_bf16.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/ep_dispatch_record.cuh"
#include "kernels/cuda/ep_low_latency_kernels.h"
#include "kernels/cuda/scalar_access.cuh"

namespace epic::ep_kernels {
namespace {

using cuda_kernels::access::capped_blocks;
using cuda_kernels::access::from_float;
using cuda_kernels::access::to_float;

constexpr int kThreads = 256;
// worker/ep_mode.h: kLowLatencyHeaderBytes (kernels/ does not include worker/).
constexpr int64_t kHeaderBytes = 16;

// Grid-stride over (rank, token) pairs, one block each; the first block also writes the headers.
template <class Word>
__global__ void pack_low_latency_kernel(const char* hidden, const int32_t* expert_ids, const float* weights,
                                        const int32_t* destination, const int32_t* send_position,
                                        const int64_t* send_counts, int64_t num_tokens, int64_t top_k,
                                        int64_t row_bytes, int num_ranks, int64_t record_bytes,
                                        int64_t block_bytes, char* blocks) {
  if (blockIdx.x == 0)
    for (int r = threadIdx.x; r < num_ranks; r += blockDim.x)
      *reinterpret_cast<int64_t*>(blocks + r * block_bytes) = send_counts[r];
  for (int64_t pair = blockIdx.x; pair < num_tokens * num_ranks; pair += gridDim.x) {
    const int rank = static_cast<int>(pair / num_tokens);
    const int64_t token = pair - rank * num_tokens;
    const int32_t position = send_position[rank * num_tokens + token];
    if (position < 0) continue;
    write_dispatch_record<Word>(hidden, expert_ids, weights, destination, token, top_k, rank, row_bytes,
                                blocks + rank * block_bytes + kHeaderBytes + position * record_bytes);
  }
}

__device__ const char* record_at(const char* blocks, int64_t place, int64_t block_tokens, int64_t block_bytes,
                                 int64_t record_bytes) {
  const int64_t rank = place / block_tokens, index = place - rank * block_tokens;
  return blocks + rank * block_bytes + kHeaderBytes + index * record_bytes;
}

__global__ void unpack_low_latency_metadata_kernel(const char* blocks, int num_ranks, int64_t block_tokens,
                                                   int64_t block_bytes, int64_t top_k, int64_t row_bytes,
                                                   int64_t record_bytes, int32_t unused_expert,
                                                   int32_t* expert_ids, float* weights) {
  const int64_t num_slots = num_ranks * block_tokens * top_k;
  for (int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; s < num_slots;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t place = s / top_k, j = s - place * top_k;
    const int64_t rank = place / block_tokens, index = place - rank * block_tokens;
    const int64_t count = *reinterpret_cast<const int64_t*>(blocks + rank * block_bytes);
    int32_t id = -1;
    float weight = 0.0f;
    if (index < count) {  // a real record; past the count the bytes are stale and never read
      const char* record = record_at(blocks, place, block_tokens, block_bytes, record_bytes);
      const int32_t* record_ids = reinterpret_cast<const int32_t*>(record + row_bytes);
      id = record_ids[j];
      weight = reinterpret_cast<const float*>(record_ids + top_k)[j];
    }
    expert_ids[s] = id < 0 ? unused_expert : id;
    weights[s] = id < 0 ? 0.0f : weight;
  }
}

template <class Word>
__global__ void gather_low_latency_rows_kernel(const char* blocks, int64_t block_tokens, int64_t block_bytes,
                                               int64_t record_bytes, int64_t row_bytes,
                                               const int32_t* source_record,
                                               const int32_t* num_rows_on_device, int64_t max_rows,
                                               char* out) {
  const int64_t num_rows = min(max_rows, static_cast<int64_t>(*num_rows_on_device));
  const int64_t words = row_bytes / static_cast<int64_t>(sizeof(Word));
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const Word* source = reinterpret_cast<const Word*>(
        record_at(blocks, source_record[row], block_tokens, block_bytes, record_bytes));
    Word* target = reinterpret_cast<Word*>(out + row * row_bytes);
    for (int64_t w = threadIdx.x; w < words; w += blockDim.x) target[w] = source[w];
  }
}

template <class TOut>
__global__ void combine_low_latency_kernel(const float* returned, const int32_t* send_position,
                                           int64_t block_tokens, int64_t num_tokens, int num_ranks,
                                           int64_t hidden, TOut* out) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < num_tokens * hidden;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = e / hidden, column = e - t * hidden;
    float sum = 0.0f;
    for (int r = 0; r < num_ranks; ++r) {
      const int32_t position = send_position[r * num_tokens + t];
      if (position >= 0) sum = __fadd_rn(sum, returned[(r * block_tokens + position) * hidden + column]);
    }
    out[e] = from_float<TOut>(sum);
  }
}

bool aligned16(const void* p, int64_t stride) {
  return cuda_kernels::access::aligned16(p) && stride % 16 == 0;
}

}  // namespace

void pack_low_latency(const void* hidden, ScalarType act, const int32_t* expert_ids, const float* weights,
                      const int32_t* destination, const int32_t* send_position, const int64_t* send_counts,
                      int64_t num_tokens, int64_t top_k, int64_t hidden_size, int num_ranks,
                      int64_t record_bytes, int64_t block_bytes, void* send_blocks, cudaStream_t stream) {
  if (num_ranks == 0) return;
  const int64_t row_bytes = hidden_size * static_cast<int64_t>(scalar_size(act));
  const unsigned blocks = capped_blocks(num_tokens * num_ranks, 1);
  const auto* source = static_cast<const char*>(hidden);
  auto* target = static_cast<char*>(send_blocks);
  // Records start at a 16-byte header and record_bytes is a multiple of 16: word copies where rows allow.
  if (aligned16(hidden, row_bytes) && aligned16(send_blocks, block_bytes))
    pack_low_latency_kernel<int4><<<blocks, kThreads, 0, stream>>>(
        source, expert_ids, weights, destination, send_position, send_counts, num_tokens, top_k, row_bytes,
        num_ranks, record_bytes, block_bytes, target);
  else
    pack_low_latency_kernel<uint16_t><<<blocks, kThreads, 0, stream>>>(
        source, expert_ids, weights, destination, send_position, send_counts, num_tokens, top_k, row_bytes,
        num_ranks, record_bytes, block_bytes, target);
  EPIC_CUDA_CHECK_LAUNCH();
}

void unpack_low_latency_metadata(const void* recv_blocks, int num_ranks, int64_t block_tokens,
                                 int64_t block_bytes, int64_t top_k, int64_t row_bytes, int64_t record_bytes,
                                 int32_t unused_expert, int32_t* expert_ids, float* weights,
                                 cudaStream_t stream) {
  const int64_t num_slots = num_ranks * block_tokens * top_k;
  if (num_slots == 0) return;
  unpack_low_latency_metadata_kernel<<<capped_blocks(num_slots, kThreads), kThreads, 0, stream>>>(
      static_cast<const char*>(recv_blocks), num_ranks, block_tokens, block_bytes, top_k, row_bytes,
      record_bytes, unused_expert, expert_ids, weights);
  EPIC_CUDA_CHECK_LAUNCH();
}

void gather_low_latency_rows(const void* recv_blocks, int64_t block_tokens, int64_t block_bytes,
                             int64_t record_bytes, int64_t row_bytes, const int32_t* source_record,
                             const int32_t* num_rows_on_device, int64_t max_rows, void* out,
                             cudaStream_t stream) {
  if (max_rows == 0) return;
  const unsigned blocks = capped_blocks(max_rows, 1);
  const auto* source = static_cast<const char*>(recv_blocks);
  auto* target = static_cast<char*>(out);
  if (aligned16(recv_blocks, block_bytes) && record_bytes % 16 == 0 && aligned16(out, row_bytes))
    gather_low_latency_rows_kernel<int4>
        <<<blocks, kThreads, 0, stream>>>(source, block_tokens, block_bytes, record_bytes, row_bytes,
                                          source_record, num_rows_on_device, max_rows, target);
  else
    gather_low_latency_rows_kernel<uint16_t>
        <<<blocks, kThreads, 0, stream>>>(source, block_tokens, block_bytes, record_bytes, row_bytes,
                                          source_record, num_rows_on_device, max_rows, target);
  EPIC_CUDA_CHECK_LAUNCH();
}

void combine_low_latency(const float* returned, const int32_t* send_position, int64_t block_tokens,
                         int64_t num_tokens, int num_ranks, int64_t hidden_size, void* out,
                         ScalarType out_type, cudaStream_t stream) {
  if (num_tokens == 0 || hidden_size == 0) return;
  cuda_kernels::access::dispatch_float_type(out_type, "ep combine_low_latency", [&](auto tag) {
    using TOut = typename decltype(tag)::type;
    combine_low_latency_kernel<TOut>
        <<<capped_blocks(num_tokens * hidden_size, kThreads), kThreads, 0, stream>>>(
            returned, send_position, block_tokens, num_tokens, num_ranks, hidden_size,
            static_cast<TOut*>(out));
  });
  EPIC_CUDA_CHECK_LAUNCH();
}

}  // namespace epic::ep_kernels
