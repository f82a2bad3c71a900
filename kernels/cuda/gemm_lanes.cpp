#include "kernels/cuda/gemm_lanes.h"

#include "kernels/cuda/cuda_check.h"

namespace epic::cuda_kernels {
namespace {

constexpr size_t kLaneWorkspaceBytes = size_t{32} << 20;

}  // namespace

GemmLanePool::GemmLanePool(int side_count) : workers_(side_count) {
  try {
    // Timing-free events: they only order streams.
    EPIC_CUDA_CHECK(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming));
    for (int i = 0; i < side_count; ++i) {
      side_.push_back(GemmLane{});
      GemmLane& lane = side_.back();
      EPIC_CUDA_CHECK(cudaStreamCreateWithFlags(&lane.stream, cudaStreamNonBlocking));
      EPIC_CUDA_CHECK(cudaEventCreateWithFlags(&lane.done, cudaEventDisableTiming));
      EPIC_CUBLAS_CHECK(cublasCreate(&lane.cublas));
      EPIC_CUBLAS_CHECK(cublasSetStream(lane.cublas, lane.stream));
      EPIC_CUBLAS_CHECK(cublasSetMathMode(lane.cublas, CUBLAS_DEFAULT_MATH));
      workspaces_.push_back(nullptr);
      EPIC_CUDA_CHECK(cudaMalloc(&workspaces_.back(), kLaneWorkspaceBytes));
      EPIC_CUBLAS_CHECK(cublasSetWorkspace(lane.cublas, workspaces_.back(), kLaneWorkspaceBytes));
    }
  } catch (...) {
    release();
    throw;
  }
}

GemmLanePool::~GemmLanePool() { release(); }

void GemmLanePool::release() {
  // Work still queued on a lane must finish before its workspace goes.
  for (GemmLane& lane : side_) {
    if (lane.stream != nullptr) cudaStreamSynchronize(lane.stream);
    if (lane.cublas != nullptr) cublasDestroy(lane.cublas);
    if (lane.done != nullptr) cudaEventDestroy(lane.done);
    if (lane.stream != nullptr) cudaStreamDestroy(lane.stream);
  }
  for (void* workspace : workspaces_) {
    if (workspace != nullptr) cudaFree(workspace);
  }
  if (fork_ != nullptr) cudaEventDestroy(fork_);
  side_.clear();
  workspaces_.clear();
  fork_ = nullptr;
}

}  // namespace epic::cuda_kernels
