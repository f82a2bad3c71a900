// The fused few-token form of Backend::routed_moe on the GPU (routed_moe_fused.cu): router product,
// then gate_up and then down + combine, each block routing its token itself. bf16 activations and
// expert weights; the router's weights f32 or bf16, its input f32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/tensor.h"

namespace epic::cuda_kernels {

// The fused kernels read an expert's weights once per slot routed to it, and their down launch has
// one block per 16 rows of H and token: at one token they win (one MoE layer of Qwen3-30B-A3B on an
// H200: 0.048 -> 0.035 ms), at four they lose (0.095 -> 0.117 ms) to the grouped path, which
// reads each distinct expert once (BENCHMARKS.md).
constexpr int64_t kRoutedMoeFusedMaxTokens = 1;
constexpr int64_t kRoutedMoeFusedMaxExperts = 256;  // 8 per lane of the routing warp
constexpr int64_t kRoutedMoeFusedMaxTopK = 16;

struct RoutedMoeFusedArgs {
  const float* router_input = nullptr;     // [tokens, hidden]
  const __nv_bfloat16* router = nullptr;   // [num_experts, hidden]
  const uint8_t* present = nullptr;        // [num_experts]
  const __nv_bfloat16* x = nullptr;        // [tokens, hidden]
  const __nv_bfloat16* gate_up = nullptr;  // [hosted, 2 * inter, hidden]
  const __nv_bfloat16* down = nullptr;     // [hosted, hidden, inter]
  const int32_t* local_index = nullptr;    // [num_experts]
  // Or an address table I64 [num_experts, 2] (Backend::expert_ffn_addressed) in place of gate_up, down
  // and local_index (null); its addresses must be 16-byte aligned.
  const int64_t* addresses = nullptr;
  float* logits = nullptr;                 // [tokens, num_experts]
  int32_t* expert_ids = nullptr;           // [tokens, top_k]
  float* weights = nullptr;                // [tokens, top_k]
  __nv_bfloat16* intermediate = nullptr;   // [tokens * top_k, inter]
  void* out = nullptr;                     // [tokens, hidden] of out_type
  ScalarType out_type = ScalarType::kBF16;
  int64_t tokens = 0, hidden = 0, inter = 0, num_experts = 0, top_k = 0;
  bool normalize = true;
};

// Whether routed_moe_fused takes this call: kRoutedMoeFusedMaxTokens token(s) at most, up to
// kRoutedMoeFusedMaxExperts experts, top_k up to kRoutedMoeFusedMaxTopK, hidden and inter multiples
// of 8, 16-byte aligned router, router_input, x, gate_up, down and intermediate.
bool routed_moe_fused_supported(const RoutedMoeFusedArgs& args);
void routed_moe_fused(const RoutedMoeFusedArgs& args, cudaStream_t stream);

}  // namespace epic::cuda_kernels
