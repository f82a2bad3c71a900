#include "kernels/cuda/lane_workers.h"

#include <string>
#include <utility>

#include "kernels/error.h"

namespace epic::cuda_kernels {

LaneWorkers::LaneWorkers(int num_workers) {
  EPIC_CHECK(num_workers >= 0, ErrorCode::kInternal,
             "LaneWorkers: " + std::to_string(num_workers) + " workers asked for; 0 or more");
  has_job_.assign(num_workers, 0);
  threads_.reserve(num_workers);
  try {
    for (int worker = 0; worker < num_workers; ++worker)
      threads_.emplace_back([this, worker] { work(worker); });
  } catch (...) {
    stop();  // the threads already started
    throw;
  }
}

LaneWorkers::~LaneWorkers() { stop(); }

void LaneWorkers::stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  job_posted_.notify_all();
  for (std::thread& thread : threads_) {
    if (thread.joinable()) thread.join();
  }
}

void LaneWorkers::run_erased(int side_count, JobFunction function, const void* context) {
  EPIC_CHECK(side_count >= 0 && side_count <= size(), ErrorCode::kInternal,
             "LaneWorkers::run: " + std::to_string(side_count) + " side lanes asked for, " +
                 std::to_string(size()) + " workers");
  std::lock_guard<std::mutex> run_lock(run_mutex_);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    function_ = function;
    context_ = context;
    errors_.assign(side_count, nullptr);
    for (int worker = 0; worker < side_count; ++worker) has_job_[worker] = 1;
    pending_ = side_count;
  }
  job_posted_.notify_all();
  std::exception_ptr caller_error;
  try {
    function(context, 0);
  } catch (...) {
    caller_error = std::current_exception();
  }
  std::vector<std::exception_ptr> worker_errors;
  {
    // The workers' calls may use the caller's frame: wait for all of them, whatever happened here.
    std::unique_lock<std::mutex> lock(mutex_);
    job_done_.wait(lock, [this] { return pending_ == 0; });
    worker_errors.swap(errors_);
  }
  // The order a loop over the lanes would meet them in.
  if (caller_error) std::rethrow_exception(caller_error);
  for (const std::exception_ptr& error : worker_errors) {
    if (error) std::rethrow_exception(error);
  }
}

void LaneWorkers::work(int worker) {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    job_posted_.wait(lock, [this, worker] { return stopping_ || has_job_[worker] != 0; });
    if (has_job_[worker] == 0) return;  // stopping, and no share of a run left to finish
    const JobFunction function = function_;
    const void* context = context_;
    lock.unlock();
    std::exception_ptr error;
    try {
      function(context, worker + 1);
    } catch (...) {
      error = std::current_exception();
    }
    lock.lock();
    errors_[worker] = std::move(error);
    has_job_[worker] = 0;
    if (--pending_ == 0) job_done_.notify_one();
  }
}

}  // namespace epic::cuda_kernels
