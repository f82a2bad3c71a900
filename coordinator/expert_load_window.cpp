// Windows of the ranks' cumulative load counts (expert_load_window.h).
#include "coordinator/expert_load_window.h"

#include <algorithm>
#include <string>

namespace epic {
namespace {

// after - before, element by element (a missing earlier entry is 0; a count never goes back, but a
// negative difference would only come from a reset, so it reads as 0).
std::vector<int64_t> difference(const std::vector<int64_t>& after, const std::vector<int64_t>* before) {
  std::vector<int64_t> window(after.size(), 0);
  for (size_t i = 0; i < after.size(); ++i) {
    const int64_t earlier = before != nullptr && i < before->size() ? (*before)[i] : 0;
    window[i] = std::max<int64_t>(after[i] - earlier, 0);
  }
  return window;
}

void add_into(std::vector<int64_t>& total, const std::vector<int64_t>& rows) {
  total.resize(std::max(total.size(), rows.size()), 0);
  for (size_t i = 0; i < rows.size(); ++i) total[i] += rows[i];
}

}  // namespace

void ExpertLoadWindow::reset(int ranks, Clock::time_point now) {
  std::lock_guard<std::mutex> lock(mutex_);
  ranks_.assign(static_cast<size_t>(std::max(ranks, 0)), Rank{});
  for (Rank& rank : ranks_) rank.at = now;
}

void ExpertLoadWindow::note(int rank, const std::map<int64_t, std::vector<int64_t>>& rows_per_expert,
                            const std::vector<int64_t>& rows_per_rank, Clock::time_point now) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (rank < 0 || static_cast<size_t>(rank) >= ranks_.size()) return;
  Rank& r = ranks_[static_cast<size_t>(rank)];
  r.per_expert_window.clear();
  for (const auto& [layer, rows] : rows_per_expert) {
    const auto before = r.per_expert.find(layer);
    r.per_expert_window[layer] = difference(rows, before != r.per_expert.end() ? &before->second : nullptr);
  }
  r.per_rank_window = difference(rows_per_rank, &r.per_rank);
  r.window_seconds = std::chrono::duration<double>(now - r.at).count();
  r.at = now;
  r.per_expert = rows_per_expert;
  r.per_rank = rows_per_rank;
  r.reported = true;
}

void ExpertLoadWindow::append_metrics(PrometheusText& out) const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::map<int64_t, std::vector<int64_t>> by_expert;
  std::vector<int64_t> by_rank(ranks_.size(), 0), sent_to_rank;
  bool any = false, any_sent = false;
  double window_seconds = 0;
  for (size_t r = 0; r < ranks_.size(); ++r) {
    const Rank& rank = ranks_[r];
    if (!rank.reported) continue;
    any = true;
    for (const auto& [layer, rows] : rank.per_expert_window) {
      add_into(by_expert[layer], rows);
      for (int64_t n : rows) by_rank[r] += n;
    }
    if (!rank.per_rank.empty()) any_sent = true, add_into(sent_to_rank, rank.per_rank_window);
    window_seconds = std::max(window_seconds, rank.window_seconds);
  }
  if (!any) return;
  // Where the ranks count what their tokens routed, each rank's experts computed what every rank sent it.
  if (any_sent) {
    sent_to_rank.resize(ranks_.size(), 0);
    by_rank = sent_to_rank;
  }
  out.single("epic_load_window_seconds", "gauge",
             "The window the per-expert and per-worker rows below cover.", window_seconds);
  out.family("epic_worker_expert_rows_window", "gauge",
             "Token rows each worker rank's experts computed in the window.");
  for (size_t r = 0; r < by_rank.size(); ++r)
    out.sample("epic_worker_expert_rows_window", prometheus_label("rank", std::to_string(r)),
               double(by_rank[r]));
  out.family("epic_expert_rows_window", "gauge",
             "Token rows each (MoE layer, expert) computed in the window, all ranks.");
  for (const auto& [layer, rows] : by_expert)
    for (size_t e = 0; e < rows.size(); ++e)
      out.sample("epic_expert_rows_window",
                 "{layer=\"" + std::to_string(layer) + "\",expert=\"" + std::to_string(e) + "\"}",
                 double(rows[e]));
}

}  // namespace epic
