// The expert FFN with the experts taken from an ExpertStore (worker/expert_store.h): rows grouped by
// expert, the experts made resident in groups that fit the layer's slots, one expert_ffn per group over
// that group's contiguous rows. Each row's FFN is computed alone, so the output is the one every expert
// loaded would give (bitwise on the CPU), whatever the budget. Used by the offloading executor (one
// process) and by the expert-parallel executor on the rows a worker receives.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/backend.h"
#include "worker/expert_store.h"
#include "worker/model_config.h"
#include "worker/workspace.h"

namespace epic {

class ResidentExpertFfn {
 public:
  ResidentExpertFfn(const ModelConfig& config, Backend& backend, ExpertStore& store);

  // expert_out rows = the FFN of each row of `sorted` ([rows, H], grouped by expert as `offsets`, the
  // host copy of group_by_expert's [E + 1] offsets); intermediate [rows, I] is scratch. Calls
  // ensure_resident for each group of experts and unpins at the end. Returns the groups run.
  int64_t run(int64_t layer, int64_t step, const Tensor& sorted, const std::vector<int32_t>& offsets,
              const Tensor& intermediate, const Tensor& expert_out);

  // As run_experts_in_row_order (moe_block.h) with the store's experts: y[i] = the FFN of expert experts[i]
  // (I32 [rows]) over rows[i]; sorted and computed are scratch of rows' shape; y may be rows itself.
  int64_t run_in_row_order(int64_t layer, int64_t step, const Tensor& rows, const Tensor& experts,
                           const Tensor& sorted, const Tensor& computed, const Tensor& y,
                           Workspace& workspace);

  // The store's step for a forward call on `layer`: one step per forward pass, a pass being a run of
  // calls with rising layers (a call on a layer at or below the previous call's starts the next pass).
  // Call once per layer call, before the store sees the step; returns step().
  int64_t begin_layer(int64_t layer);
  int64_t step() const { return step_; }

  // As run_in_row_order through the store's address table (ExpertStore::address_table, a host-tier store):
  // every expert computed where it is, resident or in host memory, with no residency change and no wait.
  void run_in_place(int64_t layer, const Tensor& rows, const Tensor& experts, const Tensor& sorted,
                    const Tensor& computed, const Tensor& y, Workspace& workspace);

  ExpertStore& store() { return store_; }
  // What the FFN's own ensure_resident calls found (prefetches not counted): its hit rate is the one
  // that decides the stalls.
  struct Demand {
    int64_t hits = 0, misses = 0;
    double stall_seconds = 0;
  };
  const Demand& demand() const { return demand_; }

 private:
  // What run_in_row_order and run_in_place share: the rows grouped by expert into `sorted`, then
  // group_ffn(grouped) (moe_block.h's GroupedRows; the part where they differ) computes the groups into
  // `computed`, then the outputs go back to row order in y. Nothing at all for no rows.
  template <typename GroupFfn>
  void in_row_order(int64_t layer, const Tensor& rows, const Tensor& experts, const Tensor& sorted,
                    const Tensor& computed, const Tensor& y, Workspace& workspace, const GroupFfn& group_ffn);

  const ModelConfig& config_;
  Backend& backend_;
  ExpertStore& store_;
  int64_t max_experts_ = 0;                 // the most router rows of any MoE layer
  std::vector<OwnedTensor> group_offsets_;  // per group of a step: its rows' offsets
  Demand demand_;
  int64_t step_ = 0;
  int64_t last_layer_ = -1;
};

}  // namespace epic
