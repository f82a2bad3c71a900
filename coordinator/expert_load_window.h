// The per-expert and per-worker load of the last window for /metrics, from each rank's cumulative counts
// (a worker rank's StepDone::expert_rows / rows_per_rank, or the in-process engine's own
// worker/expert_load_counter.h): each report's difference to the rank's previous one is that rank's
// window (about a second: ranks report about once a second). Thread-safe: the scheduler notes, the HTTP
// thread writes the metrics.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

#include "coordinator/prometheus_text.h"

namespace epic {

class ExpertLoadWindow {
 public:
  using Clock = std::chrono::steady_clock;
  // `ranks` ranks whose counts start from zero at `now` (a new job): their first report's window starts then.
  void reset(int ranks, Clock::time_point now = Clock::now());
  // Rank `rank`'s cumulative counts at `now`: rows per (MoE layer, expert), and the rows its tokens sent to
  // each rank's experts (empty where rows_per_expert is what the rank's own experts computed).
  void note(int rank, const std::map<int64_t, std::vector<int64_t>>& rows_per_expert,
            const std::vector<int64_t>& rows_per_rank, Clock::time_point now = Clock::now());
  // epic_load_window_seconds, epic_worker_expert_rows_window{rank} (the rows each rank's experts computed)
  // and epic_expert_rows_window{layer, expert} (all ranks); nothing before a first report.
  void append_metrics(PrometheusText& out) const;

 private:
  struct Rank {
    Clock::time_point at{};
    std::map<int64_t, std::vector<int64_t>> per_expert, per_expert_window;
    std::vector<int64_t> per_rank, per_rank_window;
    double window_seconds = 0;
    bool reported = false;
  };
  mutable std::mutex mutex_;
  std::vector<Rank> ranks_;
};

}  // namespace epic
