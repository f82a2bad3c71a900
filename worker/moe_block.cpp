// route -> group -> experts -> combine, each a backend op on workspace buffers (see moe_block.h).
#include "worker/moe_block.h"

#include "kernels/error.h"
#include "worker/moe_executor.h"

namespace epic {

RoutedTokens route_tokens(Backend& backend, const ModelConfig& config, const MoeLayerWeights& layer,
                          const Tensor& router_input, Workspace& workspace) {
  const int64_t rows = router_input.dim(0), top_k = config.num_experts_per_tok;
  // fp32 rows in, fp32 logits out, whatever the activation type: the softmax and top-k choice are
  // the most rounding-sensitive step of the block.
  const Tensor logits = workspace.get(kSlotRouterLogits, ScalarType::kF32, {rows, layer.num_experts});
  backend.linear(router_input, layer.router, logits);
  RoutedTokens routed{workspace.get(kSlotExpertIds, ScalarType::kI32, {rows, top_k}),
                      workspace.get(kSlotRouteWeights, ScalarType::kF32, {rows, top_k})};
  backend.route_top_k(logits, layer.present_mask, routed.expert_ids, routed.weights, config.norm_topk_prob);
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

void LocalMoeExecutor::forward(int64_t layer, const Tensor& hidden, const Tensor& router_input, const Tensor& out,
                               Workspace& workspace) {
  const MoeLayerWeights& moe = weights_.layers[layer].moe;
  const int64_t rows = hidden.dim(0), top_k = config_.num_experts_per_tok, slots = rows * top_k;
  const RoutedTokens routed = route_tokens(backend_, config_, moe, router_input, workspace);
  const GroupedRows grouped = group_rows(backend_, routed.expert_ids, moe.num_experts, top_k, workspace);
  const Tensor sorted_rows = workspace.get(kSlotSortedRows, hidden.type, {slots, config_.hidden_size});
  backend_.gather_rows(hidden, grouped.source_row, sorted_rows);
  const Tensor expert_out = workspace.get(kSlotExpertOut, hidden.type, {slots, config_.hidden_size});
  run_experts(backend_, config_, moe, sorted_rows, grouped.expert_offsets, expert_out, workspace);
  backend_.combine_top_k(expert_out, grouped.sorted_position, routed.weights, out);
}

}  // namespace epic
