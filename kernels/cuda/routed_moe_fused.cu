// The routed MoE block for a few bf16 tokens (Backend::routed_moe) in three launches instead of
// seven: router product -> gate_up (each block routes its token itself) -> down and combine (each
// block routes again and sums its token's slots). Decode at batch 1 is a chain of dependent kernels,
// each costing a few us of latency whatever its size (BENCHMARKS.md): route_top_k, group_by_expert,
// gather_rows and combine_top_k are four links of that chain that move almost no bytes. Here:
// - router_logits_kernel: a warp per expert; its weights are loaded before the programmatic wait,
//   so they stream while the norm before it runs.
// - routed_gate_up_kernel: grid (column tiles, slots). Each block routes its token in warp 0
//   (route_in_warp.cuh: the route_top_k kernel's code, so the same ids and weights) from the
//   logits, then streams its slot's expert rows like the streaming expert FFN (streaming_mma.cuh)
//   over the token's own x row: no grouping, no gathered copy. silu(gate) * up goes to the
//   intermediate row of the slot, rounded to bf16 as expert_ffn rounds it.
// - routed_down_combine_kernel: grid (16-row tiles of H, tokens). Each block routes its token
//   again before its programmatic wait (the logits are complete: gate_up waited for them before it
//   let this grid start), puts its down-weight loads in flight, then waits for the intermediate and
//   stages the token's rows in shared memory. Its warps cover (slot, K half) items; each slot's rows
//   are rounded to bf16 (as expert_ffn's y) and summed with the routing weights in slot order (as
//   combine_top_k).
// Weights are read once per slot, not once per distinct expert, so this pays only while tokens are
// few (kRoutedMoeFusedMaxTokens). The kernels index tokens generally (grid.y, router rows).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <string>
#include <type_traits>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/expert_address.cuh"
#include "kernels/cuda/route_in_warp.cuh"
#include "kernels/cuda/routed_moe_fused.h"
#include "kernels/cuda/scalar_access.cuh"
#include "kernels/cuda/streaming_mma.cuh"

namespace epic::cuda_kernels {
namespace {

using bf16 = __nv_bfloat16;
using namespace streaming_mma;

// ---- router logits ------------------------------------------------------------------------------

constexpr int kRouterWarps = 4;
// K stretches of 32 lanes x 8 values whose weights are loaded before the first use: 8 cover H 2048.
constexpr int kRouterPreload = 8;

// 8 bf16 weights at w (16-byte aligned), widened to fp32; read once, so kept out of L1.
__device__ __forceinline__ void load_router_weights(const bf16* w, float (&values)[8]) {
  const uint4 bits = streaming_mma::load_weights(w);
  const uint32_t words[4] = {bits.x, bits.y, bits.z, bits.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    values[2 * i] = __uint_as_float(words[i] << 16);
    values[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}

// logits[t, e] = router_input[t, :] . router[e, :] in fp32, a warp per expert e (all tokens).
__global__ void __launch_bounds__(kRouterWarps * 32)
    router_logits_kernel(const float* router_input, const bf16* router, float* logits, int tokens,
                         int64_t hidden, int64_t num_experts) {
  const int lane = threadIdx.x % 32;
  const int64_t expert = static_cast<int64_t>(blockIdx.x) * kRouterWarps + threadIdx.x / 32;
  const bool active = expert < num_experts;
  const bf16* row = router + (active ? expert : 0) * hidden;
  constexpr int64_t kStretch = 32 * 8;
  float acc[kRoutedMoeFusedMaxTokens] = {};
  bool waited = false;
  for (int64_t base = 0; base < hidden; base += kRouterPreload * kStretch) {
    float w[kRouterPreload][8];
#pragma unroll
    for (int p = 0; p < kRouterPreload; ++p) {
      const int64_t k = base + p * kStretch + lane * 8;
      if (active && k < hidden) {
        load_router_weights(row + k, w[p]);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) w[p][i] = 0.0f;
      }
    }
    if (!waited) {  // the weights are in flight; now the norm's output may be read
      dependent::wait_for_previous();
      dependent::release_next();
      waited = true;
    }
#pragma unroll
    for (int t = 0; t < kRoutedMoeFusedMaxTokens; ++t) {
      if (t >= tokens) break;
#pragma unroll
      for (int p = 0; p < kRouterPreload; ++p) {
        const int64_t k = base + p * kStretch + lane * 8;
        if (k >= hidden) continue;
        float x[8];
        access::load_vector<8>(router_input + t * hidden + k, x);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[t] = fmaf(x[i], w[p][i], acc[t]);
      }
    }
  }
  if (!waited) {
    dependent::wait_for_previous();
    dependent::release_next();
  }
#pragma unroll
  for (int t = 0; t < kRoutedMoeFusedMaxTokens; ++t) {
    if (t >= tokens) break;
    const float sum = access::warp_sum(acc[t]);
    if (active && lane == 0) logits[t * num_experts + expert] = sum;
  }
}

// ---- routing inside a block ---------------------------------------------------------------------

constexpr int kMaxTopK = kRoutedMoeFusedMaxTopK;

struct BlockRouting {
  int32_t expert[kMaxTopK];
  int32_t local[kMaxTopK];  // the slot in the weight stack; -1: not hosted (a broken contract)
  float weight[kMaxTopK];
};

// Warp 0 routes `token` from its logits (complete before this grid started, possibly while other
// grids ran: read through L2) into `routing`; the block then syncs. The local indices of a lane's
// experts are loaded with the logits (one round trip for both), and each choice's is fetched from
// the lane that holds it.
template <int kExpertsPerLane>
__device__ void route_token_in_block(const RoutedMoeFusedArgs& args, int64_t token, BlockRouting& routing) {
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int32_t local[kExpertsPerLane];
#pragma unroll
    for (int c = 0; c < kExpertsPerLane; ++c) {
      const int64_t expert = lane + c * 32;
      local[c] = expert < args.num_experts ? expert_slot(args.local_index, args.addresses, expert) : -1;
    }
    const float* row = args.logits + token * args.num_experts;
    const Choice mine =
        route_in_warp<kExpertsPerLane>([row](int64_t e) { return __ldcg(row + e); }, args.present,
                                       args.num_experts, args.top_k, args.normalize, args.top_k);
    const int owner = mine.expert >= 0 ? mine.expert % 32 : 0;
    int32_t my_local = -1;
#pragma unroll
    for (int c = 0; c < kExpertsPerLane; ++c) {
      const int32_t held = __shfl_sync(access::kFullWarpMask, local[c], owner);
      if (mine.expert >= 0 && mine.expert / 32 == c) my_local = held;
    }
    if (lane < args.top_k) {
      routing.expert[lane] = mine.expert;
      routing.local[lane] = my_local;
      routing.weight[lane] = mine.probability;
    }
  }
  __syncthreads();
}

// ---- gate_up ------------------------------------------------------------------------------------

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kColumnWarps = 2;  // 8 gate + 8 up rows each: a block covers 16 intermediate columns
constexpr int kSplitK = kWarps / kColumnWarps;
constexpr int kUnroll = 4;  // K chunks whose weights are loaded before the first is used

template <int kExpertsPerLane>
__global__ void __launch_bounds__(kThreads, 3) routed_gate_up_kernel(const RoutedMoeFusedArgs args) {
  __shared__ BlockRouting routing;
  __shared__ float partials[kColumnWarps][kSplitK - 1][4][32];
  dependent::wait_for_previous();  // the logits
  dependent::release_next();
  const int64_t slot = blockIdx.y;
  const int64_t token = slot / args.top_k;
  const int choice = static_cast<int>(slot % args.top_k);
  route_token_in_block<kExpertsPerLane>(args, token, routing);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    args.expert_ids[slot] = routing.expert[choice];
    args.weights[slot] = routing.weight[choice];
  }

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int column_warp = warp % kColumnWarps;
  const int split = warp / kColumnWarps;
  const int group = lane / 4;
  const int quad = lane % 4;
  const int64_t j = (static_cast<int64_t>(blockIdx.x) * kColumnWarps + column_warp) * (kMmaRows / 2) + group;
  const bool valid = j < args.inter;
  const int32_t local = routing.local[choice];
  bf16* out_row = args.intermediate + slot * args.inter;
  if (local < 0) {
    // Routed to an expert not hosted here: the caller broke the contract; make it visible.
    if (split == 0 && quad == 0 && valid) out_row[j] = __float2bfloat16_rn(NAN);
    return;
  }
  const int64_t hidden = args.hidden;
  const bf16* expert_weights =
      expert_weights_of(args.gate_up, args.addresses, kGateUpAddress, local, 2 * args.inter * hidden);
  const bf16* weights_lo = expert_weights + (valid ? j : 0) * hidden + quad * kVectorElements;  // gate row j
  const bf16* weights_hi = weights_lo + args.inter * hidden;  // up row I + j
  // Only mma column 0 is a real token: the other groups' activation operands are zero.
  const bf16* x_row = args.x + token * hidden + quad * kVectorElements;

  const int64_t k_chunks = (hidden + kChunkK - 1) / kChunkK;
  const int64_t chunks_per_split = (k_chunks + kSplitK - 1) / kSplitK;
  const int64_t chunk_begin = split * chunks_per_split;
  const int64_t chunk_end = min(k_chunks, chunk_begin + chunks_per_split);
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t c0 = chunk_begin; c0 < chunk_end; c0 += kUnroll) {
    uint4 lo[kUnroll], hi[kUnroll], act[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t offset = (c0 + u) * kChunkK;
      const bool k_valid = c0 + u < chunk_end && offset + quad * kVectorElements < hidden;
      lo[u] = k_valid && valid ? load_weights(weights_lo + offset) : zero;
      hi[u] = k_valid && valid ? load_weights(weights_hi + offset) : zero;
      act[u] = k_valid && group == 0 ? load_activations<false>(x_row + offset) : zero;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) mma_chunk(acc, lo[u], hi[u], act[u]);
  }
  // Split-K partials summed in a fixed order: ((split 0 + split 1) + split 2) + split 3.
  if (split > 0) {
#pragma unroll
    for (int r = 0; r < 4; ++r) partials[column_warp][split - 1][r][lane] = acc[r];
  }
  __syncthreads();
  if (split != 0) return;
#pragma unroll
  for (int s = 0; s < kSplitK - 1; ++s) {
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[r] += partials[column_warp][s][r][lane];
  }
  // acc[0]: gate row j for token column 2 * quad; acc[2]: up row j, same column. Column 0 is ours.
  if (quad == 0 && valid) out_row[j] = __float2bfloat16_rn(access::silu(acc[0]) * acc[2]);
}

// ---- down + combine -----------------------------------------------------------------------------

constexpr int kDownWarps = 16;
constexpr int kDownThreads = kDownWarps * 32;
constexpr int kDownSplitK = 2;
// K chunks of an item loaded at once: 12 cover half of I 768, so at Qwen3-30B-A3B's shapes every
// weight byte of a block is in flight before it waits for gate_up (16 warps x 12 KB an SM).
constexpr int kDownUnroll = 12;
constexpr size_t kDownMaxSharedBytes = 160 * 1024;  // of the 227 KiB an H100/H200 block may have

// Dynamic shared memory of the down launch: the token's top_k intermediate rows.
size_t down_shared_bytes(const RoutedMoeFusedArgs& args) {
  return static_cast<size_t>(args.top_k * args.inter) * sizeof(bf16);
}

template <int kExpertsPerLane, class TOut>
__global__ void __launch_bounds__(kDownThreads, 1) routed_down_combine_kernel(const RoutedMoeFusedArgs args) {
  __shared__ BlockRouting routing;
  __shared__ float partials[kMaxTopK][kDownSplitK][kMmaRows];
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  bf16* token_rows = reinterpret_cast<bf16*>(shared_bytes);  // [top_k, inter], after the wait
  const int64_t token = blockIdx.y;
  // Before the wait: gate_up waited for the router before it let this grid start, so the logits are
  // complete (and the local indices were written at load).
  route_token_in_block<kExpertsPerLane>(args, token, routing);

  // 32-bit indices within one expert's matrix (H * I < 2^31, checked on the host): registers are
  // what bounds the loads in flight here.
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = lane / 4;
  const int quad = lane % 4;
  const int inter = static_cast<int>(args.inter);
  const int row_lo = static_cast<int>(blockIdx.x) * kMmaRows + group;  // output rows of H
  const int row_hi = row_lo + kMmaRows / 2;
  const bool lo_valid = row_lo < args.hidden;
  const bool hi_valid = row_hi < args.hidden;
  const int k_chunks = (inter + kChunkK - 1) / kChunkK;
  const int chunks_per_split = (k_chunks + kDownSplitK - 1) / kDownSplitK;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  bool waited = false;
  // After the wait, once per block: the token's intermediate rows (contiguous: slots t * k + j).
  const auto wait_and_stage_rows = [&] {
    dependent::wait_for_previous();
    dependent::release_next();
    const auto* source = reinterpret_cast<const uint4*>(args.intermediate + token * args.top_k * args.inter);
    auto* target = reinterpret_cast<uint4*>(token_rows);
    const int vectors = static_cast<int>(args.top_k) * inter / kVectorElements;
#pragma unroll 1  // registers hold the weights in flight: one vector at a time
    for (int v = threadIdx.x; v < vectors; v += kDownThreads) target[v] = __ldcg(source + v);
    __syncthreads();
    waited = true;
  };

  const int items = static_cast<int>(args.top_k) * kDownSplitK;
  const int rounds = (items + kDownWarps - 1) / kDownWarps;  // uniform over the block
  for (int round = 0; round < rounds; ++round) {
    const int item = round * kDownWarps + warp;
    const bool has_item = item < items;
    const int choice = has_item ? item / kDownSplitK : 0;
    const int split = item % kDownSplitK;
    const int32_t local = has_item ? routing.local[choice] : -1;
    const int chunk_begin = split * chunks_per_split;
    const int chunk_end = has_item ? min(k_chunks, chunk_begin + chunks_per_split) : chunk_begin;
    // A choice of no expert (local -1) loads nothing (k_valid below) but needs a base to offset from.
    const bf16* down_base = local < 0 ? args.down
                                      : expert_weights_of(args.down, args.addresses, kDownAddress, local,
                                                          args.hidden * args.inter);
    const bf16* weights_lo = down_base + (lo_valid ? row_lo : 0) * inter + quad * kVectorElements;
    const int hi_offset = ((hi_valid ? row_hi : 0) - (lo_valid ? row_lo : 0)) * inter;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    // Every warp runs the same number of passes (the block syncs inside the first).
    const int passes = (chunks_per_split + kDownUnroll - 1) / kDownUnroll;
    for (int pass = 0; pass < passes; ++pass) {
      const int c0 = chunk_begin + pass * kDownUnroll;
      // Chunk u of this pass is real: inside the item's K range and the row (and the expert hosted).
      const auto k_valid = [&](int u) {
        return c0 + u < chunk_end && (c0 + u) * kChunkK + quad * kVectorElements < inter && local >= 0;
      };
      uint4 lo[kDownUnroll], hi[kDownUnroll];
#pragma unroll
      for (int u = 0; u < kDownUnroll; ++u) {
        const int offset = (c0 + u) * kChunkK;
        lo[u] = k_valid(u) && lo_valid ? load_weights(weights_lo + offset) : zero;
        hi[u] = k_valid(u) && hi_valid ? load_weights(weights_lo + hi_offset + offset) : zero;
      }
      if (!waited) wait_and_stage_rows();  // the first weights are in flight
      const bf16* row = token_rows + choice * inter + quad * kVectorElements;
#pragma unroll
      for (int u = 0; u < kDownUnroll; ++u) {
        // Zero, not the staged row, past the row's end (0 * a stale NaN would be NaN).
        const uint4 act =
            k_valid(u) && group == 0 ? *reinterpret_cast<const uint4*>(row + (c0 + u) * kChunkK) : zero;
        mma_chunk(acc, lo[u], hi[u], act);
      }
    }
    // acc[0]: row_lo, acc[2]: row_hi, for token column 2 * quad: column 0 is ours.
    if (has_item && quad == 0) {
      partials[choice][split][group] = local < 0 ? NAN : acc[0];
      partials[choice][split][group + kMmaRows / 2] = local < 0 ? NAN : acc[2];
    }
  }
  if (!waited) wait_and_stage_rows();  // (no K at all) every block still orders its writes
  __syncthreads();
  if (threadIdx.x < kMmaRows) {
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kMmaRows + threadIdx.x;
    if (row < args.hidden) {
      float sum = 0.0f;
      for (int choice = 0; choice < args.top_k; ++choice) {
        float slot_out = partials[choice][0][threadIdx.x];
#pragma unroll
        for (int s = 1; s < kDownSplitK; ++s) slot_out += partials[choice][s][threadIdx.x];
        // expert_ffn rounds each slot's row to bf16; combine_top_k sums weight * row in slot order.
        const float rounded = __bfloat162float(__float2bfloat16_rn(slot_out));
        sum = __fadd_rn(sum, __fmul_rn(routing.weight[choice], rounded));
      }
      static_cast<TOut*>(args.out)[token * args.hidden + row] = access::from_float<TOut>(sum);
    }
  }
}

template <int kExpertsPerLane>
void launch_fused(const RoutedMoeFusedArgs& args, cudaStream_t stream) {
  const auto tokens = static_cast<unsigned>(args.tokens);
  const auto router_blocks = static_cast<unsigned>((args.num_experts + kRouterWarps - 1) / kRouterWarps);
  dependent::launch(router_logits_kernel, dim3(router_blocks), dim3(kRouterWarps * 32), 0, stream,
                    args.router_input, args.router, args.logits, static_cast<int>(args.tokens), args.hidden,
                    args.num_experts);
  EPIC_CUDA_CHECK_LAUNCH();
  const int64_t columns_per_block = kColumnWarps * kMmaRows / 2;
  const dim3 gate_up_grid(static_cast<unsigned>((args.inter + columns_per_block - 1) / columns_per_block),
                          static_cast<unsigned>(args.tokens * args.top_k));
  dependent::launch(routed_gate_up_kernel<kExpertsPerLane>, gate_up_grid, dim3(kThreads), 0, stream, args);
  EPIC_CUDA_CHECK_LAUNCH();
  const dim3 down_grid(static_cast<unsigned>((args.hidden + kMmaRows - 1) / kMmaRows), tokens);
  const size_t shared = down_shared_bytes(args);
  const auto launch_down = [&](auto* kernel) {
    if (shared > 48 * 1024) {  // above 48 KiB a kernel must opt in
      EPIC_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(shared)));
    }
    dependent::launch(kernel, down_grid, dim3(kDownThreads), shared, stream, args);
  };
  if (args.out_type == ScalarType::kF32) {
    launch_down(routed_down_combine_kernel<kExpertsPerLane, float>);
  } else {
    launch_down(routed_down_combine_kernel<kExpertsPerLane, bf16>);
  }
  EPIC_CUDA_CHECK_LAUNCH();
}

}  // namespace

bool routed_moe_fused_supported(const RoutedMoeFusedArgs& args) {
  const bool out_type = args.out_type == ScalarType::kF32 || args.out_type == ScalarType::kBF16;
  // The down launch keeps the token's top_k intermediate rows in shared memory.
  return out_type && down_shared_bytes(args) <= kDownMaxSharedBytes &&
         args.hidden * args.inter < (int64_t{1} << 31) && args.tokens >= 1 &&
         args.tokens <= kRoutedMoeFusedMaxTokens && args.num_experts >= 1 &&
         args.num_experts <= kRoutedMoeFusedMaxExperts && args.top_k >= 1 &&
         args.top_k <= kRoutedMoeFusedMaxTopK && args.top_k <= args.num_experts && args.hidden > 0 &&
         args.inter > 0 && args.hidden % kVectorElements == 0 && args.inter % kVectorElements == 0 &&
         access::aligned16(args.router_input) && access::aligned16(args.router) &&
         access::aligned16(args.x) && access::aligned16(args.gate_up) && access::aligned16(args.down) &&
         access::aligned16(args.intermediate);
}

void routed_moe_fused(const RoutedMoeFusedArgs& args, cudaStream_t stream) {
  EPIC_CHECK(routed_moe_fused_supported(args), ErrorCode::kInternal,
             "routed_moe: the fused kernels do not take this call (routed_moe_fused_supported)");
  if (args.num_experts <= 4 * 32) {
    launch_fused<4>(args, stream);
  } else {
    launch_fused<8>(args, stream);
  }
}

}  // namespace epic::cuda_kernels
