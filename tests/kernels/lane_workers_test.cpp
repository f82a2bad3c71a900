// kernels/cuda/lane_workers.h, the side lanes' host threads of the per-expert GEMM loop: every lane
// of a run is called once (lane 0 on the caller, lane i on worker i - 1, the same thread run after
// run), all at once; what the lanes wrote is visible when run returns; an exception from any lane
// comes back on the caller after every lane has finished (the caller's first, then lane order);
// the destructor joins the threads.
#include "kernels/cuda/lane_workers.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <iostream>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "kernels/error.h"
#include "tests/support/expect_error.h"

namespace epic::cuda_kernels {
namespace {

using namespace std::chrono_literals;

constexpr int kWorkers = 3;
constexpr auto kRendezvousTimeout = 10s;  // a bound on every wait of these tests

// Fresh values each run; the seed is printed so a failure can be replayed.
std::vector<int64_t> random_values(size_t count) {
  const uint64_t seed = std::random_device{}();
  std::cout << "lane_workers_test seed " << seed << "\n";
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> value(-1000000, 1000000);
  std::vector<int64_t> values(count);
  for (int64_t& v : values) v = value(rng);
  return values;
}

// Lane l sums its slice [l * kSlice, (l + 1) * kSlice) of the values into sums[l] (plain memory,
// no atomics: run's return must make it visible) and records its thread and how often it ran.
struct SliceSums {
  static constexpr size_t kSlice = 1000;
  explicit SliceSums(int lanes)
      : values(random_values(lanes * kSlice)), sums(lanes, 0), calls(lanes, 0), threads(lanes) {}
  void run_lane(int lane) {
    int64_t sum = 0;
    for (size_t i = 0; i < kSlice; ++i) sum += values[lane * kSlice + i];
    sums[lane] = sum;
    ++calls[lane];
    threads[lane] = std::this_thread::get_id();
  }
  int64_t expected_sum(int lane) const {
    int64_t sum = 0;
    for (size_t i = 0; i < kSlice; ++i) sum += values[lane * kSlice + i];
    return sum;
  }
  std::vector<int64_t> values, sums;
  std::vector<int> calls;
  std::vector<std::thread::id> threads;
};

TEST(LaneWorkers, EveryLaneRunsOnceAndItsResultsAreVisibleAfterRun) {
  LaneWorkers workers(kWorkers);
  ASSERT_EQ(workers.size(), kWorkers);
  SliceSums job(kWorkers + 1);
  workers.run(kWorkers, [&](int lane) { job.run_lane(lane); });
  for (int lane = 0; lane <= kWorkers; ++lane) {
    EXPECT_EQ(job.calls[lane], 1) << "lane " << lane;
    EXPECT_EQ(job.sums[lane], job.expected_sum(lane)) << "lane " << lane;
  }
  EXPECT_EQ(job.threads[0], std::this_thread::get_id()) << "lane 0 runs on the calling thread";
  for (int lane = 1; lane <= kWorkers; ++lane) {
    EXPECT_NE(job.threads[lane], std::this_thread::get_id()) << "lane " << lane;
    for (int other = 1; other < lane; ++other) EXPECT_NE(job.threads[lane], job.threads[other]);
  }
}

TEST(LaneWorkers, WorkersPersistAcrossRunsAndFewerSideLanesLeaveTheRestIdle) {
  LaneWorkers workers(kWorkers);
  SliceSums first(kWorkers + 1);
  workers.run(kWorkers, [&](int lane) { first.run_lane(lane); });
  SliceSums second(kWorkers + 1);
  workers.run(1, [&](int lane) { second.run_lane(lane); });  // lanes 0 and 1 only
  EXPECT_EQ(second.calls, (std::vector<int>{1, 1, 0, 0}));
  EXPECT_EQ(second.sums[1], second.expected_sum(1));
  EXPECT_EQ(second.threads[1], first.threads[1]) << "lane 1 is the same worker thread in every run";
  SliceSums third(kWorkers + 1);
  workers.run(kWorkers, [&](int lane) { third.run_lane(lane); });
  for (int lane = 1; lane <= kWorkers; ++lane) EXPECT_EQ(third.threads[lane], first.threads[lane]);
  SliceSums alone(1);
  workers.run(0, [&](int lane) { alone.run_lane(lane); });
  EXPECT_EQ(alone.calls[0], 1);
  EXPECT_EQ(alone.sums[0], alone.expected_sum(0));
}

// Each lane waits (bounded) until every lane has arrived: only lanes that run at once all arrive.
TEST(LaneWorkers, LanesRunAtOnce) {
  LaneWorkers workers(kWorkers);
  std::mutex mutex;
  std::condition_variable arrived;
  int count = 0;
  std::vector<int> saw_all(kWorkers + 1, 0);
  workers.run(kWorkers, [&](int lane) {
    std::unique_lock<std::mutex> lock(mutex);
    ++count;
    arrived.notify_all();
    saw_all[lane] = arrived.wait_for(lock, kRendezvousTimeout, [&] { return count == kWorkers + 1; });
  });
  EXPECT_EQ(saw_all, std::vector<int>(kWorkers + 1, 1));
}

// Lanes 1 and 3 throw; the others take a while, so the throw lands before they finish.
TEST(LaneWorkers, AWorkersExceptionComesBackAfterEveryLaneFinished) {
  LaneWorkers workers(kWorkers);
  std::vector<int> finished(kWorkers + 1, 0);
  const auto job = [&](int lane) {
    if (lane == 1 || lane == 3) throw std::runtime_error("lane " + std::to_string(lane));
    std::this_thread::sleep_for(50ms);
    finished[lane] = 1;
  };
  try {
    workers.run(kWorkers, job);
    ADD_FAILURE() << "run returned, but lanes 1 and 3 threw";
  } catch (const std::runtime_error& error) {
    EXPECT_STREQ(error.what(), "lane 1") << "the first in lane order";
  }
  EXPECT_EQ(finished, (std::vector<int>{1, 0, 1, 0}));
  // The pool is whole after a failed run.
  SliceSums after(kWorkers + 1);
  workers.run(kWorkers, [&](int lane) { after.run_lane(lane); });
  for (int lane = 0; lane <= kWorkers; ++lane) EXPECT_EQ(after.sums[lane], after.expected_sum(lane));
}

TEST(LaneWorkers, TheCallersExceptionComesFirstAndErrorsKeepTheirType) {
  LaneWorkers workers(kWorkers);
  std::atomic<int> finished{0};
  const auto job = [&](int lane) {
    if (lane == 0) throw Error(ErrorCode::kInvalidArgument, "lane 0 failed");
    if (lane == 2) throw Error(ErrorCode::kInternal, "lane 2 failed");
    std::this_thread::sleep_for(50ms);
    ++finished;
  };
  testing::expect_error([&] { workers.run(kWorkers, job); }, ErrorCode::kInvalidArgument, {"lane 0 failed"});
  EXPECT_EQ(finished.load(), 2) << "lanes 1 and 3 finished before run returned";
  const auto side_only = [&](int lane) {
    if (lane == 2) throw Error(ErrorCode::kInternal, "lane 2 failed");
  };
  testing::expect_error([&] { workers.run(kWorkers, side_only); }, ErrorCode::kInternal, {"lane 2 failed"});
}

TEST(LaneWorkers, MoreSideLanesThanWorkersIsRefused) {
  LaneWorkers workers(2);
  bool called = false;
  const auto job = [&](int) { called = true; };
  testing::expect_error([&] { workers.run(3, job); }, ErrorCode::kInternal, {"3 side lanes", "2 workers"});
  testing::expect_error([&] { workers.run(-1, job); }, ErrorCode::kInternal, {"-1 side lanes"});
  EXPECT_FALSE(called);
}

// A thread_local's destructor runs as its thread exits; join() returns only after that. So when
// the destructor has returned, every worker that ran a job must have counted itself out.
std::atomic<int> g_exited_workers{0};
struct CountsExit {
  bool armed = false;
  ~CountsExit() {
    if (armed) ++g_exited_workers;
  }
};
thread_local CountsExit t_counts_exit;

TEST(LaneWorkers, TheDestructorJoinsEveryWorker) {
  g_exited_workers = 0;
  {
    LaneWorkers workers(kWorkers);
    workers.run(kWorkers, [](int lane) {
      if (lane != 0) t_counts_exit.armed = true;
    });
    EXPECT_EQ(g_exited_workers.load(), 0) << "workers stay alive between runs";
  }
  EXPECT_EQ(g_exited_workers.load(), kWorkers);
}

}  // namespace
}  // namespace epic::cuda_kernels
