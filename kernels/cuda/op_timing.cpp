#include "kernels/cuda/op_timing.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <sstream>
#include <string>
#include <utility>

#include "kernels/cuda/cuda_check.h"

namespace epic::cuda_kernels {
namespace {

// Collect before the pending list holds this many ops, so the events stay few.
constexpr size_t kMaxPending = 4096;

}  // namespace

bool skipped_for_timing(const char* op, int64_t size) {
  static const std::set<std::string> skipped = [] {
    std::set<std::string> names;
    const char* value = std::getenv("EPIC_CUDA_TIMING_SKIP");
    std::stringstream list(value == nullptr ? "" : value);
    for (std::string name; std::getline(list, name, ',');) {
      if (!name.empty()) names.insert(name);
    }
    if (!names.empty())
      std::fprintf(stderr, "EPIC_CUDA_TIMING_SKIP is set: results are garbage (timing only)\n");
    return names;
  }();
  if (skipped.empty()) return false;
  return skipped.count(op) > 0 || skipped.count(std::string(op) + ":" + std::to_string(size)) > 0;
}

OpTiming::OpTiming() {
  const char* value = std::getenv("EPIC_CUDA_OP_TIMING");
  enabled_ = value != nullptr && std::strcmp(value, "0") != 0 && value[0] != '\0';
}

OpTiming::~OpTiming() { finish(); }

void OpTiming::finish() {
  if (!enabled_) return;
  enabled_ = false;  // once
  try {
    collect();
  } catch (...) {
    return;  // a broken context: nothing worth printing
  }
  for (const Pending& pending : pending_) {
    cudaEventDestroy(pending.start);
    cudaEventDestroy(pending.stop);
  }
  for (cudaEvent_t event : free_events_) cudaEventDestroy(event);
  if (totals_.empty()) return;
  std::vector<std::pair<std::string, Total>> rows(totals_.begin(), totals_.end());
  std::sort(rows.begin(), rows.end(),
            [](const auto& a, const auto& b) { return a.second.milliseconds > b.second.milliseconds; });
  double all = 0.0;
  for (const auto& row : rows) all += row.second.milliseconds;
  std::fprintf(stderr, "\nEPIC_CUDA_OP_TIMING: device time per op (events around each op, outside graphs)\n");
  std::fprintf(stderr, "%10s %12s %10s %6s  %s\n", "calls", "total ms", "mean us", "share", "op");
  for (const auto& [label, total] : rows) {
    std::fprintf(stderr, "%10lld %12.3f %10.2f %5.1f%%  %s\n", static_cast<long long>(total.calls),
                 total.milliseconds, 1000.0 * total.milliseconds / static_cast<double>(total.calls),
                 100.0 * total.milliseconds / all, label.c_str());
  }
  std::fprintf(stderr, "%10s %12.3f\n", "all", all);
}

cudaEvent_t OpTiming::take_event() {
  if (!free_events_.empty()) {
    cudaEvent_t event = free_events_.back();
    free_events_.pop_back();
    return event;
  }
  cudaEvent_t event = nullptr;
  EPIC_CUDA_CHECK(cudaEventCreate(&event));
  return event;
}

bool OpTiming::capturing(cudaStream_t stream) const {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  EPIC_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  return capture != cudaStreamCaptureStatusNone;
}

OpTiming::Scope OpTiming::begin(cudaStream_t stream, std::string label) {
  if (pending_.size() >= kMaxPending) collect();
  stream_ = stream;
  Pending pending{std::move(label), take_event(), take_event()};
  EPIC_CUDA_CHECK(cudaEventRecord(pending.start, stream));
  pending_.push_back(std::move(pending));
  return Scope(this, pending_.size() - 1);
}

void OpTiming::end(size_t index) {
  // A destructor path: a failed record only loses this sample.
  if (index < pending_.size()) cudaEventRecord(pending_[index].stop, stream_);
}

void OpTiming::collect() {
  if (stream_ != nullptr) EPIC_CUDA_CHECK(cudaStreamSynchronize(stream_));
  for (Pending& pending : pending_) {
    float milliseconds = 0.0f;
    if (cudaEventElapsedTime(&milliseconds, pending.start, pending.stop) == cudaSuccess) {
      Total& total = totals_[pending.label];
      ++total.calls;
      total.milliseconds += milliseconds;
    } else {
      cudaGetLastError();  // an op that threw before its stop: not counted
    }
    free_events_.push_back(pending.start);
    free_events_.push_back(pending.stop);
  }
  pending_.clear();
}

}  // namespace epic::cuda_kernels
