// Per-expert load counted on the backend: every MoE layer's routed slots tallied per expert (and, for an
// exchange, per destination rank) by Backend::count_routed_slots inside the step, so it costs one small op
// per layer, no host wait, and works inside a captured graph; read at a step boundary (a host wait), which
// serving does at most about once a second for /metrics.
#pragma once

#include <cstdint>
#include <map>
#include <vector>

#include "kernels/backend.h"
#include "worker/model_weights.h"

namespace epic {

// Rows counted since counting started (cumulative; a reader takes differences for a window).
struct ExpertLoad {
  // MoE layer -> rows per expert of that layer (its num_experts entries).
  std::map<int64_t, std::vector<int64_t>> rows_per_expert;
  // Rows this rank sent to each rank's experts, all layers (an exchange's executor on the device; empty
  // where rows_per_expert already is what this rank's own experts computed: the host exchange).
  std::vector<int64_t> rows_per_rank;
};

class ExpertLoadCounter {
 public:
  // Zeroed tallies on `backend` for every MoE layer of `weights`, and one over num_ranks destination ranks
  // when num_ranks > 0.
  ExpertLoadCounter(Backend& backend, const ModelWeights& weights, int num_ranks);
  // Enqueues the tally of one layer's routing (expert_ids I32 [tokens, top_k]); destinations (the same
  // shape: each slot's rank) only with num_ranks > 0, else absent. real_tokens as
  // Backend::count_routed_slots.
  void count(int64_t layer, const Tensor& expert_ids, const Tensor& real_tokens,
             const Tensor& destinations = {});
  // Waits for the backend and reads every tally.
  ExpertLoad read();

 private:
  Backend& backend_;
  std::map<int64_t, OwnedTensor> per_layer_;  // I64 [num_experts]
  OwnedTensor per_rank_;                      // I64 [num_ranks], or none
};

}  // namespace epic
