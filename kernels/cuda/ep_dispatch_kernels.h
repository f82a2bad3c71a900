// Host entry points of the expert-parallel dispatch/combine kernels (DeepEP's "normal mode" layout:
// each token travels once to each rank serving any of its slots, with those slots' expert ids and
// weights). Device pointers plus a stream; each launches asynchronously, checks the launch, never
// synchronises. The host reference of the layout is worker/expert_dispatch_plan.h.
//
// A dispatch record (one per sent token) is the token's row in the activation type, then top_k I32
// expert ids (-1 where another rank serves the slot), then top_k F32 weights (0 there), padded to
// record_bytes (a multiple of 16, so rows stay 16-byte aligned for vector loads).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/tensor.h"

namespace epic::ep_kernels {

int64_t dispatch_record_bytes(int64_t hidden, ScalarType act, int64_t top_k);

// destination[s] = the rank serving slot s: expert e = expert_ids[s], occurrence o = the slots before s
// routed to e (sorted_position[s] - expert_offsets[e], from Backend::group_by_expert's stable sort),
// rank replica_workers[replica_offsets[e] + (o + rank) % replicas(e)] (ExpertRoutingTable::worker_for).
// An expert without replicas writes -1 (the caller checks nothing on the device: routing never picks
// a masked expert, and every present expert is hosted somewhere).
void slot_destinations(const int32_t* expert_ids, const int32_t* sorted_position,
                       const int32_t* expert_offsets, const int32_t* replica_offsets,
                       const int32_t* replica_workers, int64_t num_slots, int rank, int32_t* destination,
                       cudaStream_t stream);

// One block per destination rank r: send_position[r * T + t] = token t's index in r's block (tokens
// ascending), -1 when none of its slots goes to r; send_counts[r] = tokens sent to r; send_pairs[r] =
// the (token, slot) pairs they carry there.
void rank_layout(const int32_t* destination, int64_t num_tokens, int64_t top_k, int num_ranks,
                 int32_t* send_position, int64_t* send_counts, int64_t* send_pairs, cudaStream_t stream);

// Writes the records of every sent token into send_records: rank r's block starts at record
// sum(send_counts[0 .. r)).
void pack_dispatch(const void* hidden, ScalarType act, const int32_t* expert_ids, const float* weights,
                   const int32_t* destination, const int32_t* send_position, const int64_t* send_counts,
                   int64_t num_tokens, int64_t top_k, int64_t hidden_size, int num_ranks,
                   int64_t record_bytes, void* send_records, cudaStream_t stream);

// From num_received records: expert_ids[i * k + j] (slots served elsewhere become `unused_expert`, an id
// past the real ones so Backend::group_by_expert puts them last) and weights[i * k + j].
void unpack_metadata(const void* records, int64_t num_received, int64_t top_k, int64_t row_bytes,
                     int64_t record_bytes, int32_t unused_expert, int32_t* expert_ids, float* weights,
                     cudaStream_t stream);

// out[p] = the row of record source_record[p], for p < num_rows (row_bytes each).
void gather_record_rows(const void* records, int64_t record_bytes, int64_t row_bytes,
                        const int32_t* source_record, int64_t num_rows, void* out, cudaStream_t stream);

// partial[i, :] = sum over this record's served slots j ascending of weights[i, j] * expert_out[
// sorted_position[i * k + j], :], in fp32 with each product and sum rounded alone (as combine_top_k).
void partial_sums(const void* expert_out, ScalarType act, const int32_t* expert_ids, int32_t unused_expert,
                  const int32_t* sorted_position, const float* weights, int64_t num_received, int64_t top_k,
                  int64_t hidden_size, float* partial, cudaStream_t stream);

// out[t, :] = sum over ranks r ascending (fp32, starting from 0) of the partial row rank r sent back for t
// (returned holds the rank blocks in order, as sent), rounded once to out_type.
void combine_partials(const float* returned, const int32_t* send_position, const int64_t* send_counts,
                      int64_t num_tokens, int num_ranks, int64_t hidden_size, void* out, ScalarType out_type,
                      cudaStream_t stream);

// The received slots' uses of each expert, for an expert store's policy (worker/expert_store.h): for e <
// num_experts, uses[e] = the slots s < num_slots with expert_ids[s] == e and weights[s] > 0, and
// weight_sums[e] = the sum of those weights (fp32, a fixed tree order per expert: deterministic). A weight of
// 0 is a padding slot (a row routing fewer experts than top_k) or a slot served elsewhere. sorted_position
// and expert_offsets are Backend::group_by_expert's for these ids; sorted_weights is scratch F32 [num_slots].
// Every entry of uses and weight_sums [num_experts] is written.
void expert_use_sums(const int32_t* expert_ids, const float* weights, const int32_t* sorted_position,
                     const int32_t* expert_offsets, int64_t num_slots, int64_t num_experts,
                     float* sorted_weights, int32_t* uses, float* weight_sums, cudaStream_t stream);

}  // namespace epic::ep_kernels
