// Where a grouped expert kernel finds an expert's weights: in the layer's stack of hosted experts at
// the expert's slot (local_index), or, for Backend::expert_ffn_addressed, at the addresses an expert
// store's table holds for it (I64 [E, 2]: gate_up, down; 0 when not hosted). With a table the "slot"
// a kernel carries is the expert id itself.
#pragma once

#include <cstdint>

namespace epic::cuda_kernels {

// The column of the address table a phase reads.
constexpr int kGateUpAddress = 0;
constexpr int kDownAddress = 1;

// The slot of `expert`: local_index's entry, or with a table the expert id when it has an address;
// -1 when the expert is not hosted.
__device__ __forceinline__ int32_t expert_slot(const int32_t* local_index, const int64_t* addresses,
                                               int64_t expert) {
  if (local_index != nullptr) return local_index[expert];
  return addresses[2 * expert] != 0 ? static_cast<int32_t>(expert) : -1;
}

// The first weight of slot `slot` (from expert_slot): stack + slot * elements_per_expert, or the
// table's address of column `column`.
template <typename Weight>
__device__ __forceinline__ const Weight* expert_weights_of(const Weight* stack, const int64_t* addresses,
                                                           int column, int64_t slot,
                                                           int64_t elements_per_expert) {
  if (addresses != nullptr) return reinterpret_cast<const Weight*>(addresses[2 * slot + column]);
  return stack + slot * elements_per_expert;
}

}  // namespace epic::cuda_kernels
