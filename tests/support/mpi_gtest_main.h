// The gtest harness of test programs that run under mpirun themselves (one process per rank): an
// environment owning the MPI communicator for the whole program (and so MPI's lifetime), a quiet
// printer for ranks other than 0 that still prints their failures with the rank, and a main whose
// exit code is non-zero on every rank when any rank failed.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "comm/mpi_communicator.h"

namespace epic::testing {

class MpiGtestEnvironment : public ::testing::Environment {
 public:
  explicit MpiGtestEnvironment(double timeout_seconds)
      : comm_(std::make_unique<MpiCommunicator>(CommOptions{timeout_seconds})) {
    instance_ = this;
  }
  void TearDown() override {
    // Every rank learns which ranks failed, so every rank exits non-zero and rank 0 names them.
    const std::vector<int32_t> failed =
        comm_->all_gather_value<int32_t>(::testing::UnitTest::GetInstance()->Failed() ? 1 : 0);
    std::string failed_ranks;
    for (size_t rank = 0; rank < failed.size(); ++rank)
      if (failed[rank]) failed_ranks += (failed_ranks.empty() ? "" : ", ") + std::to_string(rank);
    any_rank_failed_ = !failed_ranks.empty();
    if (comm_->rank() == 0)
      std::printf("[ MPI      ] %d ranks; %s\n", comm_->size(),
                  any_rank_failed_ ? ("FAILED on rank(s) " + failed_ranks).c_str() : "passed on every rank");
    comm_.reset();  // MPI_Finalize
  }
  static MpiCommunicator& comm() { return *instance_->comm_; }
  bool any_rank_failed() const { return any_rank_failed_; }

 private:
  static inline MpiGtestEnvironment* instance_ = nullptr;
  std::unique_ptr<MpiCommunicator> comm_;
  bool any_rank_failed_ = false;
};

// Replaces gtest's printer on ranks other than 0: quiet, except that failures print with the rank.
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  // The test's name is kept here: UnitTest::current_test_info() would deadlock inside OnTestPartResult.
  void OnTestStart(const ::testing::TestInfo& test) override {
    test_name_ = std::string(test.test_suite_name()) + "." + test.name();
  }
  void OnTestEnd(const ::testing::TestInfo&) override { test_name_ = "(outside a test)"; }
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::fprintf(stderr, "[rank %d] %s: %s:%d: Failure\n%s\n", rank_, test_name_.c_str(),
                 result.file_name() ? result.file_name() : "unknown file", result.line_number(),
                 result.message());
  }

 private:
  int rank_;
  std::string test_name_ = "(outside a test)";
};

// The body of such a program's main.
inline int run_mpi_gtests(int argc, char** argv, double timeout_seconds) {
  ::testing::InitGoogleTest(&argc, argv);
  // Created here, not in SetUp, because the listeners below need the rank; gtest owns and deletes it.
  auto* environment = new MpiGtestEnvironment(timeout_seconds);
  ::testing::AddGlobalTestEnvironment(environment);
  const int rank = MpiGtestEnvironment::comm().rank();
  if (rank != 0) {
    ::testing::TestEventListeners& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(rank));
  }
  const int status = RUN_ALL_TESTS();
  return status != 0 || environment->any_rank_failed() ? 1 : 0;
}

}  // namespace epic::testing
