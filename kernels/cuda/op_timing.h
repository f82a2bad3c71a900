// OpTiming: per-op device times of a CudaBackend, for finding where a step's time goes without a
// profiler on the machine. Off unless the environment sets EPIC_CUDA_OP_TIMING=1; then every op
// enqueued outside graph capture is bracketed by two CUDA events, and when the backend is destroyed
// a table (op and shape, calls, total and mean device time) goes to stderr. Run with
// --no-cuda-graphs: replayed graphs are one launch and are not broken down. The events measure the
// op's kernels from the stream's view (launch gaps between ops are not counted), so the table's
// total against the step's wall time shows the fixed costs as well.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace epic::cuda_kernels {

// A diagnostic for where a graph-replayed step's time goes (each kernel's cost inside the chain, which
// a profiler timing kernels alone does not give): EPIC_CUDA_TIMING_SKIP=op[:size],... makes the backend
// enqueue nothing for those ops ("attention", "linear:2048" for linears with 2048 outputs); the step
// then computes garbage and is only good for timing. Read once; never set in real runs.
bool skipped_for_timing(const char* op, int64_t size);

class OpTiming {
 public:
  // Reads EPIC_CUDA_OP_TIMING once.
  OpTiming();
  ~OpTiming();  // finish()

  // Prints the table (when enabled and anything was timed) and stops timing; call it while the
  // timed stream still exists.
  void finish();
  OpTiming(const OpTiming&) = delete;
  OpTiming& operator=(const OpTiming&) = delete;

  bool enabled() const { return enabled_; }

  class Scope {
   public:
    Scope() = default;
    Scope(OpTiming* owner, size_t index) : owner_(owner), index_(index) {}
    Scope(Scope&& other) noexcept : owner_(other.owner_), index_(other.index_) { other.owner_ = nullptr; }
    Scope& operator=(Scope&&) = delete;
    ~Scope() {
      if (owner_ != nullptr) owner_->end(index_);
    }

   private:
    OpTiming* owner_ = nullptr;
    size_t index_ = 0;
  };

  // Brackets one op on stream; label() (op name and shape, a std::string) is only called when
  // timing is on and the stream is not being captured. A template, so that with timing off the
  // hot op path builds no std::function and no string.
  template <class Label>
  Scope time(cudaStream_t stream, const Label& label) {
    if (!enabled_ || capturing(stream)) return Scope();
    return begin(stream, label());
  }

 private:
  struct Pending {
    std::string label;
    cudaEvent_t start = nullptr;
    cudaEvent_t stop = nullptr;
  };
  struct Total {
    int64_t calls = 0;
    double milliseconds = 0.0;
  };

  bool capturing(cudaStream_t stream) const;
  Scope begin(cudaStream_t stream, std::string label);
  void end(size_t index);
  void collect();  // waits for the pending events and adds them to the totals
  cudaEvent_t take_event();

  bool enabled_ = false;
  cudaStream_t stream_ = nullptr;
  std::vector<Pending> pending_;
  std::vector<cudaEvent_t> free_events_;
  std::map<std::string, Total> totals_;
};

}  // namespace epic::cuda_kernels
