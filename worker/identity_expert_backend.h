// The identity-expert check of the MoE data plane (the idea of nccl_ep's tests): with every expert
// FFN replaced by y = x, a MoE block computes out[t] = sum_j w[t, j] * x[t] whatever the placement,
// the replicas or the number of workers, so dispatch (every row reaches an expert and comes back
// to its own token) and combine are checked exactly against a host computation, with no expert
// weights involved.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "worker/forwarding_backend.h"

namespace epic {

class IdentityExpertBackend final : public ForwardingBackend {
 public:
  using ForwardingBackend::ForwardingBackend;

  // y = x, the shapes checked as the real op checks them (local_index may say nothing is hosted).
  void expert_ffn(const Tensor& x, const Tensor& expert_offsets, const Tensor& gate_up, const Tensor& down,
                  const Tensor& local_index, const Tensor& intermediate, const Tensor& y) override;
  // Forwards, then keeps the routing on the host: the weights the expected output is made of.
  void route_top_k(const Tensor& logits, const Tensor& present, const Tensor& expert_ids,
                   const Tensor& weights, bool normalize, const Tensor& row_top_k) override;

  // The routing of the last route_top_k call: [tokens * top_k], slot s = token * top_k + j.
  const std::vector<int32_t>& routed_expert_ids() const { return routed_expert_ids_; }
  const std::vector<float>& routed_weights() const { return routed_weights_; }
  int64_t identity_rows() const { return identity_rows_; }  // rows expert_ffn copied, over all calls

 private:
  std::vector<int32_t> routed_expert_ids_;
  std::vector<float> routed_weights_;
  int64_t identity_rows_ = 0;
};

// What a MoE block with identity experts must output: out[t, :] = sum over j = 0 .. top_k-1 of
// weights[t * top_k + j] * x[t, :], in fp32 with every product and sum rounded on its own, j
// ascending from 0.0f (combine_top_k's arithmetic), then rounded to out_type (F32 or BF16; the
// result is given widened to float). x [tokens, hidden] holds the rows as the block saw them.
std::vector<float> identity_moe_output(std::span<const float> x, std::span<const float> weights,
                                       int64_t top_k, int64_t hidden, ScalarType out_type);

// The values of an F32 or BF16 tensor on the host, widened to float (exactly).
std::vector<float> read_as_f32(Backend& backend, const Tensor& tensor);

// The elements of `actual` whose bits differ from `expected` (rows of `row_elements`), and the
// first one described ("token 3 element 17: got 0.25 (0x3e800000), expected ...") in *first.
int64_t count_bitwise_mismatches(std::span<const float> actual, std::span<const float> expected,
                                 int64_t row_elements, std::string* first);

}  // namespace epic
