// One process, no MPI: SelfCommunicator's byte-level collectives and the typed helpers over it, argument
// checks, and the launcher detection behind make_communicator.
#include "comm/self_communicator.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "kernels/error.h"

namespace epic {
namespace {

// Runs `call`, expects Error with `code` whose message contains `needle`.
template <typename Call>
void expect_error(Call&& call, ErrorCode code, const std::string& needle) {
  try {
    call();
    ADD_FAILURE() << "expected Error(" << error_code_name(code) << ") mentioning '" << needle << "'";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), code) << error.what();
    EXPECT_NE(std::string(error.what()).find(needle), std::string::npos) << error.what();
  }
}

TEST(SelfCommunicator, IsOneRank) {
  SelfCommunicator comm;
  EXPECT_EQ(comm.rank(), 0);
  EXPECT_EQ(comm.size(), 1);
  EXPECT_EQ(comm.name(), "self");
  comm.barrier();
}

TEST(SelfCommunicator, AllToAllVCopiesTheOwnBlockBetweenOffsets) {
  SelfCommunicator comm;
  const std::vector<int32_t> send = {-1, -1, 7, 8, 9, -1};
  std::vector<int32_t> recv(5, -5);
  const int64_t word = sizeof(int32_t);
  comm.all_to_all_v(send.data(), {3 * word}, {2 * word}, recv.data(), {3 * word}, {1 * word});
  EXPECT_EQ(recv, (std::vector<int32_t>{-5, 7, 8, 9, -5}));
  // Nothing went to another rank.
  EXPECT_EQ(comm.bytes_sent(), 0u);
  EXPECT_EQ(comm.bytes_received(), 0u);
}

TEST(SelfCommunicator, AllGatherAndBroadcast) {
  SelfCommunicator comm;
  const double value = 2.5;
  double gathered = 0.0;
  comm.all_gather(&value, sizeof(value), &gathered);
  EXPECT_EQ(gathered, 2.5);
  int32_t data = 42;
  comm.broadcast(&data, sizeof(data), 0);
  EXPECT_EQ(data, 42);
}

TEST(SelfCommunicator, RejectsBadArguments) {
  SelfCommunicator comm;
  std::vector<char> buffer(8);
  expect_error(
      [&] {
        comm.all_to_all_v(buffer.data(), {1, 1}, {0}, buffer.data(), {1}, {0});
      },
      ErrorCode::kInvalidArgument, "send_bytes has 2 entries");
  expect_error([&] { comm.all_to_all_v(buffer.data(), {2}, {0}, buffer.data(), {3}, {4}); },
               ErrorCode::kInvalidArgument, "sends 2 bytes to itself but expects to receive 3");
  expect_error([&] { comm.all_to_all_v(buffer.data(), {-1}, {0}, buffer.data(), {-1}, {0}); },
               ErrorCode::kInvalidArgument, "negative");
  expect_error([&] { comm.broadcast(buffer.data(), 1, 1); }, ErrorCode::kInvalidArgument, "root 1");
  expect_error([&] { comm.all_gather(buffer.data(), -3, buffer.data()); }, ErrorCode::kInvalidArgument,
               "negative");
}

TEST(TypedHelpersOnSelf, AllToAllVReturnsTheOwnElementsAndCounts) {
  SelfCommunicator comm;
  const std::vector<int64_t> send = {100, 101, 102};
  std::vector<int64_t> recv_counts;
  const std::vector<int64_t> recv = comm.all_to_all_v(std::span<const int64_t>(send), {3}, &recv_counts);
  EXPECT_EQ(recv, send);
  EXPECT_EQ(recv_counts, (std::vector<int64_t>{3}));

  const std::vector<int64_t> back = comm.all_to_all_v_known(std::span<const int64_t>(recv), {3}, {3});
  EXPECT_EQ(back, send);
  const std::vector<int64_t> none = comm.all_to_all_v(std::span<const int64_t>(), {0}, &recv_counts);
  EXPECT_TRUE(none.empty());
  EXPECT_EQ(recv_counts, (std::vector<int64_t>{0}));
}

TEST(TypedHelpersOnSelf, RejectCountsThatDoNotMatchTheData) {
  SelfCommunicator comm;
  const std::vector<float> send = {1.0f, 2.0f};
  expect_error([&] { comm.all_to_all_v(std::span<const float>(send), {3}, nullptr); },
               ErrorCode::kInvalidArgument, "send_counts add up to 3 elements but the send span holds 2");
  expect_error(
      [&] {
        comm.all_to_all_v(std::span<const float>(send), {1, 1}, nullptr);
      },
      ErrorCode::kInvalidArgument, "send_counts has 2 entries");
  expect_error([&] { comm.all_to_all_v_known(std::span<const float>(send), {2}, {-2}); },
               ErrorCode::kInvalidArgument, "recv_counts[0] = -2 is negative");
}

TEST(TypedHelpersOnSelf, AllGatherValueAndAllGatherV) {
  SelfCommunicator comm;
  struct Sample {
    int32_t rank;
    double load;
  };
  const std::vector<Sample> values = comm.all_gather_value(Sample{0, 0.75});
  ASSERT_EQ(values.size(), 1u);
  EXPECT_EQ(values[0].rank, 0);
  EXPECT_EQ(values[0].load, 0.75);

  const std::vector<uint16_t> mine = {5, 6, 7};
  const std::vector<std::vector<uint16_t>> gathered = comm.all_gather_v(std::span<const uint16_t>(mine));
  ASSERT_EQ(gathered.size(), 1u);
  EXPECT_EQ(gathered[0], mine);
  const std::vector<std::vector<uint16_t>> empty = comm.all_gather_v(std::span<const uint16_t>());
  ASSERT_EQ(empty.size(), 1u);
  EXPECT_TRUE(empty[0].empty());
}

TEST(TypedHelpersOnSelf, BroadcastBytesKeepsNulBytes) {
  SelfCommunicator comm;
  std::string binary("a\0b\0\0c", 6);
  binary.push_back('\xff');
  EXPECT_EQ(comm.broadcast_bytes(binary, 0), binary);
  EXPECT_EQ(comm.broadcast_bytes(std::string(), 0), std::string());
}

// Sets or clears environment variables for one test and restores them afterwards.
class ScopedEnvironment {
 public:
  void set(const char* name, const char* value) {
    remember(name);
    setenv(name, value, 1);
  }
  void clear(const char* name) {
    remember(name);
    unsetenv(name);
  }
  ~ScopedEnvironment() {
    for (auto it = saved_.rbegin(); it != saved_.rend(); ++it) {
      if (it->second) {
        setenv(it->first.c_str(), it->second->c_str(), 1);
      } else {
        unsetenv(it->first.c_str());
      }
    }
  }

 private:
  void remember(const char* name) {
    const char* old = std::getenv(name);
    saved_.emplace_back(name, old ? std::optional<std::string>(old) : std::nullopt);
  }
  std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};

constexpr const char* kLauncherVariables[] = {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"};

TEST(LaunchedUnderMpi, FollowsTheLauncherVariables) {
  ScopedEnvironment environment;
  for (const char* variable : kLauncherVariables) environment.clear(variable);
  EXPECT_FALSE(launched_under_mpi());
  for (const char* variable : kLauncherVariables) {
    environment.set(variable, "1");
    EXPECT_TRUE(launched_under_mpi()) << variable;
    environment.clear(variable);
  }
  EXPECT_FALSE(launched_under_mpi());
}

TEST(MakeCommunicator, GivesSelfOutsideAnMpiLaunch) {
  ScopedEnvironment environment;
  for (const char* variable : kLauncherVariables) environment.clear(variable);
  const std::unique_ptr<Communicator> comm = make_communicator(CommOptions{});
  EXPECT_EQ(comm->name(), "self");
  EXPECT_EQ(comm->size(), 1);
  EXPECT_EQ(make_self_communicator()->name(), "self");
}

}  // namespace
}  // namespace epic
