// MoE routing: one thread per token computes the fp32 softmax over the present experts and picks
// the top-k, with the same expressions and summation orders as the CPU reference.
#include <cmath>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_kernels.h"

namespace epic::cuda_kernels {
namespace {

constexpr int kRouteThreads = 128;

__global__ void route_top_k_kernel(const float* logits, const uint8_t* present, int32_t* expert_ids,
                                   float* weights, int64_t num_tokens, int64_t num_experts, int64_t top_k,
                                   bool normalize_top_k) {
  const int64_t token = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (token >= num_tokens) return;
  const float* row = logits + token * num_experts;
  float max_logit = -INFINITY;
  for (int64_t e = 0; e < num_experts; ++e) {
    if (present[e] != 0) max_logit = fmaxf(max_logit, row[e]);
  }
  float denominator = 0.0f;
  for (int64_t e = 0; e < num_experts; ++e) {
    if (present[e] != 0) denominator += expf(row[e] - max_logit);
  }

  // Selection k times over the experts: the j-th pick is the best expert that comes after the
  // (j-1)-th in the order (probability descending, id ascending); no per-thread "taken" mask.
  int32_t* ids_row = expert_ids + token * top_k;
  float* weights_row = weights + token * top_k;
  float previous_probability = INFINITY;
  int64_t previous_id = -1;
  float selected_sum = 0.0f;
  for (int64_t j = 0; j < top_k; ++j) {
    int64_t best_id = -1;
    float best_probability = 0.0f;
    for (int64_t e = 0; e < num_experts; ++e) {
      if (present[e] == 0) continue;
      const float probability = expf(row[e] - max_logit) / denominator;
      const bool after_previous =
          probability < previous_probability || (probability == previous_probability && e > previous_id);
      if (!after_previous) continue;
      if (best_id < 0 || probability > best_probability) {  // strict: on a tie the lower id stays
        best_id = e;
        best_probability = probability;
      }
    }
    ids_row[j] = static_cast<int32_t>(best_id);
    weights_row[j] = best_probability;
    selected_sum += best_probability;
    previous_probability = best_probability;
    previous_id = best_id;
  }
  if (normalize_top_k) {
    for (int64_t j = 0; j < top_k; ++j) weights_row[j] /= selected_sum;
  }
}

}  // namespace

void route_top_k(const float* logits, const uint8_t* present, int32_t* expert_ids, float* weights,
                 int64_t num_tokens, int64_t num_experts, int64_t top_k, bool normalize_top_k,
                 cudaStream_t stream) {
  const auto num_blocks = static_cast<unsigned>((num_tokens + kRouteThreads - 1) / kRouteThreads);
  route_top_k_kernel<<<num_blocks, kRouteThreads, 0, stream>>>(
      logits, present, expert_ids, weights, num_tokens, num_experts, top_k, normalize_top_k);
  EPIC_CUDA_CHECK_LAUNCH();
}

}  // namespace epic::cuda_kernels
