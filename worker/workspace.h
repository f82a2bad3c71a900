// The work buffers of a forward pass: one slot per purpose (the residual stream, the MoE's sorted
// rows, ...), each a backend buffer reused from step to step and grown when a step needs more.
// A captured graph bakes in buffer addresses, so every growth bumps generation(): graphs made
// before are stale and must be captured again.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <vector>

#include "kernels/backend.h"

namespace epic {

// Slots of the model runner and of the MoE executors (disjoint ranges).
enum WorkspaceSlot : int {
  kSlotResidual,
  kSlotNormed,
  kSlotNormedF32,
  kSlotQkv,
  kSlotAttention,
  kSlotBlockOut,
  kSlotDenseGateUp,
  kSlotDenseIntermediate,
  kSlotSelected,
  kSlotSelectedNormed,
  kSlotLogits,
  kSlotNextIds,
  kSlotStepTables,
  kSlotRouterLogits,
  kSlotExpertIds,
  kSlotRouteWeights,
  kSlotExpertOffsets,
  kSlotSourceRow,
  kSlotSortedPosition,
  kSlotSortedRows,
  kSlotExpertIntermediate,
  kSlotExpertOut,
  kSlotReceivedRows,
  kSlotReceivedExperts,
  kSlotReceivedUseWeights,  // an expert store's log under the NCCL exchange: the slots' weights, sorted
  kNumWorkspaceSlots,
};

class Workspace {
 public:
  // Slots [0, num_slots): the WorkspaceSlot values below by default; an owner with its own numbering
  // (an executor's buffers) passes its count.
  explicit Workspace(Backend& backend, int num_slots = kNumWorkspaceSlots)
      : backend_(backend), num_slots_(num_slots) {}

  // A view of slot `slot`'s memory as `type[shape]`. One slot serves one purpose: a view stays
  // valid until the same slot is asked for more bytes than it holds.
  Tensor get(int slot, ScalarType type, std::initializer_list<int64_t> shape);

  uint64_t generation() const { return generation_; }
  size_t bytes() const;  // held by every slot

 private:
  Backend& backend_;
  int num_slots_;
  std::vector<std::unique_ptr<Buffer>> buffers_;
  uint64_t generation_ = 0;
};

}  // namespace epic
