// One worker computing its MoE blocks with only a budget of its experts in backend memory (ExpertStore):
// route on the backend, read the routing back (the one host synchronisation per layer that residency
// needs), record every pick's routing weight in the store's usefulness score, make the chosen experts
// resident (or, with OnMiss::kSubstitute, route a missing expert's slot to the most probable resident
// expert instead, and fetch the missing one after the layer for the tokens to come), then group, run the
// expert FFN on the store's slots and combine as the local executor does. A step that needs more distinct
// experts than a layer has slots runs its expert FFN in groups of experts that fit, one after another:
// each row is computed alone, so the output does not depend on the budget (bitwise on the CPU).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/backend.h"
#include "worker/expert_store.h"
#include "worker/model_config.h"
#include "worker/model_weights.h"
#include "worker/moe_executor.h"
#include "worker/resident_expert_ffn.h"
#include "worker/step_demand.h"
#include "worker/workspace.h"

namespace epic {

// What a step does with a chosen expert that is not resident.
enum class OnMiss {
  kWait,        // copy it in before the expert FFN (the stall is counted)
  kSubstitute,  // route the slot to the most probable resident expert the token did not choose
  // Compute it from the host tier in place (the backend reads its bytes over the bus: ExpertStore's
  // address table), so a step never waits and never reads its routing back; after the step its misses
  // are admitted with copies behind the next steps (ExpertStore::admit_in_background). The output is the
  // full model's. Host tier only.
  kRead,
};
// "wait", "substitute" or "read"; anything else -> Error(kInvalidArgument) naming them.
OnMiss parse_on_miss(const std::string& name);
const char* on_miss_name(OnMiss on_miss);

// What is fetched ahead of need.
enum class Prefetch {
  kNone,
  // Right after a layer's routing, the next MoE layer's router applied to this layer's router input
  // predicts its experts (the residual stream changes little from one layer to the next); the most
  // probable ones are loaded into that layer's slots (its own slots: this layer's experts stay).
  kNextLayer,
};
Prefetch parse_prefetch(const std::string& name);  // "none" or "next-layer"

struct OffloadStats {
  // MoE layer calls (layers x steps). OnMiss::kRead counts each step's in finish_step: a step replayed
  // from a graph never calls forward, and the step that captures one calls it twice.
  int64_t calls = 0;
  int64_t picks = 0;          // (token, slot) routing picks
  int64_t substituted = 0;    // picks routed to a resident expert instead (kSubstitute)
  int64_t expert_groups = 0;  // expert FFN calls (more than calls when a step needed more experts than slots)
  int64_t demand_hits = 0, demand_misses = 0;  // the expert FFN's own residency checks (no prefetch)
  int64_t prefetched = 0;                      // experts loaded ahead of need
  // OnMiss::kRead: (layer, expert) pairs computed in place from the host tier, one per layer and step
  // that missed the expert, and their bytes (each read at least once over the bus).
  int64_t read_in_place = 0;
  uint64_t bytes_read_in_place = 0;
};

class OffloadingMoeExecutor final : public MoeExecutor {
 public:
  // weights: the model's routers and present masks (its experts may be absent: the store holds them).
  OffloadingMoeExecutor(const ModelConfig& config, const ModelWeights& weights, Backend& backend,
                        ExpertStore& store, OnMiss on_miss, Prefetch prefetch = Prefetch::kNone);
  void forward(int64_t layer, const Tensor& hidden, const Tensor& router_input, const Tensor& out,
               Workspace& workspace) override;
  // Wait and substitute read the routing back every layer; read does not, for steps of up to
  // kLoggedRows rows (its routing log's size).
  bool capturable() const override;
  // OnMiss::kRead: begin_step notes the step's rows; finish_step reads the step's routing back (one copy),
  // records every pick in the store's policy and admits the misses behind the next steps.
  void begin_step(int64_t max_rows_on_any_rank) override;
  void finish_step() override;
  static constexpr int64_t kLoggedRows = 64;

  OffloadStats stats() const;
  OnMiss on_miss() const { return on_miss_; }

 private:
  // Replaces, token by token in slot order, each pick of a non-resident expert by the most probable
  // resident routable expert the token has not chosen (when there is one), and recomputes the token's
  // weights from the router's probabilities as route_top_k would for the final choice. Returns the
  // experts that missed (to fetch after the layer), most wanted first.
  std::vector<int64_t> substitute_misses(int64_t layer, const MoeLayerWeights& moe, int64_t rows,
                                         int64_t top_k, const Tensor& logits, std::vector<int32_t>& ids,
                                         std::vector<float>& weights);

  const ModelConfig& config_;
  const ModelWeights& weights_;
  Backend& backend_;
  ExpertStore& store_;
  OnMiss on_miss_;
  Prefetch prefetch_;
  OwnedTensor prefetch_logits_;  // the next layer's router over this layer's rows
  // Loads the next MoE layer's likely experts after `layer`'s routing (Prefetch::kNextLayer).
  void prefetch_next_layer(int64_t layer, const Tensor& router_input);

  // OnMiss::kRead.
  void forward_in_place(int64_t layer, const Tensor& hidden, const Tensor& router_input, const Tensor& out,
                        Workspace& workspace);
  // One routing pick of the step: the policy's use, the hit or miss, the miss's weight.
  void note_pick(int64_t layer, int32_t expert, float weight);
  std::map<int64_t, int64_t> moe_index_;  // MoE layer -> its row of the routing log
  int64_t log_slots_ = 0;                 // picks a layer's log holds (kLoggedRows x the model's top-k)
  // I32 [2, MoE layers, log_slots_]: each layer's expert ids, then (as F32) their weights, written by the
  // step's routed_moe; never reallocated, so a captured step keeps writing where finish_step reads.
  OwnedTensor routing_log_;
  int64_t step_rows_ = -1;  // begin_step's rows; -1 outside a step
  int64_t read_step_ = 0;   // the store's step, counted by begin_step (forward is not called in a replay)
  // Picks of steps too large for the log (read back in forward), for finish_step.
  std::vector<std::tuple<int64_t, int32_t, float>> unlogged_picks_;
  StepDemand read_demand_;  // read mode: each step's picks against the store, its misses admitted behind it

  ResidentExpertFfn resident_ffn_;  // and the store's step for wait and substitute: one per forward pass
  OffloadStats stats_;
};

}  // namespace epic
