// expert_ffn_batched: the expert FFN at prefill sizes as a few batched cuBLAS GEMMs over all experts
// instead of one GEMM per expert (~400 TFLOP/s at 1024 x 1536 x 2048 on an H200, even four at once)
// or the grouped API (~255). cuBLAS's batched GEMM of 128 experts x 1100 rows runs at ~700 TFLOP/s
// (gate_up) and ~630 (down) there (torch.bmm, same card). A batched call gives every expert the same
// row count M, so experts run with more rows than they have; two plans keep that cheap (host side,
// from the group sizes the caller read back):
// - Windows (expert_ffn_windows), for near-uniform routing: in place over the sorted rows, each
//   pass a "rest" call then a "main" call whose windows overlap only where the later call rewrites
//   them. No padding copy, no scratch (where 2I <= H).
// - Padded buckets (otherwise): experts with rows, sorted by count, cut into buckets whose counts
//   are at least 80% of the bucket's largest; a bucket runs with M = that largest count (rounded up
//   to 8, at most the rows), one batched GEMM per bucket and pass. Input without a copy: expert e's
//   M-row window of x starts at its first row, or ends at x's last row where that would run past
//   it (the extra rows belong to other experts and give rows nobody reads). gate_up writes G [P, 2I]
//   (P = the padded rows), silu(gate) * up gives Hs [P, I], down writes O [P, H] over G's memory,
//   and the real rows of O are copied to y (a warp per row: y[r] = O[r + delta[e]], e found by
//   binary search in the device offsets). Skewed routing gives more buckets; each expert's weights
//   are still read once.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/cuda/ab_switch.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/row_copy.cuh"
#include "kernels/cuda/scalar_access.cuh"

namespace epic::cuda_kernels {
namespace {

using bf16 = __nv_bfloat16;

constexpr int64_t kRowRounding = 8;  // M of a bucket: a multiple of this (cuBLAS tiles prefer it)
// A bucket takes experts down to this fraction of its largest count (~25% padding at most).
constexpr int64_t kBucketNumerator = 4, kBucketDenominator = 5;
constexpr int64_t kMaxBuckets = 16;  // more (very skewed routing): the per-expert paths instead
constexpr int kThreads = 256;
// The windows plan only where the rest call has at most 1 / this of the main call's rows.
constexpr int64_t kWindowsMaxRestShare = 4;

// y[r] = padded[r + delta[e]] for the expert e whose rows [offsets[e], offsets[e + 1]) hold r: the
// last e with offsets[e] <= r (experts without rows share their offset with the next one).
__global__ void unpad_rows_kernel(const uint4* __restrict__ padded, const int32_t* __restrict__ offsets,
                                  int num_experts, const int64_t* __restrict__ delta, uint4* __restrict__ y,
                                  int64_t rows, int64_t units_per_row) {
  const int lane = threadIdx.x % rows::kCopyWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / rows::kCopyWarpSize);
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / rows::kCopyWarpSize;
       row < rows; row += warps) {
    int low = 0, high = num_experts;  // offsets[low] <= row < offsets[high]
    while (high - low > 1) {
      const int middle = (low + high) / 2;
      if (offsets[middle] <= row) {
        low = middle;
      } else {
        high = middle;
      }
    }
    rows::copy_row_by_warp(padded + (row + delta[low]) * units_per_row, y + row * units_per_row,
                           units_per_row, lane);
  }
}

struct Bucket {
  int64_t first = 0, count = 0;  // a range of the sorted experts
  int64_t m = 0;                 // rows every expert of the bucket runs with
  int64_t padded_begin = 0;      // the bucket's first row in G / Hs / O
};

cublasStatus_t batched_gemm_nt(cublasHandle_t cublas, int64_t n, int64_t k, int64_t rows,
                               void* const* weights, int64_t ld_weight, void* const* acts, int64_t ld_act,
                               void* const* outs, int64_t ld_out, int64_t batch) {
  const float alpha = 1.0f, beta = 0.0f;
  // Row-major out[rows, n] = act[rows, k] * weight[n, k]^T, in cuBLAS's column-major terms (as
  // gemm_rows_nt in cublas_gemm.h).
  return cublasGemmBatchedEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(rows),
                             static_cast<int>(k), &alpha, weights, CUDA_R_16BF, static_cast<int>(ld_weight),
                             acts, CUDA_R_16BF, static_cast<int>(ld_act), &beta, outs, CUDA_R_16BF,
                             static_cast<int>(ld_out), static_cast<int>(batch), CUBLAS_COMPUTE_32F,
                             CUBLAS_GEMM_DEFAULT);
}

void check_cublas(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw Error(ErrorCode::kInternal, std::string("expert_ffn_batched: cublasGemmBatchedEx (") + what +
                                          ") failed: " + cublasGetStatusName(status) + " (" +
                                          cublasGetStatusString(status) + ")");
  }
}

// The matrix pointers both plans stage for cuBLAS: six arrays of `count` slots each, in this order, so a
// pass's weight, act and out arrays (batched_gemm_nt's A, B, C) follow each other. The same layout on the
// host (filled by set) and on the device (after stage_pointers' copy).
enum FfnArray : int { kGateUpWeight, kGateUpAct, kGateUpOut, kDownWeight, kDownAct, kDownOut, kFfnArrays };
struct FfnPointers {
  void** base = nullptr;
  int64_t count = 0;
  void** array(int which) const { return base + which * count; }
  // Slot `slot` (one expert's batch entry) of every array.
  void set(int64_t slot, const bf16* gate_up_weight, const bf16* gate_up_act, bf16* gate_up_out,
           const bf16* down_weight, const bf16* down_act, bf16* down_out) const {
    // cuBLAS only reads A and B; the arrays' element type is void* either way.
    array(kGateUpWeight)[slot] = const_cast<bf16*>(gate_up_weight);
    array(kGateUpAct)[slot] = const_cast<bf16*>(gate_up_act);
    array(kGateUpOut)[slot] = gate_up_out;
    array(kDownWeight)[slot] = const_cast<bf16*>(down_weight);
    array(kDownAct)[slot] = const_cast<bf16*>(down_act);
    array(kDownOut)[slot] = down_out;
  }
  // Itself at `offset` slots into every array ([offset, offset + slots) of each), e.g. a bucket's.
  FfnPointers slice(int64_t offset) const { return FfnPointers{base + offset, count}; }
};

// The first `slots` staged host pointers to the device (one copy on the stream).
void stage_pointers(const ExpertFfnArgs& args, int64_t slots, cudaStream_t stream) {
  EPIC_CUDA_CHECK(cudaMemcpyAsync(args.device_pointers, args.host_pointers,
                                  static_cast<size_t>(slots) * sizeof(void*), cudaMemcpyHostToDevice,
                                  stream));
}

// One pass (first = kGateUpWeight or kDownWeight) of `batch` experts over `rows` rows each: out[rows, n] =
// act[rows, k] * weight[n, k]^T, the arrays at `device` (a slice, or the plan's whole staging).
void gemm_pass(cublasHandle_t cublas, const FfnPointers& device, int first, int64_t n, int64_t k,
               int64_t rows, int64_t batch, const char* what) {
  check_cublas(batched_gemm_nt(cublas, n, k, rows, device.array(first), k, device.array(first + 1), k,
                               device.array(first + 2), n, batch),
               what);
}

// The windows plan: no padding at all where the experts' counts lie in [c_min, c_max] with
// c_max - c_min <= c_min and the rest rows (below) at most a quarter of the main rows (near-uniform
// routing). Each GEMM pass is two batched calls over the rows in
// place: first a "rest" call of M_rest rows for each expert from row offsets[e] + M_main (shifted back
// to end at the last row where it would run past it), then a "main" call of M_main rows from
// offsets[e]. A rest window runs into the next expert's first M_main rows at most (M_rest <= c_min),
// which the main call, later on the stream, overwrites; rest windows never overlap each other's
// real rows. So G and the intermediate keep the sorted row order, down writes y directly, and
// silu runs over the real rows only.
bool expert_ffn_windows(const ExpertFfnArgs& args, const int32_t* host_offsets,
                        const int32_t* host_local_index, cublasHandle_t cublas, cudaStream_t stream) {
  const int64_t hidden = args.hidden, inter = args.inter, rows = args.rows;
  std::vector<int64_t> experts;  // with rows, in row order
  int64_t least = rows, most = 0;
  for (int64_t e = 0; e < args.num_experts; ++e) {
    const int64_t count = host_offsets[e + 1] - host_offsets[e];
    if (count == 0) continue;
    experts.push_back(e);
    least = std::min(least, count);
    most = std::max(most, count);
  }
  if (experts.empty()) return false;
  const int64_t main_rows = least >= kRowRounding ? least / kRowRounding * kRowRounding : least;
  const int64_t rest_rows =
      most > main_rows ? std::min(rows, (most - main_rows + kRowRounding - 1) / kRowRounding * kRowRounding)
                       : 0;
  if (rest_rows > least)
    return false;  // too uneven: a rest window could reach past the next expert's main rows
  // The rest call is a second, less efficient GEMM over up to rest_rows more rows an expert: worth it
  // (against the buckets' one call and unpadding copy) only while it is small. H200, 128 experts:
  // 16384 tokens (main 920, rest 192) 2.95 vs 3.12 ms a layer; 4096 tokens (208, 96) 1.03 vs 0.89.
  if (rest_rows * kWindowsMaxRestShare > main_rows) return false;
  std::vector<int64_t> rest_experts;  // those with rows past the main ones
  for (const int64_t e : experts) {
    if (host_offsets[e + 1] - host_offsets[e] > main_rows) rest_experts.push_back(e);
  }
  const auto active = static_cast<int64_t>(experts.size());
  const auto rest = static_cast<int64_t>(rest_experts.size());
  const int64_t pointer_slots = kFfnArrays * (active + rest);
  if (pointer_slots > args.pointer_capacity) return false;

  // G [rows, 2I] in y's memory where it fits (y is written only by the down pass, after G is used).
  bf16* g = static_cast<bf16*>(args.y);
  if (2 * inter > hidden)
    g = static_cast<bf16*>(args.batched_scratch(static_cast<size_t>(rows * 2 * inter) * 2));
  auto* h = static_cast<bf16*>(args.intermediate);
  const auto* x = static_cast<const bf16*>(args.x);
  const auto* gate_up = static_cast<const bf16*>(args.gate_up);
  const auto* down = static_cast<const bf16*>(args.down);
  auto* y = static_cast<bf16*>(args.y);

  // Staging: the rest call's six arrays, then the main call's.
  const FfnPointers rest_host{args.host_pointers, rest},
      main_host{args.host_pointers + kFfnArrays * rest, active};
  const auto stage = [&](const FfnPointers& base, int64_t slot, int64_t e, int64_t first_row) {
    const int64_t local = host_local_index[e];
    base.set(slot, gate_up + local * 2 * inter * hidden, x + first_row * hidden, g + first_row * 2 * inter,
             down + local * hidden * inter, h + first_row * inter, y + first_row * hidden);
  };
  for (int64_t i = 0; i < rest; ++i) {
    const int64_t e = rest_experts[static_cast<size_t>(i)];
    stage(rest_host, i, e, std::min<int64_t>(host_offsets[e] + main_rows, rows - rest_rows));
  }
  for (int64_t i = 0; i < active; ++i) {
    const int64_t e = experts[static_cast<size_t>(i)];
    stage(main_host, i, e, host_offsets[e]);
  }
  stage_pointers(args, pointer_slots, stream);
  const FfnPointers rest_device{args.device_pointers, rest};
  const FfnPointers main_device{args.device_pointers + kFfnArrays * rest, active};
  const auto pass = [&](int first, int64_t n, int64_t k, const char* what) {
    // The rest call first: the main call then overwrites whatever it wrote past its expert's rows.
    if (rest > 0) gemm_pass(cublas, rest_device, first, n, k, rest_rows, rest, what);
    gemm_pass(cublas, main_device, first, n, k, main_rows, active, what);
  };
  pass(kGateUpWeight, 2 * inter, hidden, "gate_up");
  silu_mul(g, h, ScalarType::kBF16, rows, inter, stream);  // the dense MLP's op: the same rounding
  pass(kDownWeight, hidden, inter, "down");
  return true;
}

}  // namespace

bool expert_ffn_batched(const ExpertFfnArgs& args, const int32_t* host_offsets,
                        const int32_t* host_local_index, cublasHandle_t cublas, cudaStream_t stream) {
  if (args.batched_scratch == nullptr || args.device_pointers == nullptr || args.host_pointers == nullptr)
    return false;
  const int64_t hidden = args.hidden, inter = args.inter, rows = args.rows;
  if (hidden % 8 != 0 || inter % 8 != 0 || !access::aligned16(args.x) || !access::aligned16(args.y) ||
      !access::aligned16(args.gate_up) || !access::aligned16(args.down))
    return false;  // cuBLAS's 16-byte rule for bf16 pointers, and the 16-byte row copies
  // EPIC_CUDA_FFN_WINDOWS=0: always the padded buckets (A/B timing).
  static const bool windows = ab_switch_on("EPIC_CUDA_FFN_WINDOWS");
  if (windows && expert_ffn_windows(args, host_offsets, host_local_index, cublas, stream)) return true;

  // Experts with rows, largest first (ties: lower expert id first, so the plan is deterministic).
  std::vector<int64_t> experts;
  for (int64_t e = 0; e < args.num_experts; ++e) {
    if (host_offsets[e + 1] > host_offsets[e]) experts.push_back(e);
  }
  const auto count_of = [&](int64_t e) {
    return static_cast<int64_t>(host_offsets[e + 1] - host_offsets[e]);
  };
  std::stable_sort(experts.begin(), experts.end(),
                   [&](int64_t a, int64_t b) { return count_of(a) > count_of(b); });
  std::vector<Bucket> buckets;
  int64_t padded_rows = 0;
  for (size_t i = 0; i < experts.size();) {
    Bucket bucket;
    bucket.first = static_cast<int64_t>(i);
    const int64_t largest = count_of(experts[i]);
    bucket.m = std::min(rows, (largest + kRowRounding - 1) / kRowRounding * kRowRounding);
    size_t j = i + 1;
    while (j < experts.size() && count_of(experts[j]) * kBucketDenominator >= largest * kBucketNumerator) ++j;
    bucket.count = static_cast<int64_t>(j - i);
    bucket.padded_begin = padded_rows;
    padded_rows += bucket.count * bucket.m;
    buckets.push_back(bucket);
    i = j;
  }
  if (buckets.empty() || static_cast<int64_t>(buckets.size()) > kMaxBuckets) return false;

  // Pointer staging: per expert A, B, C of gate_up and of down, then delta[num_experts] (int64).
  const auto active = static_cast<int64_t>(experts.size());
  const int64_t pointer_slots = kFfnArrays * active + args.num_experts;
  if (pointer_slots > args.pointer_capacity) return false;

  const size_t wide = static_cast<size_t>(std::max(2 * inter, hidden));
  const size_t scratch_bytes =
      static_cast<size_t>(padded_rows) * (wide + static_cast<size_t>(inter)) * sizeof(bf16);
  auto* region = static_cast<bf16*>(args.batched_scratch(scratch_bytes));
  bf16* g = region;                       // [P, 2I], then O [P, H] over it
  bf16* h = region + padded_rows * wide;  // [P, I]
  const auto* x = static_cast<const bf16*>(args.x);
  const auto* gate_up = static_cast<const bf16*>(args.gate_up);
  const auto* down = static_cast<const bf16*>(args.down);

  const FfnPointers host{args.host_pointers, active};
  auto* delta = reinterpret_cast<int64_t*>(args.host_pointers + kFfnArrays * active);
  static_assert(sizeof(int64_t) == sizeof(void*), "delta shares the pointer staging");
  std::fill(delta, delta + args.num_experts, int64_t{0});
  for (const Bucket& bucket : buckets) {
    for (int64_t i = 0; i < bucket.count; ++i) {
      const int64_t slot = bucket.first + i;
      const int64_t e = experts[static_cast<size_t>(slot)];
      const int64_t local = host_local_index[e];
      const int64_t begin = host_offsets[e];
      const int64_t window = std::min(begin, rows - bucket.m);  // M rows of x from here stay inside x
      const int64_t padded_first = bucket.padded_begin + i * bucket.m;
      host.set(slot, gate_up + local * 2 * inter * hidden, x + window * hidden, g + padded_first * 2 * inter,
               down + local * hidden * inter, h + padded_first * inter, g + padded_first * hidden);
      // Sorted row r of e sits at padded row padded_first + (r - window).
      delta[e] = padded_first - window;
    }
  }
  stage_pointers(args, pointer_slots, stream);
  const FfnPointers device{args.device_pointers, active};
  for (const Bucket& bucket : buckets)
    gemm_pass(cublas, device.slice(bucket.first), kGateUpWeight, 2 * inter, hidden, bucket.m, bucket.count,
              "gate_up");
  silu_mul(g, h, ScalarType::kBF16, padded_rows, inter, stream);
  for (const Bucket& bucket : buckets)
    gemm_pass(cublas, device.slice(bucket.first), kDownWeight, hidden, inter, bucket.m, bucket.count, "down");
  const int64_t units = hidden * static_cast<int64_t>(sizeof(bf16)) / 16;
  unpad_rows_kernel<<<access::capped_blocks(rows * rows::kCopyWarpSize, kThreads), kThreads, 0, stream>>>(
      reinterpret_cast<const uint4*>(g), args.expert_offsets, static_cast<int>(args.num_experts),
      reinterpret_cast<const int64_t*>(device.array(kFfnArrays)), static_cast<uint4*>(args.y), rows, units);
  EPIC_CUDA_CHECK_LAUNCH();
  return true;
}

}  // namespace epic::cuda_kernels
