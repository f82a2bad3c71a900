// coordinator/expert_load_window: each rank's window is the difference of its last two cumulative reports,
// per expert summed over the ranks; the per-worker rows are what each rank's own experts computed (its own
// per-expert rows, or, where ranks count what their tokens sent, the column sums of rows_per_rank); and the
// metrics are valid Prometheus lines with those numbers.
#include "coordinator/expert_load_window.h"

#include <gtest/gtest.h>

#include <random>
#include <string>

namespace epic {
namespace {

using Clock = ExpertLoadWindow::Clock;

std::string metrics(const ExpertLoadWindow& window) {
  PrometheusText out;
  window.append_metrics(out);
  return out.take();
}

bool has_line(const std::string& text, const std::string& line) {
  return text.find("\n" + line + "\n") != std::string::npos || text.rfind(line + "\n", 0) == 0;
}

TEST(ExpertLoadWindow, NothingBeforeAFirstReport) {
  ExpertLoadWindow window;
  window.reset(2);
  EXPECT_EQ(metrics(window), "");
}

TEST(ExpertLoadWindow, WindowsAreDifferencesSummedOverRanksAndWorkersCountTheirOwnRows) {
  std::mt19937_64 rng(std::random_device{}());
  std::uniform_int_distribution<int64_t> rows(0, 1000);
  const Clock::time_point start = Clock::now();
  ExpertLoadWindow window;
  window.reset(2, start);
  // Two reports per rank; the window is the second minus the first.
  const std::vector<int64_t> a0{rows(rng), rows(rng), rows(rng)}, b0{rows(rng), rows(rng), rows(rng)};
  std::vector<int64_t> a1 = a0, b1 = b0;
  for (int64_t& n : a1) n += rows(rng);
  for (int64_t& n : b1) n += rows(rng);
  window.note(0, {{1, a0}}, {}, start + std::chrono::milliseconds(1000));
  window.note(1, {{1, b0}}, {}, start + std::chrono::milliseconds(1100));
  window.note(0, {{1, a1}}, {}, start + std::chrono::milliseconds(2000));
  window.note(1, {{1, b1}}, {}, start + std::chrono::milliseconds(2500));
  const std::string text = metrics(window);
  SCOPED_TRACE(text);
  int64_t rank0 = 0, rank1 = 0;
  for (size_t e = 0; e < 3; ++e) {
    const int64_t expected = (a1[e] - a0[e]) + (b1[e] - b0[e]);
    EXPECT_TRUE(has_line(text, "epic_expert_rows_window{layer=\"1\",expert=\"" + std::to_string(e) + "\"} " +
                                   std::to_string(expected)));
    rank0 += a1[e] - a0[e];
    rank1 += b1[e] - b0[e];
  }
  EXPECT_TRUE(has_line(text, "epic_worker_expert_rows_window{rank=\"0\"} " + std::to_string(rank0)));
  EXPECT_TRUE(has_line(text, "epic_worker_expert_rows_window{rank=\"1\"} " + std::to_string(rank1)));
  EXPECT_TRUE(has_line(text, "epic_load_window_seconds 1.3999999999999999") ||
              has_line(text, "epic_load_window_seconds 1.4"));
}

TEST(ExpertLoadWindow, RanksThatCountWhatTheySentGiveEachRankTheRowsSentToIt) {
  const Clock::time_point start = Clock::now();
  ExpertLoadWindow window;
  window.reset(2, start);
  // Rank 0's tokens sent 5 rows to rank 0 and 7 to rank 1; rank 1's sent 2 and 11 (after a first report).
  window.note(0, {{0, {1, 1}}}, {1, 1}, start);
  window.note(0, {{0, {4, 10}}}, {6, 8}, start + std::chrono::seconds(1));
  window.note(1, {{0, {0, 13}}}, {2, 11}, start + std::chrono::seconds(1));
  const std::string text = metrics(window);
  SCOPED_TRACE(text);
  EXPECT_TRUE(has_line(text, "epic_worker_expert_rows_window{rank=\"0\"} 7"));
  EXPECT_TRUE(has_line(text, "epic_worker_expert_rows_window{rank=\"1\"} 18"));
  EXPECT_TRUE(has_line(text, "epic_expert_rows_window{layer=\"0\",expert=\"0\"} 3"));
  EXPECT_TRUE(has_line(text, "epic_expert_rows_window{layer=\"0\",expert=\"1\"} 22"));
  // A new job starts from zero: nothing until it reports.
  window.reset(2, start + std::chrono::seconds(2));
  EXPECT_EQ(metrics(window), "");
}

}  // namespace
}  // namespace epic
