// Next-token scoring on the device (Backend::log_softmax and score_rows): one block per row, which
// reads its row three times (the max and argmax, the sum of exp(x - max), then the outputs) with the
// expressions of kernels/next_token_scores.cpp: each term in fp32 as the host forms it, every sum in
// double (per thread, then a tree), so the figures differ from the CPU backend's only by expf's ulp and
// the order of double sums. Ties of the argmax go to the lowest id whatever the split.
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "kernels/backend.h"
#include "kernels/cuda/argmax_candidate.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/scalar_access.cuh"

namespace epic::cuda_kernels {
namespace {

using access::kVectorElements;
using access::kWarpSize;

// A whole block per row: a decode step scores one row per window, and a row of 151,936 logits needs
// many loads in flight (kVec per thread) for one SM to read it fast.
constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int64_t kMaxGridRows = int64_t{1} << 20;  // the kernels stride over rows beyond it

// The block's reduction of every thread's value (warp_reduce within a warp, then over the warps' results;
// `identity` pads the last round), in every thread. The shared slots are written again only after the
// barrier that every thread passes before reading them, so consecutive calls need no extra barrier.
template <class T, class WarpReduce>
__device__ __forceinline__ T block_reduce(T value, T identity, WarpReduce warp_reduce) {
  __shared__ T warp_results[kWarps];
  __shared__ T result;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  value = warp_reduce(value);
  if (lane == 0) warp_results[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = warp_reduce(lane < kWarps ? warp_results[lane] : identity);
    if (lane == 0) result = value;
  }
  __syncthreads();
  return result;
}

__device__ __forceinline__ Candidate block_best(Candidate best) {
  return block_reduce(best, Candidate{-INFINITY, -1}, [](Candidate c) { return warp_best(c); });
}

__device__ __forceinline__ double block_sum(double value) {
  return block_reduce(value, 0.0, [](double v) { return access::warp_sum(v); });
}

// The row's best candidate (its value is the row's max), in every thread.
template <int kVec>
__device__ __forceinline__ Candidate row_best(const float* row, int64_t vocab) {
  Candidate best{-INFINITY, -1};
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVec; i < vocab; i += int64_t{kThreads} * kVec) {
    float values[kVec];
    access::load_vector<kVec>(row + i, values);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const Candidate candidate{values[j], static_cast<int32_t>(i + j)};
      if (better(candidate, best)) best = candidate;
    }
  }
  return block_best(best);
}

// log(sum(exp(x - max))) + max in double, in every thread, as next_token_scores.cpp's log_sum_exp.
template <int kVec>
__device__ __forceinline__ double row_log_sum_exp(const float* row, int64_t vocab, float max) {
  double sum = 0;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVec; i < vocab; i += int64_t{kThreads} * kVec) {
    float values[kVec];
    access::load_vector<kVec>(row + i, values);
#pragma unroll
    for (int j = 0; j < kVec; ++j) sum += static_cast<double>(expf(values[j] - max));
  }
  return static_cast<double>(max) + log(block_sum(sum));
}

template <int kVec>
__global__ void __launch_bounds__(kThreads)
    log_softmax_kernel(const float* logits, float* out, int64_t rows, int64_t vocab) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* row = logits + r * vocab;
    const double log_sum = row_log_sum_exp<kVec>(row, vocab, row_best<kVec>(row, vocab).value);
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVec; i < vocab; i += int64_t{kThreads} * kVec) {
      float values[kVec];
      access::load_vector<kVec>(row + i, values);
#pragma unroll
      for (int j = 0; j < kVec; ++j) values[j] = static_cast<float>(static_cast<double>(values[j]) - log_sum);
      access::store_vector<kVec>(out + r * vocab + i, values);
    }
  }
}

template <int kVec>
__global__ void __launch_bounds__(kThreads)
    score_rows_kernel(const float* logits, const int32_t* targets, const float* reference_log_probs,
                      float* scores, int32_t* ids, int64_t rows, int64_t vocab) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* row = logits + r * vocab;
    const float* reference = reference_log_probs + r * vocab;
    const Candidate best = row_best<kVec>(row, vocab);
    const auto log_sum = static_cast<float>(row_log_sum_exp<kVec>(row, vocab, best.value));
    double kl = 0;
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVec; i < vocab; i += int64_t{kThreads} * kVec) {
      float values[kVec], ref[kVec];
      access::load_vector<kVec>(row + i, values);
      access::load_vector<kVec>(reference + i, ref);
#pragma unroll
      for (int j = 0; j < kVec; ++j)
        kl += static_cast<double>(expf(ref[j]) * (ref[j] - (values[j] - log_sum)));
    }
    kl = block_sum(kl);
    if (threadIdx.x == 0) {
      const int32_t target = targets[r];
      float* columns = scores + r * kNumRowScores;
      columns[kRowLogSumExp] = log_sum;
      // A target outside the vocabulary is the caller's bug (backend.h): a NaN, never a wild read.
      columns[kRowTargetLogit] = target >= 0 && target < vocab ? row[target] : NAN;
      columns[kRowKlDivergence] = static_cast<float>(kl < 0.0 ? 0.0 : kl);  // as score_row; NaN stays NaN
      ids[r] = best.index;
    }
  }
}

bool vector_loads(int64_t vocab, std::initializer_list<const void*> pointers) {
  if (vocab % kVectorElements != 0) return false;
  for (const void* p : pointers)
    if (!access::aligned16(p)) return false;
  return true;
}

unsigned grid_rows(int64_t rows) { return static_cast<unsigned>(rows < kMaxGridRows ? rows : kMaxGridRows); }

void check_vocab(const char* op, int64_t vocab) {
  EPIC_CHECK(vocab > 0 && vocab <= INT32_MAX, ErrorCode::kInvalidArgument,
             std::string(op) + ": vocab must be in [1, 2^31), not " + std::to_string(vocab));
}

}  // namespace

void log_softmax(const float* logits, float* out, int64_t rows, int64_t vocab, cudaStream_t stream) {
  if (rows == 0) return;
  check_vocab("log_softmax", vocab);
  if (vector_loads(vocab, {logits, out})) {
    log_softmax_kernel<kVectorElements><<<grid_rows(rows), kThreads, 0, stream>>>(logits, out, rows, vocab);
  } else {
    log_softmax_kernel<1><<<grid_rows(rows), kThreads, 0, stream>>>(logits, out, rows, vocab);
  }
  EPIC_CUDA_CHECK_LAUNCH();
}

void score_rows(const float* logits, const int32_t* targets, const float* reference_log_probs, float* scores,
                int32_t* ids, int64_t rows, int64_t vocab, cudaStream_t stream) {
  if (rows == 0) return;
  check_vocab("score_rows", vocab);
  if (vector_loads(vocab, {logits, reference_log_probs})) {
    score_rows_kernel<kVectorElements><<<grid_rows(rows), kThreads, 0, stream>>>(
        logits, targets, reference_log_probs, scores, ids, rows, vocab);
  } else {
    score_rows_kernel<1><<<grid_rows(rows), kThreads, 0, stream>>>(logits, targets, reference_log_probs,
                                                                   scores, ids, rows, vocab);
  }
  EPIC_CUDA_CHECK_LAUNCH();
}

}  // namespace epic::cuda_kernels
