// argmax over long rows (a vocabulary of logits: 151,936 at Qwen3's size) in two launches. One block
// per row read a 600 KB row at ~25 GB/s, 24 us of every batch-1 decode step; here many blocks per row
// each find the best of a slice with every load in flight at once, and a second launch reduces each
// row's slices. Deterministic (ties go to the lowest index whatever the split), no atomics, and no
// state kept between calls: the slices' results live in the caller's scratch.
#include <cmath>
#include <cstdint>
#include <string>

#include "kernels/cuda/argmax_candidate.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/scalar_access.cuh"

namespace epic::cuda_kernels {
namespace {

using access::kVectorElements;
using access::kWarpSize;

constexpr int kThreads = 256;  // both kernels
// A slice is one load (of kVec elements) per thread: the fewest dependent rounds per block.
constexpr int64_t kSliceVectors = kThreads;
constexpr int64_t kMaxSlices = 1024;  // past this many slices of that size a slice grows instead
constexpr int kMaxGridRows = 65535;   // gridDim.y; the kernels stride over rows beyond it

// One slice's result in the scratch.
struct SliceBest {
  Candidate best;
  int32_t non_finite;  // a NaN or Inf in the slice
  int32_t unused;      // keeps the struct 16 bytes (one vector store)
};

// The block's best candidate and whether any thread saw a non-finite value; valid in thread 0. Ends with
// a barrier, so the shared array may be reused after it.
__device__ __forceinline__ Candidate block_best(Candidate best, int non_finite, int* block_non_finite) {
  __shared__ Candidate warp_results[kThreads / kWarpSize];
  best = warp_best(best);
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) warp_results[warp] = best;
  *block_non_finite = __syncthreads_or(non_finite);
  if (warp == 0) {
    best = threadIdx.x < kThreads / kWarpSize ? warp_results[threadIdx.x] : Candidate{-INFINITY, -1};
    best = warp_best(best);
  }
  __syncthreads();
  return best;
}

// Grid (slices, rows): block (s, r) scans elements [s * slice, (s + 1) * slice) of row r, each thread its
// elements in increasing index, and writes the slice's best to scratch[r * slices + s].
template <int kVec, class T>
__global__ void __launch_bounds__(kThreads)
    argmax_slice_kernel(const T* logits, SliceBest* scratch, int64_t rows, int64_t vocab, int64_t slice) {
  dependent::wait_for_previous();  // dependent_launch.cuh: the logits are the previous kernel's output
  dependent::release_next();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * slice;
  const int64_t end = begin + slice < vocab ? begin + slice : vocab;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const T* values_of_row = logits + row * vocab;
    Candidate best{-INFINITY, -1};
    int non_finite = 0;
    for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kVec; i < end;
         i += int64_t{kThreads} * kVec) {
      float values[kVec];
      access::load_vector<kVec>(values_of_row + i, values);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const Candidate candidate{values[j], static_cast<int32_t>(i + j)};
        non_finite |= !isfinite(values[j]);
        if (better(candidate, best)) best = candidate;
      }
    }
    int slice_non_finite = 0;
    best = block_best(best, non_finite, &slice_non_finite);
    if (threadIdx.x == 0) scratch[row * gridDim.x + blockIdx.x] = SliceBest{best, slice_non_finite, 0};
  }
}

// Grid (1, rows): ids[r] = the best of row r's slices, or -1 where any slice saw a non-finite value.
__global__ void __launch_bounds__(kThreads)
    argmax_reduce_kernel(const SliceBest* scratch, int32_t* ids, int64_t rows, int64_t slices) {
  dependent::wait_for_previous();
  dependent::release_next();
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    Candidate best{-INFINITY, -1};
    int non_finite = 0;
    for (int64_t s = threadIdx.x; s < slices; s += kThreads) {
      const SliceBest slice = scratch[row * slices + s];
      non_finite |= slice.non_finite;
      if (better(slice.best, best)) best = slice.best;
    }
    int row_non_finite = 0;
    best = block_best(best, non_finite, &row_non_finite);
    if (threadIdx.x == 0) ids[row] = row_non_finite ? -1 : best.index;
  }
}

// Elements per slice: kSliceVectors loads of kVec, grown (in whole vectors) so that a row has at most
// kMaxSlices slices.
int64_t slice_elements(int64_t vocab, int vec) {
  const int64_t base = kSliceVectors * vec;
  const int64_t needed = (vocab + kMaxSlices - 1) / kMaxSlices;
  return needed <= base ? base : (needed + vec - 1) / vec * vec;
}

int64_t slice_count(int64_t vocab, int vec) {
  const int64_t slice = slice_elements(vocab, vec);
  return (vocab + slice - 1) / slice;
}

bool vector_loads(const void* logits, int64_t vocab) {
  return vocab % kVectorElements == 0 && access::aligned16(logits);
}

}  // namespace

int64_t argmax_scratch_bytes(int64_t rows, int64_t vocab) {
  // The scalar variant's slices are the smaller ones, so its count bounds both.
  return rows * slice_count(vocab, 1) * static_cast<int64_t>(sizeof(SliceBest));
}

void argmax(const void* logits, ScalarType type, int32_t* ids, int64_t rows, int64_t vocab, void* scratch,
            cudaStream_t stream) {
  if (rows == 0) return;
  EPIC_CHECK(vocab > 0 && vocab <= INT32_MAX, ErrorCode::kInvalidArgument,
             "argmax: vocab must be in [1, 2^31), not " + std::to_string(vocab));
  const bool vector = vector_loads(logits, vocab);
  const int vec = vector ? kVectorElements : 1;
  const int64_t slice = slice_elements(vocab, vec);
  const int64_t slices = slice_count(vocab, vec);
  const auto grid_rows = static_cast<unsigned>(rows < kMaxGridRows ? rows : kMaxGridRows);
  auto* slice_results = static_cast<SliceBest*>(scratch);
  access::dispatch_float_type(type, "argmax", [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    const dim3 grid(static_cast<unsigned>(slices), grid_rows);
    const auto* values = static_cast<const T*>(logits);
    if (vector) {
      dependent::launch(argmax_slice_kernel<kVectorElements, T>, grid, dim3(kThreads), 0, stream, values,
                        slice_results, rows, vocab, slice);
    } else {
      dependent::launch(argmax_slice_kernel<1, T>, grid, dim3(kThreads), 0, stream, values, slice_results,
                        rows, vocab, slice);
    }
  });
  EPIC_CUDA_CHECK_LAUNCH();
  dependent::launch(argmax_reduce_kernel, dim3(1, grid_rows), dim3(kThreads), 0, stream,
                    static_cast<const SliceBest*>(slice_results), ids, rows, slices);
  EPIC_CUDA_CHECK_LAUNCH();
}

}  // namespace epic::cuda_kernels
