// MpiCommunicator under mpirun (CTest runs it with 1, 2, 3 and 5 ranks). Every element carries who sent
// it to whom: rank s sends rank d pair_count(s, d) values pair_value(s, d, i), so each received element
// and each byte counter has one exact expected value. Only rank 0 prints; any rank's failure fails all.
#include "comm/mpi_communicator.h"

#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm/mpi_check.h"
#include "kernels/error.h"

namespace epic {
namespace {

// Generous: a wrong test should fail by its checks, not by a timeout; CTest's TIMEOUT bounds the run.
constexpr double kTestTimeoutSeconds = 30.0;
// The timeout test's deliberately short wait.
constexpr double kShortTimeoutSeconds = 0.5;

// Elements rank `source` sends rank `destination`: uneven, zero for some pairs at every rank count
// (0 -> 1 always) and for the own block of rank 3 with 5 ranks.
int64_t pair_count(int source, int destination) { return (source * source + 3 * destination + 2) % 5; }
// For the timeout test: no pair is empty, so no rank can finish an exchange without every peer.
int64_t full_pair_count(int source, int destination) { return 1 + (source + 2 * destination) % 3; }
using PairCount = int64_t (*)(int source, int destination);
int32_t pair_value(int source, int destination, int64_t index) {
  return static_cast<int32_t>(source * 1000000 + destination * 1000 + index);
}

// The environment owns the communicator (and so MPI's lifetime) for the whole test program.
class CommEnvironment : public ::testing::Environment {
 public:
  CommEnvironment() {
    comm_ = std::make_unique<MpiCommunicator>(CommOptions{kTestTimeoutSeconds});
    instance_ = this;
  }
  void TearDown() override {
    // Every rank learns which ranks failed, so every rank exits non-zero and rank 0 can name them.
    const int32_t failed_here = ::testing::UnitTest::GetInstance()->Failed() ? 1 : 0;
    const std::vector<int32_t> failed = comm_->all_gather_value(failed_here);
    std::string failed_ranks;
    for (size_t rank = 0; rank < failed.size(); ++rank) {
      if (failed[rank]) failed_ranks += (failed_ranks.empty() ? "" : ", ") + std::to_string(rank);
    }
    any_rank_failed_ = !failed_ranks.empty();
    if (comm_->rank() == 0) {
      std::printf("[ MPI      ] %d ranks; %s\n", comm_->size(),
                  any_rank_failed_ ? ("FAILED on rank(s) " + failed_ranks).c_str() : "passed on every rank");
    }
    comm_.reset();  // MPI_Finalize
  }
  static MpiCommunicator& comm() { return *instance_->comm_; }
  bool any_rank_failed() const { return any_rank_failed_; }

 private:
  static CommEnvironment* instance_;
  std::unique_ptr<MpiCommunicator> comm_;
  bool any_rank_failed_ = false;
};
CommEnvironment* CommEnvironment::instance_ = nullptr;

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

class MpiCommTest : public ::testing::Test {
 protected:
  void SetUp() override {
    rank_ = comm().rank();
    size_ = comm().size();
    sent_before_ = comm().bytes_sent();
    received_before_ = comm().bytes_received();
  }
  // Keeps the ranks in step: no test starts while another rank is still in the previous one.
  void TearDown() override { comm().barrier(); }

  static MpiCommunicator& comm() { return CommEnvironment::comm(); }
  uint64_t sent_in_test() const { return comm().bytes_sent() - sent_before_; }
  uint64_t received_in_test() const { return comm().bytes_received() - received_before_; }
  // Bytes of pair_count blocks this rank sends to / receives from the other ranks.
  uint64_t pair_bytes_sent(size_t element_bytes, PairCount count = pair_count) const {
    uint64_t bytes = 0;
    for (int peer = 0; peer < size_; ++peer) {
      if (peer != rank_) bytes += count(rank_, peer) * element_bytes;
    }
    return bytes;
  }
  uint64_t pair_bytes_received(size_t element_bytes, PairCount count = pair_count) const {
    uint64_t bytes = 0;
    for (int peer = 0; peer < size_; ++peer) {
      if (peer != rank_) bytes += count(peer, rank_) * element_bytes;
    }
    return bytes;
  }
  // This rank's send data in rank order with its counts.
  std::vector<int32_t> pair_send_data(std::vector<int64_t>* counts, PairCount count = pair_count) const {
    std::vector<int32_t> data;
    counts->assign(size_, 0);
    for (int destination = 0; destination < size_; ++destination) {
      (*counts)[destination] = count(rank_, destination);
      for (int64_t i = 0; i < (*counts)[destination]; ++i) data.push_back(pair_value(rank_, destination, i));
    }
    return data;
  }
  // Counts the elements of `received` (blocks in source rank order) that differ from pair_value.
  int64_t count_wrong_received(const std::vector<int32_t>& received, PairCount count = pair_count) const {
    int64_t wrong = 0;
    size_t position = 0;
    for (int source = 0; source < size_; ++source) {
      for (int64_t i = 0; i < count(source, rank_); ++i, ++position) {
        if (position >= received.size() || received[position] != pair_value(source, rank_, i)) {
          if (wrong++ < 5) {
            ADD_FAILURE() << "element " << i << " from rank " << source << ": expected "
                          << pair_value(source, rank_, i) << ", got "
                          << (position < received.size() ? std::to_string(received[position]) : "nothing");
          }
        }
      }
    }
    EXPECT_EQ(position, received.size()) << "received more elements than were sent";
    return wrong;
  }

  int rank_ = 0;
  int size_ = 0;
  uint64_t sent_before_ = 0;
  uint64_t received_before_ = 0;
};

// Runs `call`, expects Error with `code` whose message contains every one of `needles`.
template <typename Call>
void expect_error(Call&& call, ErrorCode code, const std::vector<std::string>& needles) {
  try {
    call();
    ADD_FAILURE() << "expected Error(" << error_code_name(code) << ")";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), code) << error.what();
    for (const std::string& needle : needles) {
      EXPECT_NE(std::string(error.what()).find(needle), std::string::npos)
          << "missing '" << needle << "' in: " << error.what();
    }
  }
}

TEST_F(MpiCommTest, RanksAreTheWorld) {
  EXPECT_EQ(comm().name(), "mpi");
  EXPECT_TRUE(launched_under_mpi());
  ASSERT_NE(std::getenv("OMPI_COMM_WORLD_SIZE"), nullptr);
  EXPECT_EQ(size_, std::atoi(std::getenv("OMPI_COMM_WORLD_SIZE")));
  std::vector<int32_t> expected(size_);
  std::iota(expected.begin(), expected.end(), 0);
  EXPECT_EQ(comm().all_gather_value<int32_t>(rank_), expected);
  // A duplicate of the world, not the world itself: our traffic never matches anyone else's.
  int comparison = MPI_UNEQUAL;
  EPIC_MPI_CHECK(MPI_Comm_compare(comm().mpi_comm(), MPI_COMM_WORLD, &comparison));
  EXPECT_EQ(comparison, MPI_CONGRUENT);

  // MPI is initialised now, so make_communicator gives MPI too; it does not own MPI's lifetime.
  const std::unique_ptr<Communicator> second = make_communicator(CommOptions{kTestTimeoutSeconds});
  EXPECT_EQ(second->name(), "mpi");
  EXPECT_EQ(second->rank(), rank_);
  EXPECT_EQ(second->size(), size_);
  second->barrier();
}

TEST_F(MpiCommTest, AllToAllVBytesHonoursOffsets) {
  // Send side: blocks in reverse destination order, one filler element before each. Receive side: blocks
  // in source order, two sentinels before each, that must survive.
  constexpr int32_t kFiller = -1;
  constexpr int32_t kSentinel = -7;
  const int64_t word = sizeof(int32_t);
  std::vector<int32_t> send;
  std::vector<int64_t> send_bytes(size_), send_offsets(size_);
  for (int destination = size_ - 1; destination >= 0; --destination) {
    send.push_back(kFiller);
    send_offsets[destination] = static_cast<int64_t>(send.size()) * word;
    send_bytes[destination] = pair_count(rank_, destination) * word;
    for (int64_t i = 0; i < pair_count(rank_, destination); ++i)
      send.push_back(pair_value(rank_, destination, i));
  }
  std::vector<int64_t> recv_bytes(size_), recv_offsets(size_);
  int64_t recv_elements = 0;
  for (int source = 0; source < size_; ++source) {
    recv_elements += 2;
    recv_offsets[source] = recv_elements * word;
    recv_bytes[source] = pair_count(source, rank_) * word;
    recv_elements += pair_count(source, rank_);
  }
  std::vector<int32_t> recv(recv_elements, kSentinel);

  comm().all_to_all_v(send.data(), send_bytes, send_offsets, recv.data(), recv_bytes, recv_offsets);

  int64_t wrong = 0;
  for (int source = 0; source < size_; ++source) {
    const int64_t first = recv_offsets[source] / word;
    wrong += (recv[first - 2] != kSentinel) + (recv[first - 1] != kSentinel);
    for (int64_t i = 0; i < pair_count(source, rank_); ++i)
      wrong += recv[first + i] != pair_value(source, rank_, i);
  }
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(sent_in_test(), pair_bytes_sent(word));
  EXPECT_EQ(received_in_test(), pair_bytes_received(word));
}

TEST_F(MpiCommTest, TypedAllToAllVExchangesCountsAndRoundTrips) {
  std::vector<int64_t> send_counts;
  const std::vector<int32_t> send = pair_send_data(&send_counts);
  std::vector<int64_t> recv_counts;
  const std::vector<int32_t> received =
      comm().all_to_all_v(std::span<const int32_t>(send), send_counts, &recv_counts);
  ASSERT_EQ(recv_counts.size(), static_cast<size_t>(size_));
  for (int source = 0; source < size_; ++source) EXPECT_EQ(recv_counts[source], pair_count(source, rank_));
  EXPECT_EQ(count_wrong_received(received), 0);
  // The counts exchange moves one int64 per pair, then the data.
  const uint64_t count_bytes = sizeof(int64_t) * (size_ - 1);
  EXPECT_EQ(sent_in_test(), count_bytes + pair_bytes_sent(sizeof(int32_t)));
  EXPECT_EQ(received_in_test(), count_bytes + pair_bytes_received(sizeof(int32_t)));

  // The reverse exchange with known counts gives every rank its own data back, as a combine does.
  const std::vector<int32_t> returned =
      comm().all_to_all_v_known(std::span<const int32_t>(received), recv_counts, send_counts);
  EXPECT_EQ(returned, send);
  const uint64_t data_bytes = pair_bytes_sent(sizeof(int32_t)) + pair_bytes_received(sizeof(int32_t));
  EXPECT_EQ(sent_in_test(), count_bytes + data_bytes);
  EXPECT_EQ(received_in_test(), count_bytes + data_bytes);
}

TEST_F(MpiCommTest, LargeAllToAllVIsExact) {
  // About 0.5 MiB per pair: past the eager limit, so the rendezvous path runs under the polling wait.
  auto large_count = [](int source, int destination) -> int64_t {
    return 65536 + source * 7 + destination * 13;
  };
  auto large_value = [](int source, int destination, int64_t index) -> int64_t {
    return source * 1000000000LL + destination * 1000000LL + index;
  };
  std::vector<int64_t> send_counts(size_);
  std::vector<int64_t> send;
  for (int destination = 0; destination < size_; ++destination) {
    send_counts[destination] = large_count(rank_, destination);
    for (int64_t i = 0; i < send_counts[destination]; ++i) send.push_back(large_value(rank_, destination, i));
  }
  std::vector<int64_t> recv_counts(size_);
  for (int source = 0; source < size_; ++source) recv_counts[source] = large_count(source, rank_);
  const std::vector<int64_t> received =
      comm().all_to_all_v_known(std::span<const int64_t>(send), send_counts, recv_counts);
  int64_t wrong = 0;
  size_t position = 0;
  for (int source = 0; source < size_; ++source) {
    for (int64_t i = 0; i < recv_counts[source]; ++i, ++position) {
      wrong += position >= received.size() || received[position] != large_value(source, rank_, i);
    }
  }
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(position, received.size());
  uint64_t expected_sent = 0, expected_received = 0;
  for (int peer = 0; peer < size_; ++peer) {
    if (peer == rank_) continue;
    expected_sent += large_count(rank_, peer) * sizeof(int64_t);
    expected_received += large_count(peer, rank_) * sizeof(int64_t);
  }
  EXPECT_EQ(sent_in_test(), expected_sent);
  EXPECT_EQ(received_in_test(), expected_received);
}

TEST_F(MpiCommTest, AllGatherBytes) {
  const std::vector<int32_t> mine = {rank_ * 1000, rank_ * 1000 + 1, rank_ * 1000 + 2};
  std::vector<int32_t> gathered(3 * size_, -1);
  comm().all_gather(mine.data(), 3 * sizeof(int32_t), gathered.data());
  for (int source = 0; source < size_; ++source) {
    for (int i = 0; i < 3; ++i)
      EXPECT_EQ(gathered[3 * source + i], source * 1000 + i) << "from rank " << source;
  }
  comm().all_gather(nullptr, 0, nullptr);  // empty contributions are legal
  EXPECT_EQ(sent_in_test(), 3 * sizeof(int32_t) * (size_ - 1));
  EXPECT_EQ(received_in_test(), 3 * sizeof(int32_t) * (size_ - 1));
}

TEST_F(MpiCommTest, AllGatherValueOfAStruct) {
  struct Load {
    int32_t rank;
    double tokens;
  };
  const std::vector<Load> loads = comm().all_gather_value(Load{rank_, rank_ * 1.5 + 0.25});
  ASSERT_EQ(loads.size(), static_cast<size_t>(size_));
  for (int source = 0; source < size_; ++source) {
    EXPECT_EQ(loads[source].rank, source);
    EXPECT_EQ(loads[source].tokens, source * 1.5 + 0.25);
  }
  EXPECT_EQ(sent_in_test(), sizeof(Load) * (size_ - 1));
  EXPECT_EQ(received_in_test(), sizeof(Load) * (size_ - 1));
}

TEST_F(MpiCommTest, AllGatherVUnevenWithEmpty) {
  auto gather_count = [](int rank) -> int64_t { return (rank * 2) % 5; };  // rank 0 contributes nothing
  std::vector<int32_t> mine;
  for (int64_t i = 0; i < gather_count(rank_); ++i) mine.push_back(rank_ * 1000 + static_cast<int32_t>(i));
  const std::vector<std::vector<int32_t>> gathered = comm().all_gather_v(std::span<const int32_t>(mine));
  ASSERT_EQ(gathered.size(), static_cast<size_t>(size_));
  uint64_t expected_received = 0;
  for (int source = 0; source < size_; ++source) {
    ASSERT_EQ(static_cast<int64_t>(gathered[source].size()), gather_count(source)) << "from rank " << source;
    for (int64_t i = 0; i < gather_count(source); ++i) EXPECT_EQ(gathered[source][i], source * 1000 + i);
    if (source != rank_) expected_received += gather_count(source) * sizeof(int32_t);
  }
  // The sizes go first as one int64 per rank.
  EXPECT_EQ(sent_in_test(),
            sizeof(int64_t) * (size_ - 1) + gather_count(rank_) * sizeof(int32_t) * (size_ - 1));
  EXPECT_EQ(received_in_test(), sizeof(int64_t) * (size_ - 1) + expected_received);
}

TEST_F(MpiCommTest, BroadcastFromTheLastRank) {
  const int root = size_ - 1;  // a non-zero root whenever there are two ranks or more
  std::vector<double> data(5, std::nan(""));
  if (rank_ == root) {
    for (int i = 0; i < 5; ++i) data[i] = root * 10 + i + 0.5;
  }
  comm().broadcast(data.data(), data.size() * sizeof(double), root);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(data[i], root * 10 + i + 0.5);
  const uint64_t bytes = 5 * sizeof(double);
  EXPECT_EQ(sent_in_test(), rank_ == root ? bytes * (size_ - 1) : 0);
  EXPECT_EQ(received_in_test(), rank_ == root ? 0 : bytes);
}

TEST_F(MpiCommTest, BroadcastBytesOfABinaryString) {
  const int root = 1 % size_;
  std::string binary;
  for (int byte = 0; byte < 256; ++byte) binary.push_back(static_cast<char>(byte));
  binary += std::string("\0\0end\0", 6);
  const std::string result =
      comm().broadcast_bytes(rank_ == root ? binary : std::string("not the root"), root);
  EXPECT_EQ(result.size(), binary.size());
  EXPECT_EQ(result, binary);
  // The length (one int64) goes first.
  const uint64_t bytes = sizeof(int64_t) + binary.size();
  EXPECT_EQ(sent_in_test(), rank_ == root ? bytes * (size_ - 1) : 0);
  EXPECT_EQ(received_in_test(), rank_ == root ? 0 : bytes);
}

TEST_F(MpiCommTest, BadArgumentsFailLocallyBeforeAnyCollective) {
  // Every rank makes the same bad calls; none may start a collective (nobody would match it).
  std::vector<char> buffer(16);
  const std::vector<int64_t> zeros(size_, 0);
  const std::vector<int64_t> too_few(size_ + 1, 0);
  expect_error([&] { comm().all_to_all_v(buffer.data(), too_few, zeros, buffer.data(), zeros, zeros); },
               ErrorCode::kInvalidArgument, {"rank " + std::to_string(rank_), "send_bytes has"});
  std::vector<int64_t> self_mismatch(size_, 0);
  self_mismatch[rank_] = 4;
  expect_error([&] { comm().all_to_all_v(buffer.data(), self_mismatch, zeros, buffer.data(), zeros, zeros); },
               ErrorCode::kInvalidArgument, {"sends 4 bytes to itself but expects to receive 0"});
  expect_error([&] { comm().broadcast(buffer.data(), 4, size_); }, ErrorCode::kInvalidArgument,
               {"root " + std::to_string(size_)});
  expect_error([&] { comm().all_gather(nullptr, 3000000000LL, nullptr); }, ErrorCode::kCommunication,
               {"3000000000 bytes", "fewer tokens per step"});
  if (size_ > 1) {
    // More than an int of bytes to one peer: MPI counts are int.
    const int peer = (rank_ + 1) % size_;
    std::vector<int64_t> huge(size_, 0);
    huge[peer] = 3000000000LL;
    expect_error([&] { comm().all_to_all_v(nullptr, huge, zeros, buffer.data(), zeros, zeros); },
                 ErrorCode::kCommunication,
                 {"rank " + std::to_string(rank_) + ": all_to_all_v would send rank " + std::to_string(peer),
                  "3000000000 bytes", "fewer tokens per step"});
  }
  expect_error([&] { comm().set_timeout_seconds(0.0); }, ErrorCode::kInvalidArgument, {"timeout_seconds"});
  expect_error([&] { MpiCommunicator never_built(CommOptions{-1.0}); }, ErrorCode::kInvalidArgument,
               {"timeout_seconds must be a positive number of seconds, got -1"});
  EXPECT_EQ(comm().options().timeout_seconds, kTestTimeoutSeconds);
  EXPECT_FALSE(comm().has_pending_operation());
  EXPECT_EQ(sent_in_test(), 0u);
  EXPECT_EQ(received_in_test(), 0u);
}

TEST_F(MpiCommTest, MpiCheckNamesStatementPlaceRankAndMpiError) {
  // A negative count is rejected by MPI itself; the communicator's MPI_ERRORS_RETURN hands it back to us.
  expect_error([&] { EPIC_MPI_CHECK(MPI_Send(nullptr, -1, MPI_BYTE, 0, 0, comm().mpi_comm())); },
               ErrorCode::kCommunication,
               {"MPI_Send(nullptr, -1, MPI_BYTE, 0, 0, comm().mpi_comm())",
                "mpi_communicator_test.cpp:", "rank " + std::to_string(rank_), "MPI_ERR_COUNT"});
}

TEST_F(MpiCommTest, TimeoutNamesRankAndOperationThenRanksResynchronise) {
  if (size_ < 2) GTEST_SKIP() << "needs a peer that stays away";
  // Its own communicator with a short timeout (a separate MPI context, so the main one is unaffected).
  // Rank 0, which joins late, keeps a long timeout: only the others are meant to time out.
  MpiCommunicator short_comm(CommOptions{rank_ == 0 ? kTestTimeoutSeconds : kShortTimeoutSeconds});
  std::vector<int64_t> send_counts;
  // Every pair non-empty: MPI may complete a collective locally when a rank needs nothing from the
  // missing peer, and then there would be nothing to time out.
  const std::vector<int32_t> send = pair_send_data(&send_counts, full_pair_count);
  std::vector<int64_t> recv_counts(size_);
  for (int source = 0; source < size_; ++source) recv_counts[source] = full_pair_count(source, rank_);
  const std::string me = "rank " + std::to_string(rank_) + ": ";

  // 1. Rank 0 stays away from an all_to_all_v the others enter: they time out.
  if (rank_ != 0) {
    {
      // Buffers that die with this scope: the pending operation may touch only the communicator's copies.
      const std::vector<int32_t> scoped_send = send;
      const auto start = std::chrono::steady_clock::now();
      const Communicator::Activity activity(short_comm, "test exchange");
      // Numbered and labelled; the rank that stayed away is named with what it does instead (it waits in
      // a barrier of the first communicator), seen through the host's PeerMonitor.
      expect_error(
          [&] {
            short_comm.all_to_all_v_known(std::span<const int32_t>(scoped_send), send_counts, recv_counts);
          },
          ErrorCode::kTimeout,
          {me + "all_to_all_v #1 (test exchange) did not complete within 0.5 s", "stuck or dead",
           "rank 0 (pid ", "waiting in barrier #", "of communicator 0"});
      const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      EXPECT_GE(waited, kShortTimeoutSeconds * 0.9);
      EXPECT_LT(waited, kShortTimeoutSeconds + 5.0);
    }
    EXPECT_EQ(short_comm.activity(), "") << "Activity restores the previous name";
    EXPECT_TRUE(short_comm.has_pending_operation());
    // The next collective first waits for the stuck one, and says which one.
    expect_error([&] { short_comm.barrier(); }, ErrorCode::kTimeout,
                 {me + "barrier could not start: the earlier all_to_all_v"});
  }
  // The resynchronisation must not depend on how fast an oversubscribed machine schedules rank 0.
  short_comm.set_timeout_seconds(kTestTimeoutSeconds);
  comm().barrier();  // rank 0 waits here until every other rank has timed out twice
  // 2. Rank 0 joins late; its call completes the others' pending operation and gets their real data.
  if (rank_ == 0) {
    const std::vector<int32_t> received =
        short_comm.all_to_all_v_known(std::span<const int32_t>(send), send_counts, recv_counts);
    EXPECT_EQ(count_wrong_received(received, full_pair_count), 0);
  }
  short_comm.barrier();  // the others complete their pending all_to_all_v first
  EXPECT_FALSE(short_comm.has_pending_operation());
  // The late operation moved its bytes, so the counters include it on every rank.
  EXPECT_EQ(short_comm.bytes_sent(), pair_bytes_sent(sizeof(int32_t), full_pair_count));
  EXPECT_EQ(short_comm.bytes_received(), pair_bytes_received(sizeof(int32_t), full_pair_count));

  // 3. The same with a barrier, the operation without buffers.
  if (rank_ != 0) {
    short_comm.set_timeout_seconds(kShortTimeoutSeconds);
    expect_error([&] { short_comm.barrier(); }, ErrorCode::kTimeout,
                 {me + "barrier #3 did not complete within 0.5 s", "rank 0 (pid "});
  }
  short_comm.set_timeout_seconds(kTestTimeoutSeconds);
  comm().barrier();
  if (rank_ == 0) short_comm.barrier();  // the late partner of the others' pending barrier
  short_comm.barrier();
  EXPECT_FALSE(short_comm.has_pending_operation());
}

}  // namespace
}  // namespace epic

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  // Created here, not in SetUp, because the listeners below need the rank; gtest owns and deletes it.
  auto* environment = new epic::CommEnvironment;
  ::testing::AddGlobalTestEnvironment(environment);
  const int rank = epic::CommEnvironment::comm().rank();
  if (rank != 0) {
    ::testing::TestEventListeners& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new epic::RankFailurePrinter(rank));
  }
  const int status = RUN_ALL_TESTS();
  return status != 0 || environment->any_rank_failed() ? 1 : 0;
}
