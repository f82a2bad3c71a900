// Backend::routed_moe's default: the MoE block as the six ops it is made of (kernels/backend.h).
#include "kernels/backend.h"
#include "kernels/backend_checks.h"
#include "kernels/error.h"

namespace epic {

void Backend::routed_moe(const Tensor& router_input, const Tensor& x, const RoutedMoeWeights& weights,
                         const RoutedMoeScratch& scratch, const Tensor& out) {
  backend_checks::check_routed_moe(memory_space(), router_input, x, weights, scratch, out);
  run_routed_moe_ops(router_input, x, weights, scratch, out);
}

void Backend::run_routed_moe_ops(const Tensor& router_input, const Tensor& x, const RoutedMoeWeights& weights,
                                 const RoutedMoeScratch& scratch, const Tensor& out) {
  const RoutedMoeScratch& s = scratch;
  const int64_t top_k = s.expert_ids.dim(1);
  linear(router_input, weights.router, s.logits);
  route_top_k(s.logits, weights.present, s.expert_ids, s.weights, weights.normalize, weights.row_top_k);
  group_by_expert(s.expert_ids.reshaped({s.expert_ids.numel()}), weights.router.dim(0), top_k,
                  s.expert_offsets, s.source_row, s.sorted_position);
  gather_rows(x, s.source_row, s.sorted_rows);
  if (!is_absent(weights.addresses)) {
    expert_ffn_addressed(s.sorted_rows, s.expert_offsets, weights.addresses, weights.addressed_weight_type,
                         s.intermediate, s.expert_out);
  } else {
    expert_ffn(s.sorted_rows, s.expert_offsets, weights.gate_up, weights.down, weights.local_index,
               s.intermediate, s.expert_out);
  }
  combine_top_k(s.expert_out, s.sorted_position, s.weights, out);
}

void Backend::expert_ffn_addressed(const Tensor&, const Tensor&, const Tensor&, ScalarType, const Tensor&,
                                   const Tensor&) {
  throw Error(ErrorCode::kUnsupported,
              "expert_ffn_addressed: the " + name() + " backend has no expert FFN over an address table");
}

void Backend::copy_from_host_scattered(const std::vector<HostCopy>& copies) {
  for (const HostCopy& copy : copies) copy_from_host(copy.dst, copy.dst_offset, copy.src, copy.bytes);
}

void Backend::enqueue_side_copies(const std::vector<HostCopy>& copies) {
  for (const HostCopy& copy : copies) copy_from_host(copy.dst, copy.dst_offset, copy.src, copy.bytes);
}

}  // namespace epic
