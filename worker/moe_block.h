// One MoE block as the steps the expert-parallel data plane splits apart, each a backend op:
// route (router linear + softmax top-k among present experts) -> group (stable permutation of the
// (token, slot) rows by expert) -> gather rows -> grouped expert FFN -> combine in fixed top-k
// order. An all-to-all can sit between grouping and the FFN (and between the FFN and combine)
// without changing results, because each row's FFN is computed alone and combined in slot order.
#pragma once

#include <cstdint>

#include "kernels/backend.h"
#include "worker/model_config.h"
#include "worker/model_weights.h"
#include "worker/workspace.h"

namespace epic {

// The routing of `rows` tokens: expert ids I32 [rows, k] and weights F32 [rows, k].
struct RoutedTokens {
  Tensor expert_ids;
  Tensor weights;
};

// router_input: F32 [rows, hidden] (see MoeExecutor::forward). Each row takes top_k experts among those
// `routable` (U8 [num_experts]: the layer's present mask, or a RoutingPolicy's narrower one).
// Backend::routed_moe's scratch for `rows` tokens of a layer with num_experts router rows, from the
// workspace's MoE slots.
RoutedMoeScratch routed_moe_scratch(const ModelConfig& config, int64_t num_experts, int64_t rows,
                                    int64_t top_k, ScalarType activation_type, Workspace& workspace);

// row_top_k: optional, each row's own k (Backend::route_top_k; MoeExecutor::step_row_top_k).
RoutedTokens route_tokens(Backend& backend, const ModelConfig& config, const MoeLayerWeights& layer,
                          const Tensor& routable, int64_t top_k, const Tensor& router_input,
                          Workspace& workspace, const Tensor& row_top_k);

// The rows of `expert_ids` (I32 [slots]) grouped by expert: offsets I32 [E + 1], the source row of
// each sorted row (slot / top_k) and where each slot went.
struct GroupedRows {
  Tensor expert_offsets;
  Tensor source_row;
  Tensor sorted_position;
};

GroupedRows group_rows(Backend& backend, const Tensor& expert_ids, int64_t num_experts, int64_t top_k,
                       Workspace& workspace);

// y [rows, H] = the hosted experts' SwiGLU FFN over x [rows, H] already grouped by `offsets`.
void run_experts(Backend& backend, const ModelConfig& config, const MoeLayerWeights& layer, const Tensor& x,
                 const Tensor& expert_offsets, const Tensor& y, Workspace& workspace);

// y[i] = the FFN of expert experts[i] (I32 [rows], hosted) over rows[i], each row alone: grouped by expert
// for one run_experts call, then back to row order. sorted and computed are scratch of rows' shape; y may
// be rows itself. Uses the workspace's grouping and intermediate slots (group_rows, run_experts).
void run_experts_in_row_order(Backend& backend, const ModelConfig& config, const MoeLayerWeights& layer,
                              const Tensor& rows, const Tensor& experts, const Tensor& sorted,
                              const Tensor& computed, const Tensor& y, Workspace& workspace);

}  // namespace epic
