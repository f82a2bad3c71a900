// DeviceExpertParallelMoeExecutor with an expert store (device_expert_parallel_moe.h, set_expert_store):
// the received groups computed through the store's address table, their picks and routing weights per
// expert logged on the device (capturable: two kernels on the stream), and the step's uses and misses
// handed to the store after it.
#include <algorithm>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/ep_dispatch_kernels.h"
#include "kernels/error.h"
#include "worker/device_expert_parallel_moe.h"

namespace epic {

void DeviceExpertParallelMoeExecutor::set_expert_store(ExpertStore* store) {
  EPIC_CHECK(store == nullptr || store->reads_in_place(), ErrorCode::kInvalidArgument,
             "the NCCL exchange computes a missing expert in place from host memory: with --expert-budget it "
             "needs --on-miss read and --expert-tier host (or use --ep-transport host)");
  EPIC_CHECK(store == nullptr || !options_.overlap, ErrorCode::kInvalidArgument,
             "--ep-overlap with --expert-budget is not supported yet (each layer's two micro-batches would "
             "share one row of the expert log): leave out --ep-overlap");
  store_ = store;
  store_log_row_.clear();
  store_uses_log_ = OwnedTensor{};
  store_weight_log_ = OwnedTensor{};
  if (store_ == nullptr) return;
  int64_t most_experts = 0;
  for (int64_t layer = 0; layer < config_.num_hidden_layers; ++layer) {
    if (!weights_.layers[layer].is_moe) continue;
    const int64_t row = static_cast<int64_t>(store_log_row_.size());
    store_log_row_[layer] = row;
    most_experts = std::max(most_experts, weights_.layers[layer].moe.num_experts);
  }
  store_log_stride_ = most_experts;
  const int64_t entries = static_cast<int64_t>(store_log_row_.size()) * store_log_stride_;
  if (entries == 0) return;
  store_uses_log_ = backend_.new_tensor(ScalarType::kI32, {entries});
  store_weight_log_ = backend_.new_tensor(ScalarType::kF32, {entries});
  // Zero rows until each layer logs its first step (no picks received).
  EPIC_CUDA_CHECK(cudaMemsetAsync(store_uses_log_.view().data, 0, store_uses_log_.view().bytes(), stream_));
  EPIC_CUDA_CHECK(
      cudaMemsetAsync(store_weight_log_.view().data, 0, store_weight_log_.view().bytes(), stream_));
}

void DeviceExpertParallelMoeExecutor::run_received_experts(int64_t layer, const Tensor& rows,
                                                           const Tensor& offsets, const Tensor& out,
                                                           const ReceivedSlots& slots, Workspace& workspace) {
  const MoeLayerWeights& moe = weights_.layers[layer].moe;
  if (store_ == nullptr) {
    run_experts(backend_, config_, moe, rows, offsets, out, workspace);
    return;
  }
  const int64_t log_offset = store_log_row_.at(layer) * store_log_stride_;
  const int64_t num_slots = slots.expert_ids.numel();
  const Tensor sorted_weights =
      workspace.get(kSlotReceivedUseWeights, ScalarType::kF32, {std::max<int64_t>(1, num_slots)});
  ep_kernels::expert_use_sums(slots.expert_ids.as<int32_t>(), slots.weights.as<float>(),
                              slots.sorted_position.as<int32_t>(), offsets.as<int32_t>(), num_slots,
                              moe.num_experts, sorted_weights.as<float>(),
                              static_cast<int32_t*>(store_uses_log_.view().data) + log_offset,
                              static_cast<float*>(store_weight_log_.view().data) + log_offset, stream_);
  const Tensor intermediate =
      workspace.get(kSlotExpertIntermediate, rows.type, {rows.dim(0), config_.moe_intermediate_size});
  backend_.expert_ffn_addressed(rows, offsets, store_->address_table(layer), store_->weight_type(),
                                intermediate, out);
}

void DeviceExpertParallelMoeExecutor::log_no_rows(int64_t layer) {
  if (store_ == nullptr) return;
  const int64_t log_offset = store_log_row_.at(layer) * store_log_stride_;
  const size_t bytes = static_cast<size_t>(store_log_stride_) * sizeof(int32_t);
  EPIC_CUDA_CHECK(
      cudaMemsetAsync(static_cast<int32_t*>(store_uses_log_.view().data) + log_offset, 0, bytes, stream_));
  EPIC_CUDA_CHECK(
      cudaMemsetAsync(static_cast<float*>(store_weight_log_.view().data) + log_offset, 0, bytes, stream_));
}

void DeviceExpertParallelMoeExecutor::admit_step_misses() {
  if (store_ == nullptr || store_uses_log_.empty()) return;
  ++store_step_;
  // Every MoE layer logged this step's picks (replayed from a graph or not): one copy back of each log.
  std::vector<int32_t> uses(static_cast<size_t>(store_uses_log_.view().numel()));
  std::vector<float> weight_sums(uses.size());
  backend_.copy_to_host(store_uses_log_.view(), 0, uses.data(), uses.size() * sizeof(int32_t));
  backend_.copy_to_host(store_weight_log_.view(), 0, weight_sums.data(), weight_sums.size() * sizeof(float));
  for (const auto& [layer, row] : store_log_row_) {
    const int64_t num_experts = weights_.layers[layer].moe.num_experts;
    for (int64_t expert = 0; expert < num_experts; ++expert) {
      const int64_t picks = uses[row * store_log_stride_ + expert];
      if (picks > 0)
        demand_.note(*store_, layer, expert, picks, weight_sums[row * store_log_stride_ + expert],
                     store_step_);
    }
  }
  demand_.admit_misses(*store_, store_step_);
}

}  // namespace epic
