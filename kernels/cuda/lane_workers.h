// LaneWorkers: persistent host threads that run one fork-join job with the calling thread, the
// host side of GemmLanePool (gemm_lanes.h): each worker enqueues one side lane's share of a loop
// while the caller enqueues its own. No CUDA here, so its test (tests/kernels/lane_workers_test.cpp)
// needs no GPU.
#pragma once

#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace epic::cuda_kernels {

class LaneWorkers {
 public:
  // Starts num_workers threads, each waiting for its share of the next run.
  explicit LaneWorkers(int num_workers);
  ~LaneWorkers();  // stops and joins the threads
  LaneWorkers(const LaneWorkers&) = delete;
  LaneWorkers& operator=(const LaneWorkers&) = delete;

  int size() const { return static_cast<int>(threads_.size()); }

  // Calls job(0) on the calling thread and job(lane) on worker lane - 1 for lane 1 .. side_count,
  // all at once, and returns when every call has returned or thrown; then rethrows the first
  // exception in lane order (the caller's first). One run at a time: concurrent callers take turns.
  // Throws Error(kInternal) unless 0 <= side_count <= size().
  template <class Job>
  void run(int side_count, const Job& job) {
    run_erased(
        side_count, [](const void* context, int lane) { (*static_cast<const Job*>(context))(lane); }, &job);
  }

 private:
  using JobFunction = void (*)(const void* context, int lane);

  void run_erased(int side_count, JobFunction function, const void* context);
  void work(int worker);  // one worker thread's loop
  void stop();            // tells the workers to end and joins them

  std::mutex run_mutex_;  // held for a whole run
  std::mutex mutex_;      // guards everything below
  std::condition_variable job_posted_;
  std::condition_variable job_done_;
  JobFunction function_ = nullptr;
  const void* context_ = nullptr;
  std::vector<char> has_job_;               // per worker: its share of the current run is waiting
  std::vector<std::exception_ptr> errors_;  // per worker, of the current run
  int pending_ = 0;                         // workers still running their share
  bool stopping_ = false;
  std::vector<std::thread> threads_;  // last: started once the state above exists
};

}  // namespace epic::cuda_kernels
