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
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "worker/expert_store.h"
#include "worker/model_config.h"
#include "worker/model_weights.h"
#include "worker/moe_executor.h"
#include "worker/resident_expert_ffn.h"
#include "worker/workspace.h"

namespace epic {

// What a step does with a chosen expert that is not resident.
enum class OnMiss {
  kWait,        // copy it in before the expert FFN (the stall is counted)
  kSubstitute,  // route the slot to the most probable resident expert the token did not choose
};
// "wait" or "substitute"; anything else -> Error(kInvalidArgument) naming both.
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
  int64_t calls = 0;          // forward calls (layers x steps)
  int64_t picks = 0;          // (token, slot) routing picks
  int64_t substituted = 0;    // picks routed to a resident expert instead (kSubstitute)
  int64_t expert_groups = 0;  // expert FFN calls (more than calls when a step needed more experts than slots)
  int64_t demand_hits = 0, demand_misses = 0;  // the expert FFN's own residency checks (no prefetch)
  int64_t prefetched = 0;                      // experts loaded ahead of need
};

class OffloadingMoeExecutor final : public MoeExecutor {
 public:
  // weights: the model's routers and present masks (its experts may be absent: the store holds them).
  OffloadingMoeExecutor(const ModelConfig& config, const ModelWeights& weights, Backend& backend,
                        ExpertStore& store, OnMiss on_miss, Prefetch prefetch = Prefetch::kNone);
  void forward(int64_t layer, const Tensor& hidden, const Tensor& router_input, const Tensor& out,
               Workspace& workspace) override;
  bool capturable() const override { return false; }  // reads the routing back every layer

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
  ResidentExpertFfn resident_ffn_;  // and the store's step: one per forward pass
  OffloadStats stats_;
};

}  // namespace epic
