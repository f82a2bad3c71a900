// NcclCommunicator under mpirun (-np 2 and 4, one GPU per rank): every collective on random data from a
// fresh seed (printed; EPIC_TEST_SEED replays one) against the same exchange through the MPI communicator
// on host copies, bit for bit, including receive bytes nothing should touch (prefilled). Then a rank that
// skips a collective: the waiting rank fails with kTimeout within the bound and every rank finishes.
// Without a GPU for every rank, every test skips with the reason (the CI machine has none).
#include "comm/nccl/nccl_communicator.h"

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "comm/nccl/device_choice.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/error.h"
#include "tests/support/expect_error.h"
#include "tests/support/mpi_gtest_main.h"

namespace epic {
namespace {

using testing::expect_error;
using testing::MpiGtestEnvironment;

// Generous: a wrong test should fail by its checks, not by a timeout; CTest's TIMEOUT bounds the run.
constexpr double kTestTimeoutSeconds = 60.0;
// The timeout test's deliberately short bound, and how much later than it the failure may come.
constexpr double kShortTimeoutSeconds = 3.0;
constexpr double kTimeoutSlackSeconds = 5.0;
// Bytes nothing may write: prefilled in every receive buffer, device and host reference alike.
constexpr uint8_t kUntouched = 0xA5;

MpiCommunicator& host() { return MpiGtestEnvironment::comm(); }

// Device memory for one test, freed at scope end.
class DeviceBytes {
 public:
  explicit DeviceBytes(int64_t bytes) : bytes_(std::max<int64_t>(bytes, 1)) {
    EPIC_CUDA_CHECK(cudaMalloc(&data_, static_cast<size_t>(bytes_)));
  }
  ~DeviceBytes() { cudaFree(data_); }
  DeviceBytes(const DeviceBytes&) = delete;
  DeviceBytes& operator=(const DeviceBytes&) = delete;
  void* get() const { return data_; }
  void upload(const void* host_data, int64_t bytes) {
    EPIC_CUDA_CHECK(cudaMemcpy(data_, host_data, static_cast<size_t>(bytes), cudaMemcpyHostToDevice));
  }
  std::vector<uint8_t> download(int64_t bytes) const {
    std::vector<uint8_t> host_data(static_cast<size_t>(bytes));
    EPIC_CUDA_CHECK(cudaMemcpy(host_data.data(), data_, host_data.size(), cudaMemcpyDeviceToHost));
    return host_data;
  }

 private:
  void* data_ = nullptr;
  int64_t bytes_;
};

std::vector<uint8_t> random_bytes(std::mt19937_64& random, int64_t bytes) {
  std::vector<uint8_t> data(static_cast<size_t>(bytes));
  for (uint8_t& byte : data) byte = static_cast<uint8_t>(random());
  return data;
}

// Every byte compared; the first difference and the count of differences reported.
void expect_same_bytes(const std::vector<uint8_t>& expected, const std::vector<uint8_t>& got,
                       const std::string& what) {
  ASSERT_EQ(expected.size(), got.size()) << what;
  size_t differences = 0;
  size_t first = 0;
  for (size_t index = 0; index < expected.size(); ++index) {
    if (expected[index] == got[index]) continue;
    if (differences++ == 0) first = index;
  }
  EXPECT_EQ(0u, differences) << what << ": " << differences << " of " << expected.size()
                             << " bytes differ from the MPI reference, the first at byte " << first
                             << " (expected " << int(expected[first]) << ", got " << int(got[first]) << ")";
}

// The ranks agree whether every one of them has a GPU of its own; the reason if not.
std::string reason_to_skip() {
  int num_devices = 0;  // left untouched when there is no driver
  if (cudaGetDeviceCount(&num_devices) != cudaSuccess) {
    cudaGetLastError();
    num_devices = 0;
  }
  const std::string name = [] {
    char text[256] = {};
    gethostname(text, sizeof(text) - 1);
    return std::string(text);
  }();
  const std::vector<std::vector<char>> hosts_chars = host().all_gather_v<char>(std::span<const char>(name));
  std::vector<std::string> hosts;
  for (const auto& chars : hosts_chars) hosts.emplace_back(chars.begin(), chars.end());
  const NodeLocalRank local = node_local_rank(node_local_rank_from_hosts(hosts, host().rank()), std::getenv);
  const std::vector<int32_t> devices = host().all_gather_value<int32_t>(num_devices);
  const std::vector<int32_t> local_ranks = host().all_gather_value<int32_t>(local.rank);
  std::string reason;
  for (int rank = 0; rank < host().size(); ++rank) {
    if (local_ranks[rank] < devices[rank]) continue;
    reason += (reason.empty() ? "" : "; ") + std::string("rank ") + std::to_string(rank) + " (local rank " +
              std::to_string(local_ranks[rank]) + ") sees " + std::to_string(devices[rank]) + " CUDA devices";
  }
  return reason.empty() ? "" : "no GPU for every rank: " + reason;
}

class NcclCommTest : public ::testing::Test {
 protected:
  // Collective: every rank runs it, in the same order.
  static void SetUpTestSuite() {
    skip_reason_ = reason_to_skip();
    if (!skip_reason_.empty()) {
      if (host().rank() == 0)
        std::printf("epic_nccl_comm_test: skipped on every rank: %s\n", skip_reason_.c_str());
      return;
    }
    uint64_t seed = std::random_device{}() ^ (uint64_t{std::random_device{}()} << 32);
    if (const char* replay = std::getenv("EPIC_TEST_SEED")) seed = std::strtoull(replay, nullptr, 10);
    host().broadcast(&seed, sizeof(seed), 0);
    seed_ = seed;
    if (host().rank() == 0)
      std::printf("[ SEED     ] %llu (EPIC_TEST_SEED=%llu replays it)\n",
                  static_cast<unsigned long long>(seed), static_cast<unsigned long long>(seed));
    try {
      nccl_ = std::make_unique<NcclCommunicator>(host(), CommOptions{kTestTimeoutSeconds});
    } catch (const std::exception& error) {
      setup_error_ = error.what();
    }
  }
  static void TearDownTestSuite() { nccl_.reset(); }

  void SetUp() override {
    if (!skip_reason_.empty()) GTEST_SKIP() << skip_reason_;
    ASSERT_TRUE(setup_error_.empty()) << "the NCCL communicator could not start: " << setup_error_;
    rank_ = host().rank();
    size_ = host().size();
    // A stream of its own per test and rank, the same on every run of this seed.
    random_.seed(seed_ + 7919 * static_cast<uint64_t>(rank_) +
                 std::hash<std::string>{}(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    shared_random_.seed(
        seed_ + std::hash<std::string>{}(::testing::UnitTest::GetInstance()->current_test_info()->name()));
  }
  // Keeps the ranks in step: no test starts while another rank is still in the previous one.
  void TearDown() override { host().barrier(); }

  static NcclCommunicator& nccl() { return *nccl_; }

  int rank_ = 0;
  int size_ = 0;
  std::mt19937_64 random_;         // this rank's own data
  std::mt19937_64 shared_random_;  // the same draws on every rank (sizes every rank must agree on)

  static inline std::string skip_reason_;
  static inline std::string setup_error_;
  static inline uint64_t seed_ = 0;
  static inline std::unique_ptr<NcclCommunicator> nccl_;
};

// Block sizes of rank `source` to rank `destination`, drawn from the shared stream: uneven, zero for
// some pairs, the last rank sends nothing at all (its own block included) and 0 -> 1 is always empty.
std::vector<std::vector<int64_t>> draw_block_matrix(std::mt19937_64& shared_random, int size) {
  std::vector<std::vector<int64_t>> bytes(size, std::vector<int64_t>(size));
  for (int source = 0; source < size; ++source)
    for (int destination = 0; destination < size; ++destination)
      bytes[source][destination] =
          shared_random() % 4 == 0 ? 0 : 1 + static_cast<int64_t>(shared_random() % 5000);
  for (int destination = 0; destination < size; ++destination) bytes[size - 1][destination] = 0;
  bytes[0][1] = 0;
  return bytes;
}

// Offsets for blocks of the given sizes: in peer order on even ranks, reversed on odd ones, with random
// gaps between them (bytes no block covers, which must stay untouched). Returns the buffer size.
int64_t lay_out(std::mt19937_64& random, int rank, const std::vector<int64_t>& bytes,
                std::vector<int64_t>* offsets) {
  const int size = static_cast<int>(bytes.size());
  offsets->assign(size, 0);
  int64_t position = 0;
  for (int index = 0; index < size; ++index) {
    const int peer = rank % 2 == 0 ? index : size - 1 - index;
    position += static_cast<int64_t>(random() % 64);
    (*offsets)[peer] = position;
    position += bytes[peer];
  }
  return position + static_cast<int64_t>(random() % 64);
}

TEST_F(NcclCommTest, AllToAllVMatchesMpiBitwiseOnUnevenBlocks) {
  for (int round = 0; round < 3; ++round) {
    const std::vector<std::vector<int64_t>> matrix = draw_block_matrix(shared_random_, size_);
    std::vector<int64_t> send_bytes(size_), recv_bytes(size_), send_offsets, recv_offsets;
    for (int peer = 0; peer < size_; ++peer) {
      send_bytes[peer] = matrix[rank_][peer];
      recv_bytes[peer] = matrix[peer][rank_];
    }
    const int64_t send_buffer_bytes = lay_out(random_, rank_, send_bytes, &send_offsets);
    const int64_t recv_buffer_bytes = lay_out(random_, rank_ + 1, recv_bytes, &recv_offsets);
    const std::vector<uint8_t> send_host = random_bytes(random_, send_buffer_bytes);

    std::vector<uint8_t> expected(static_cast<size_t>(recv_buffer_bytes), kUntouched);
    host().all_to_all_v(send_host.data(), send_bytes, send_offsets, expected.data(), recv_bytes,
                        recv_offsets);

    DeviceBytes send(send_buffer_bytes), recv(recv_buffer_bytes);
    send.upload(send_host.data(), send_buffer_bytes);
    EPIC_CUDA_CHECK(cudaMemset(recv.get(), kUntouched, static_cast<size_t>(recv_buffer_bytes)));
    const uint64_t sent_before = nccl().bytes_sent();
    const uint64_t received_before = nccl().bytes_received();
    nccl().all_to_all_v({send.get(), send_buffer_bytes, send_bytes, send_offsets, recv.get(),
                         recv_buffer_bytes, recv_bytes, recv_offsets});
    nccl().synchronize();
    expect_same_bytes(expected, recv.download(recv_buffer_bytes),
                      "all_to_all_v round " + std::to_string(round));

    const int64_t off_rank_sent =
        std::accumulate(send_bytes.begin(), send_bytes.end(), int64_t{0}) - send_bytes[rank_];
    const int64_t off_rank_received =
        std::accumulate(recv_bytes.begin(), recv_bytes.end(), int64_t{0}) - recv_bytes[rank_];
    EXPECT_EQ(static_cast<uint64_t>(off_rank_sent), nccl().bytes_sent() - sent_before);
    EXPECT_EQ(static_cast<uint64_t>(off_rank_received), nccl().bytes_received() - received_before);
  }
}

TEST_F(NcclCommTest, ExchangeCountsMatchesMpi) {
  std::vector<int64_t> counts(size_);
  for (int64_t& count : counts) count = static_cast<int64_t>(random_() >> 1) - (int64_t{1} << 61);
  const std::vector<int64_t> ones(size_, 1);
  const std::vector<int64_t> expected =
      host().all_to_all_v_known<int64_t>(std::span<const int64_t>(counts), ones, ones);

  DeviceBytes send(size_ * 8), recv(size_ * 8);
  send.upload(counts.data(), size_ * 8);
  EPIC_CUDA_CHECK(cudaMemset(recv.get(), kUntouched, static_cast<size_t>(size_ * 8)));
  nccl().exchange_counts(static_cast<const int64_t*>(send.get()), static_cast<int64_t*>(recv.get()));
  nccl().synchronize();
  std::vector<int64_t> got(size_);
  const std::vector<uint8_t> raw = recv.download(size_ * 8);
  std::memcpy(got.data(), raw.data(), raw.size());
  EXPECT_EQ(expected, got);
}

TEST_F(NcclCommTest, AllGatherMatchesMpi) {
  for (const int64_t bytes : {int64_t{1}, static_cast<int64_t>(1 + shared_random_() % 100000)}) {
    const std::vector<uint8_t> mine = random_bytes(random_, bytes);
    std::vector<uint8_t> expected(static_cast<size_t>(bytes * size_), kUntouched);
    host().all_gather(mine.data(), bytes, expected.data());

    DeviceBytes send(bytes), recv(bytes * size_);
    send.upload(mine.data(), bytes);
    EPIC_CUDA_CHECK(cudaMemset(recv.get(), kUntouched, static_cast<size_t>(bytes * size_)));
    nccl().all_gather(send.get(), bytes, recv.get());
    nccl().synchronize();
    expect_same_bytes(expected, recv.download(bytes * size_),
                      "all_gather of " + std::to_string(bytes) + " bytes");
  }
}

TEST_F(NcclCommTest, BroadcastFromEveryRootMatchesMpi) {
  for (int root = size_ - 1; root >= 0; --root) {
    const int64_t bytes = 1 + static_cast<int64_t>(shared_random_() % 70000);
    // Every rank starts from different bytes; only the root's may survive.
    std::vector<uint8_t> expected = random_bytes(random_, bytes);
    DeviceBytes data(bytes);
    data.upload(expected.data(), bytes);
    host().broadcast(expected.data(), bytes, root);
    nccl().broadcast(data.get(), bytes, root);
    nccl().synchronize();
    expect_same_bytes(expected, data.download(bytes), "broadcast from root " + std::to_string(root));
  }
}

template <typename T>
void check_all_reduce_sum(NcclCommunicator& nccl, std::mt19937_64& random, int64_t count, T limit,
                          bool in_place) {
  std::vector<T> mine(static_cast<size_t>(count));
  for (T& value : mine)
    value = static_cast<T>(static_cast<int64_t>(random() % (2 * uint64_t(limit) + 1)) - limit);
  // The reference: every rank's values through MPI, summed here (exact: integers far from overflow).
  std::vector<T> everything(static_cast<size_t>(count * host().size()));
  host().all_gather(mine.data(), count * static_cast<int64_t>(sizeof(T)), everything.data());
  std::vector<T> expected(static_cast<size_t>(count), 0);
  for (int rank = 0; rank < host().size(); ++rank)
    for (int64_t index = 0; index < count; ++index) expected[index] += everything[rank * count + index];

  const int64_t bytes = count * static_cast<int64_t>(sizeof(T));
  DeviceBytes send(bytes), recv(bytes);
  send.upload(mine.data(), bytes);
  T* output = static_cast<T*>(in_place ? send.get() : recv.get());
  nccl.all_reduce_sum(static_cast<const T*>(send.get()), output, count);
  nccl.synchronize();
  std::vector<T> got(static_cast<size_t>(count));
  const std::vector<uint8_t> raw = (in_place ? send : recv).download(bytes);
  std::memcpy(got.data(), raw.data(), raw.size());
  EXPECT_EQ(expected, got) << (in_place ? "in place" : "out of place") << ", " << sizeof(T) * 8 << "-bit";
}

TEST_F(NcclCommTest, AllReduceSumOfCountsMatchesMpi) {
  const int64_t count = 1 + static_cast<int64_t>(shared_random_() % 5000);
  for (const bool in_place : {false, true}) {
    check_all_reduce_sum<int32_t>(nccl(), random_, count, 1000000, in_place);
    check_all_reduce_sum<int64_t>(nccl(), random_, count, int64_t{1} << 50, in_place);
  }
}

TEST_F(NcclCommTest, BadArgumentsFailOnTheHostAndLeaveTheCommunicatorUsable) {
  DeviceBytes buffer(64);
  std::vector<int64_t> bytes(size_, 0), offsets(size_, 0);
  bytes[rank_] = 16;
  offsets[rank_] = 56;  // 56 + 16 > 64
  expect_error(
      [&] {
        nccl().all_to_all_v({buffer.get(), 64, bytes, offsets, buffer.get(), 64, bytes, offsets});
      },
      ErrorCode::kInvalidArgument, {"rank " + std::to_string(rank_) + ": NCCL all_to_all_v", "ends past"});
  expect_error([&] { nccl().broadcast(buffer.get(), 8, size_); }, ErrorCode::kInvalidArgument,
               {"NCCL broadcast", "is not a rank"});
  EXPECT_FALSE(nccl().aborted());
  // Still usable: a one-int all-reduce sums every rank's rank.
  check_all_reduce_sum<int32_t>(nccl(), random_, 1, 5, /*in_place=*/false);
}

TEST_F(NcclCommTest, VerifyCountsCatchesPairsThatDisagreeOnEveryRank) {
  NcclOptions options;
  options.verify_counts = true;
  NcclCommunicator checked(host(), CommOptions{kTestTimeoutSeconds}, options);
  DeviceBytes send(size_ * 8), recv(size_ * 8 + 8);
  std::vector<int64_t> bytes(size_, 8), offsets(size_);
  for (int peer = 0; peer < size_; ++peer) offsets[peer] = peer * 8;
  std::vector<int64_t> recv_bytes = bytes;
  if (rank_ == 0) recv_bytes[1] = 7;  // rank 1 sends 8 (fewer, so the blocks stay apart)
  expect_error(
      [&] {
        checked.all_to_all_v(
            {send.get(), size_ * 8, bytes, offsets, recv.get(), size_ * 8 + 8, recv_bytes, offsets});
      },
      ErrorCode::kInvalidArgument,
      {"block sizes disagree", rank_ == 0 ? "rank 1 sends 8 bytes, recv_bytes[1] = 7" : "rank(s) 0"});
}

// Rank 0 enters an all_gather the others skip: it must fail with kTimeout within the bound, naming itself,
// the operation and the activity; every rank then finishes (the others wait on an MPI barrier, and their
// communicator's destructor is bounded too).
TEST_F(NcclCommTest, APeerThatSkipsACollectiveTimesOutWithinTheBound) {
  using Clock = std::chrono::steady_clock;
  Clock::time_point destroyed_from;
  {
    NcclCommunicator short_bound(host(), CommOptions{kShortTimeoutSeconds});
    DeviceBytes send(256), recv(256 * size_);
    // One collective every rank joins first: connections are up, so the wait below is on the peers alone.
    short_bound.all_gather(send.get(), 256, recv.get());
    short_bound.synchronize();

    if (rank_ == 0) {
      Communicator::Activity activity(host(), "NCCL timeout test");
      short_bound.all_gather(send.get(), 256, recv.get());
      const Clock::time_point started = Clock::now();
      expect_error([&] { short_bound.synchronize(); }, ErrorCode::kTimeout,
                   {"rank 0: NCCL all_gather #2 (NCCL timeout test)", "did not complete within 3 s",
                    "the NCCL communicator was aborted"});
      const double waited = std::chrono::duration<double>(Clock::now() - started).count();
      EXPECT_GE(waited, kShortTimeoutSeconds);
      EXPECT_LE(waited, kShortTimeoutSeconds + kTimeoutSlackSeconds);
      EXPECT_TRUE(short_bound.aborted());
      expect_error([&] { short_bound.all_gather(send.get(), 256, recv.get()); }, ErrorCode::kCommunication,
                   {"rank 0: NCCL all_gather", "aborted earlier"});
    }
    host().barrier();  // the other ranks wait here (MPI, bounded) until rank 0 has reported
    destroyed_from = Clock::now();
  }
  const double destruction = std::chrono::duration<double>(Clock::now() - destroyed_from).count();
  EXPECT_LE(destruction, kShortTimeoutSeconds + kTimeoutSlackSeconds) << "the destructor must not hang";
}

// Where some rank has no GPU (the CI machine), the start-up path itself: select_device fails on every rank
// at once with one message naming the ranks without one, rather than leaving the others in NCCL's start-up.
// A CTest entry of its own, so the skipped GPU tests cannot mask its result.
TEST(NcclCommWithoutGpu, StartUpFailsOnEveryRankNamingTheRanksWithoutAGpu) {
  const std::string reason = reason_to_skip();
  if (reason.empty()) GTEST_SKIP() << "every rank has a GPU: NcclCommTest covers the start-up";
  int num_devices = 0;
  if (cudaGetDeviceCount(&num_devices) != cudaSuccess) cudaGetLastError();
  const int last_rank = host().size() - 1;  // on one node the highest local rank lacks a GPU first
  expect_error([] { NcclCommunicator nccl(host(), CommOptions{kTestTimeoutSeconds}); },
               num_devices == 0 ? ErrorCode::kUnsupported : ErrorCode::kInvalidArgument,
               {"NCCL communicator: no GPU for every rank", "rank " + std::to_string(last_rank) + " on ",
                num_devices == 0 ? "rank 0 on " : "GPUs visible",
                num_devices == 0 ? "CUDA device" : "launch at most"});
  host().barrier();
}

}  // namespace
}  // namespace epic

int main(int argc, char** argv) {
  return epic::testing::run_mpi_gtests(argc, argv, epic::kTestTimeoutSeconds);
}
