// route -> group -> experts -> combine, each a backend op on workspace buffers (see moe_block.h).
#include "worker/moe_block.h"

#include "kernels/error.h"
#include "worker/moe_executor.h"

namespace epic {

RoutedTokens route_tokens(Backend& backend, const ModelConfig& config, const MoeLayerWeights& layer,
                          const Tensor& routable, int64_t top_k, const Tensor& router_input,
                          Workspace& workspace, const Tensor& row_top_k) {
  const int64_t rows = router_input.dim(0);
  // fp32 rows in, fp32 logits out, whatever the activation type: the softmax and top-k choice are
  // the most rounding-sensitive step of the block.
  const Tensor logits = workspace.get(kSlotRouterLogits, ScalarType::kF32, {rows, layer.num_experts});
  backend.linear(router_input, layer.router, logits);
  RoutedTokens routed{workspace.get(kSlotExpertIds, ScalarType::kI32, {rows, top_k}),
                      workspace.get(kSlotRouteWeights, ScalarType::kF32, {rows, top_k})};
  backend.route_top_k(logits, routable, routed.expert_ids, routed.weights, config.norm_topk_prob, row_top_k);
  return routed;
}

GroupedRows group_rows(Backend& backend, const Tensor& expert_ids, int64_t num_experts, int64_t top_k,
                       Workspace& workspace) {
  const int64_t slots = expert_ids.numel();
  GroupedRows grouped{workspace.get(kSlotExpertOffsets, ScalarType::kI32, {num_experts + 1}),
                      workspace.get(kSlotSourceRow, ScalarType::kI32, {slots}),
                      workspace.get(kSlotSortedPosition, ScalarType::kI32, {slots})};
  backend.group_by_expert(expert_ids.reshaped({slots}), num_experts, top_k, grouped.expert_offsets,
                          grouped.source_row, grouped.sorted_position);
  return grouped;
}

void run_experts(Backend& backend, const ModelConfig& config, const MoeLayerWeights& layer, const Tensor& x,
                 const Tensor& expert_offsets, const Tensor& y, Workspace& workspace) {
  const Tensor intermediate =
      workspace.get(kSlotExpertIntermediate, x.type, {x.dim(0), config.moe_intermediate_size});
  backend.expert_ffn(x, expert_offsets, layer.gate_up, layer.down, layer.local_index, intermediate, y);
}

void run_experts_in_row_order(Backend& backend, const ModelConfig& config, const MoeLayerWeights& layer,
                              const Tensor& rows, const Tensor& experts, const Tensor& sorted,
                              const Tensor& computed, const Tensor& y, Workspace& workspace) {
  const GroupedRows grouped = group_rows(backend, experts, layer.num_experts, 1, workspace);
  backend.gather_rows(rows, grouped.source_row, sorted);
  run_experts(backend, config, layer, sorted, grouped.expert_offsets, computed, workspace);
  backend.gather_rows(computed, grouped.sorted_position, y);
}

RoutedMoeScratch routed_moe_scratch(const ModelConfig& config, int64_t num_experts, int64_t rows,
                                    int64_t top_k, ScalarType activation_type, Workspace& workspace) {
  const int64_t slots = rows * top_k, hidden_size = config.hidden_size, inter = config.moe_intermediate_size;
  return RoutedMoeScratch{workspace.get(kSlotRouterLogits, ScalarType::kF32, {rows, num_experts}),
                          workspace.get(kSlotExpertIds, ScalarType::kI32, {rows, top_k}),
                          workspace.get(kSlotRouteWeights, ScalarType::kF32, {rows, top_k}),
                          workspace.get(kSlotExpertOffsets, ScalarType::kI32, {num_experts + 1}),
                          workspace.get(kSlotSourceRow, ScalarType::kI32, {slots}),
                          workspace.get(kSlotSortedPosition, ScalarType::kI32, {slots}),
                          workspace.get(kSlotSortedRows, activation_type, {slots, hidden_size}),
                          workspace.get(kSlotExpertIntermediate, activation_type, {slots, inter}),
                          workspace.get(kSlotExpertOut, activation_type, {slots, hidden_size})};
}

void LocalMoeExecutor::forward(int64_t layer, const Tensor& hidden, const Tensor& router_input,
                               const Tensor& out, Workspace& workspace) {
  const MoeLayerWeights& moe = weights_.layers[layer].moe;
  // One op, so a backend can fuse the block (Backend::routed_moe); the scratch is the unfused form's.
  const RoutedMoeScratch scratch = routed_moe_scratch(config_, moe.num_experts, hidden.dim(0),
                                                      routed_top_k(config_), hidden.type, workspace);
  backend_.routed_moe(
      router_input, hidden,
      RoutedMoeWeights{moe.router, routable_mask(layer, moe), moe.gate_up, moe.down, moe.local_index,
                       config_.norm_topk_prob, Tensor{}, ScalarType::kBF16, step_row_top_k()},
      scratch, out);
  count_routed(layer, scratch.expert_ids);  // written by the fused form too
}

}  // namespace epic
