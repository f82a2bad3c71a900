// The layout step of a DeepEP-style dispatch, on the host: which tokens go to which rank (each token
// once per rank that serves any of its slots) and, per sent token, its slots that rank serves. The
// reference the device layout kernels (kernels/cuda/ep_dispatch_kernels.h) are tested against; the
// replica choice is ExpertParallelMoeExecutor's (occurrence key = earlier slots of the same expert on
// this rank + this rank, mod replicas), so both executors send a slot to the same rank.
#pragma once

#include <cstdint>
#include <vector>

#include "worker/expert_routing_table.h"

namespace epic {

// One layer's replicas as flat arrays (what the device reads): expert e's workers are
// workers[offsets[e] .. offsets[e + 1]), ascending; none for a masked expert.
struct ReplicaTable {
  std::vector<int32_t> offsets;  // [num_experts + 1]
  std::vector<int32_t> workers;
};

ReplicaTable flatten_replicas(const ExpertRoutingTable& table, int64_t layer, int64_t num_experts);

struct DispatchPlan {
  std::vector<int32_t> destination;    // [T * k]: the rank serving each slot
  std::vector<int64_t> send_counts;    // [R]: tokens sent to each rank
  std::vector<int64_t> send_pairs;     // [R]: (token, slot) pairs those tokens carry
  std::vector<int32_t> send_position;  // [R * T]: token t's index in rank r's block, -1 when not sent there
  // Per sent token in send order (rank blocks ascending, tokens ascending within a block): the token,
  // its k expert ids with -1 where another rank serves the slot, and the k weights (0 there).
  std::vector<int32_t> sent_token;
  std::vector<int32_t> sent_expert_ids;  // [sent * k]
  std::vector<float> sent_weights;       // [sent * k]
};

// expert_ids I32 and weights F32 [num_tokens, top_k] as route_top_k writes them. Throws
// Error(kInternal) for an expert no worker hosts (as ExpertRoutingTable::worker_for).
DispatchPlan plan_dispatch(const std::vector<int32_t>& expert_ids, const std::vector<float>& weights,
                           int64_t num_tokens, int64_t top_k, int rank, int num_ranks,
                           const ReplicaTable& replicas);

}  // namespace epic
