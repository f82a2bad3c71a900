// The Backend's composed ops: defaults that run the primitive ops in order, for backends that do
// not fuse them.
#include "kernels/backend.h"

namespace epic {

void Backend::route_and_group(const Tensor& router_input, const Tensor& router, const Tensor& present,
                              bool normalize, const Tensor& logits, const Tensor& expert_ids,
                              const Tensor& weights, const Tensor& expert_offsets, const Tensor& source_row,
                              const Tensor& sorted_position) {
  linear(router_input, router, logits);
  // route_top_k has checked that expert_ids is [tokens, k] and logits [tokens, E].
  route_top_k(logits, present, expert_ids, weights, normalize);
  group_by_expert(expert_ids.reshaped({expert_ids.numel()}), logits.dim(1), expert_ids.dim(1), expert_offsets,
                  source_row, sorted_position);
}

}  // namespace epic
