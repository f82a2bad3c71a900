// One MoE block written as the four steps the expert-parallel data plane splits apart:
// route -> group rows by expert -> expert FFN -> combine in fixed top-k order. An all-to-all can
// sit between grouping and the FFN (and between the FFN and combine) without changing results,
// because each (token, slot) output is computed alone and combined in slot order.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/backend.h"
#include "worker/model_weights.h"

namespace epic {

struct Routing {
  int64_t num_tokens = 0;
  int64_t top_k = 0;
  std::vector<int32_t> expert_ids;  // [num_tokens, top_k], descending probability
  std::vector<float> weights;       // [num_tokens, top_k]
};

// Rows grouped by expert, experts ascending; rows of one expert in (token, slot) order.
struct ExpertGroups {
  std::vector<int64_t> expert_ids;  // the experts that received rows
  std::vector<int64_t> offsets;     // group g is slots[offsets[g] .. offsets[g+1])
  std::vector<int64_t> slots;       // token * top_k + j
};

Routing route_tokens(Backend& backend, const MoeLayerWeights& layer, const float* hidden, int64_t num_tokens,
                     int64_t hidden_size, int64_t top_k, bool normalize_top_k);

ExpertGroups group_rows_by_expert(const Routing& routing);

// slot_outputs[slot, :] = down(silu(gate(x)) * up(x)) for x = hidden[slot / top_k] and the slot's
// expert, for every slot in groups. slot_outputs must hold num_tokens * top_k * hidden_size floats.
void run_expert_ffn(Backend& backend, const MoeLayerWeights& layer, const ExpertGroups& groups,
                    const float* hidden, int64_t hidden_size, int64_t intermediate_size, int64_t top_k,
                    float* slot_outputs);

// out[t, :] = sum over j = 0 .. top_k-1 (in that order) of weights[t, j] * slot_outputs[t * top_k + j, :]
void combine_top_k(const Routing& routing, const float* slot_outputs, int64_t hidden_size, float* out);

// The whole block on one process: out[num_tokens, hidden] (overwritten).
void moe_block_forward(Backend& backend, const MoeLayerWeights& layer, const float* hidden,
                       int64_t num_tokens, int64_t hidden_size, int64_t intermediate_size, int64_t top_k,
                       bool normalize_top_k, float* out);

// SwiGLU FFN on contiguous rows: out[rows, hidden] = down(silu(gate x) * up x).
void swiglu_ffn(Backend& backend, const float* x, const float* gate, const float* up, const float* down,
                int64_t rows, int64_t hidden_size, int64_t intermediate_size, float* out);

}  // namespace epic
