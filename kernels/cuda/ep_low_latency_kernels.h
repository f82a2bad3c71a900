// Host entry points of the expert-parallel low-latency kernels: the exchange of one step moves, from every
// rank to every rank, one FIXED-size block (worker/ep_mode.h): a 16-byte header holding the block's token
// count (int64), then `block_tokens` dispatch records (the layout of ep_dispatch_kernels.h), of which the
// first `count` are real. Everything that depends on the counts reads them on the device, so no host read
// sits between the layers and a decode step can be captured in a CUDA graph. The combine back is
// fixed-size too: block_tokens fp32 partial rows per rank. Device pointers plus a stream; each launches
// asynchronously and checks the launch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/tensor.h"

namespace epic::ep_kernels {

// Writes every rank's block into send_blocks (rank r's at r * block_bytes): header = send_counts[r], then
// the records of the tokens sent to r at send_position[r * T + t] (ep_dispatch_kernels.h: rank_layout).
// Runs with num_tokens == 0 too (headers of 0). Records past a block's count are left as they were.
void pack_low_latency(const void* hidden, ScalarType act, const int32_t* expert_ids, const float* weights,
                      const int32_t* destination, const int32_t* send_position, const int64_t* send_counts,
                      int64_t num_tokens, int64_t top_k, int64_t hidden_size, int num_ranks,
                      int64_t record_bytes, int64_t block_bytes, void* send_blocks, cudaStream_t stream);

// Over all num_ranks * block_tokens record places of the received blocks: expert_ids[q * k + j] and
// weights[q * k + j] of record q = r * block_tokens + i; slots served elsewhere, and every slot of a place
// past block r's header count, become `unused_expert` (weight 0), so Backend::group_by_expert puts them
// after every real group and nothing reads those places' (stale) rows.
void unpack_low_latency_metadata(const void* recv_blocks, int num_ranks, int64_t block_tokens,
                                 int64_t block_bytes, int64_t top_k, int64_t row_bytes, int64_t record_bytes,
                                 int32_t unused_expert, int32_t* expert_ids, float* weights,
                                 cudaStream_t stream);

// out[p] = the row of record place source_record[p] (as above), for p < *num_rows_on_device, the count
// read on the device (the real groups' end, offsets[E]); max_rows bounds the launch.
void gather_low_latency_rows(const void* recv_blocks, int64_t block_tokens, int64_t block_bytes,
                             int64_t record_bytes, int64_t row_bytes, const int32_t* source_record,
                             const int32_t* num_rows_on_device, int64_t max_rows, void* out,
                             cudaStream_t stream);

// out[t, :] = sum over ranks r ascending (fp32, from 0) of returned[r * block_tokens + send_position[r * T +
// t], :] where that position is >= 0, rounded once to out_type (ep_dispatch_kernels.h: combine_partials with
// fixed-size blocks).
void combine_low_latency(const float* returned, const int32_t* send_position, int64_t block_tokens,
                         int64_t num_tokens, int num_ranks, int64_t hidden_size, void* out,
                         ScalarType out_type, cudaStream_t stream);

}  // namespace epic::ep_kernels
