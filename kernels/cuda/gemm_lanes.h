// GemmLanes: extra cuBLAS handles, each on a stream and with a workspace of its own, over which a
// host loop of independent GEMMs (expert_ffn_cublas's per-expert loop) is spread. One expert's
// GEMMs at prefill sizes (~1000 x 1536 x 2048) fill only a third of an H100/H200's SMs; several
// running at once fill the card. The caller's own handle and stream are lane 0 and not owned here;
// the side lanes' host work (the cuBLAS calls, ~8 us each) runs on a persistent thread per lane.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <vector>

#include "kernels/cuda/lane_workers.h"

namespace epic::cuda_kernels {

struct GemmLane {
  cublasHandle_t cublas = nullptr;  // bound to stream
  cudaStream_t stream = nullptr;
  cudaEvent_t done = nullptr;  // recorded on stream when the lane's share is enqueued (side lanes)
};

// Owns side_count side lanes on the current device (non-blocking streams, 32 MiB cuBLAS workspace
// each, so their GEMMs can run at once without sharing scratch), the fork event, and a worker thread
// per side lane that enqueues that lane's work (workers()).
class GemmLanePool {
 public:
  explicit GemmLanePool(int side_count);
  ~GemmLanePool();
  GemmLanePool(const GemmLanePool&) = delete;
  GemmLanePool& operator=(const GemmLanePool&) = delete;

  int side_count() const { return static_cast<int>(side_.size()); }
  const GemmLane* side_lanes() const { return side_.data(); }
  cudaEvent_t fork() const { return fork_; }
  // Worker w enqueues side lane w's share of a run (lane w + 1 of LaneWorkers::run).
  LaneWorkers& workers() { return workers_; }

 private:
  void release();

  std::vector<GemmLane> side_;
  std::vector<void*> workspaces_;
  cudaEvent_t fork_ = nullptr;
  LaneWorkers workers_;
};

}  // namespace epic::cuda_kernels
