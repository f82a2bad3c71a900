// The host-only parts of the NCCL communicator, on any machine: which GPU a rank takes (every branch
// of device_choice.h and its messages) and the argument checks of collective_arguments.h.
#include "comm/nccl/device_choice.h"

#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "comm/nccl/collective_arguments.h"
#include "kernels/error.h"
#include "tests/support/expect_error.h"

namespace epic {
namespace {

using testing::expect_error;

std::function<const char*(const char*)> environment(std::map<std::string, std::string> variables) {
  // The map lives in the closure, so the returned pointers stay valid while the function does.
  return [variables = std::move(variables)](const char* name) -> const char* {
    const auto found = variables.find(name);
    return found == variables.end() ? nullptr : found->second.c_str();
  };
}

TEST(NodeLocalRank, CountsTheRanksOfTheSameHostInRankOrder) {
  const std::vector<std::string> hosts{"a", "b", "a", "a", "b"};
  const std::vector<std::pair<int, int>> expected{{0, 3}, {0, 2}, {1, 3}, {2, 3}, {1, 2}};  // (rank, of)
  for (int rank = 0; rank < 5; ++rank) {
    const NodeLocalRank local = node_local_rank_from_hosts(hosts, rank);
    EXPECT_EQ(expected[rank].first, local.rank) << "rank " << rank;
    EXPECT_EQ(expected[rank].second, local.num_ranks) << "rank " << rank;
    EXPECT_EQ("host names", local.source);
  }
  expect_error([&] { node_local_rank_from_hosts(hosts, 5); }, ErrorCode::kInternal, {"rank 5", "5 gathered"});
}

TEST(NodeLocalRank, LauncherVariablesWinOpenMpiFirst) {
  const NodeLocalRank from_hosts{1, 4, "host names"};
  const NodeLocalRank none = node_local_rank(from_hosts, environment({}));
  EXPECT_EQ(1, none.rank);
  EXPECT_EQ("host names", none.source);

  const NodeLocalRank slurm = node_local_rank(from_hosts, environment({{"SLURM_LOCALID", "2"}}));
  EXPECT_EQ(2, slurm.rank);
  EXPECT_EQ(4, slurm.num_ranks);
  EXPECT_EQ("SLURM_LOCALID", slurm.source);

  const NodeLocalRank both =
      node_local_rank(from_hosts, environment({{"SLURM_LOCALID", "2"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "3"}}));
  EXPECT_EQ(3, both.rank);
  EXPECT_EQ("OMPI_COMM_WORLD_LOCAL_RANK", both.source);

  // A launcher rank past the host names' count: the count grows to hold it.
  const NodeLocalRank beyond =
      node_local_rank(from_hosts, environment({{"OMPI_COMM_WORLD_LOCAL_RANK", "6"}}));
  EXPECT_EQ(6, beyond.rank);
  EXPECT_EQ(7, beyond.num_ranks);
}

TEST(NodeLocalRank, UnparsableLauncherValueNamesTheVariable) {
  for (const std::string value : {"", "x", "-1", "2a", "99999999999"}) {
    expect_error(
        [&] {
          node_local_rank({0, 1, "host names"}, environment({{"SLURM_LOCALID", value}}));
        },
        ErrorCode::kInvalidArgument, {"SLURM_LOCALID=\"" + value + "\"", "non-negative integer"});
  }
}

TEST(ChooseDevice, NodeLocalRankWhenItHasAGpu) {
  EXPECT_EQ(0, choose_device({0, 2, "host names"}, 2, std::nullopt));
  EXPECT_EQ(1, choose_device({1, 2, "host names"}, 2, std::nullopt));
  EXPECT_EQ(3, choose_device({3, 4, "SLURM_LOCALID"}, 8, std::nullopt));
}

TEST(ChooseDevice, MoreRanksThanGpusSaysHowToFixIt) {
  expect_error(
      [] {
        choose_device({2, 4, "OMPI_COMM_WORLD_LOCAL_RANK"}, 2, std::nullopt);
      },
      ErrorCode::kInvalidArgument,
      {"4 ranks on this node but only 2 GPUs visible", "local rank 2", "OMPI_COMM_WORLD_LOCAL_RANK",
       "launch at most 2 ranks per node", "CUDA_VISIBLE_DEVICES"});
}

TEST(ChooseDevice, OverrideWinsAndIsChecked) {
  // The override wins even where the node-local rank has no GPU of its own.
  EXPECT_EQ(1, choose_device({5, 6, "host names"}, 2, 1));
  EXPECT_EQ(0, choose_device({1, 2, "host names"}, 2, 0));
  for (const int device : {-1, 2, 7}) {
    expect_error(
        [&] {
          choose_device({0, 1, "host names"}, 2, device);
        },
        ErrorCode::kInvalidArgument, {"--device " + std::to_string(device), "2 visible (0 to 1)"});
  }
}

TEST(ChooseDevice, NoGpuIsUnsupported) {
  for (const std::optional<int> device_override : {std::optional<int>(), std::optional<int>(0)}) {
    expect_error(
        [&] {
          choose_device({0, 1, "host names"}, 0, device_override);
        },
        ErrorCode::kUnsupported, {"no CUDA device is visible", "CUDA_VISIBLE_DEVICES"});
  }
}

TEST(DistinctDevices, SameBusIdOnOtherHostsIsFineOnOneHostIsNot) {
  check_distinct_devices({"a", "b", "a"}, {"0000:19:00.0", "0000:19:00.0", "0000:3b:00.0"});
  expect_error(
      [] {
        check_distinct_devices({"a", "b", "a", "a"}, {"x", "x", "y", "x"});
      },
      ErrorCode::kInvalidArgument, {"ranks 0 and 3 on a GPU x", "one GPU per rank", "--device"});
  expect_error(
      [] {
        check_distinct_devices({"a"}, {"x", "y"});
      },
      ErrorCode::kInternal, {"1 host names", "2 device"});
}

// A valid 3-rank layout for rank 1 on fake buffers (the checks never touch the bytes).
struct LayoutFixture {
  std::vector<std::byte> send_storage = std::vector<std::byte>(100);
  std::vector<std::byte> recv_storage = std::vector<std::byte>(100);
  AllToAllLayout layout{send_storage.data(), 100, {10, 20, 0}, {0, 10, 99},
                        recv_storage.data(), 100, {5, 20, 30}, {60, 0, 20}};
};

TEST(AllToAllVArguments, AValidLayoutPasses) {
  LayoutFixture fixture;
  check_all_to_all_v_arguments(1, 3, fixture.layout);
  // Nothing moves: null buffers are fine.
  check_all_to_all_v_arguments(0, 2, AllToAllLayout{nullptr, 0, {0, 0}, {0, 0}, nullptr, 0, {0, 0}, {0, 0}});
}

TEST(AllToAllVArguments, EachBrokenArgumentIsNamed) {
  // Each edit breaks one argument of a valid layout; the message names the rank, the operation and it.
  const auto expect_broken = [](const std::function<void(AllToAllLayout&)>& edit,
                                const std::string& first_words, const std::string& more_words = "") {
    LayoutFixture fixture;
    edit(fixture.layout);
    expect_error([&] { check_all_to_all_v_arguments(1, 3, fixture.layout); }, ErrorCode::kInvalidArgument,
                 {"rank 1: NCCL all_to_all_v", first_words, more_words});
  };
  expect_broken([](AllToAllLayout& l) { l.send_bytes.pop_back(); }, "send_bytes has 2 entries",
                "one per rank (3)");
  expect_broken([](AllToAllLayout& l) { l.recv_offsets.push_back(0); }, "recv_offsets has 4 entries");
  expect_broken([](AllToAllLayout& l) { l.recv_bytes[2] = -1; }, "recv_bytes[2] = -1 is negative");
  expect_broken([](AllToAllLayout& l) { l.send_offsets[0] = -4; }, "send_offsets[0] = -4");
  expect_broken([](AllToAllLayout& l) { l.send_bytes[2] = 2; }, "send block of peer 2 (2 bytes at offset 99)",
                "100 bytes");
  // offset + bytes would overflow int64: still caught.
  expect_broken([](AllToAllLayout& l) { l.recv_offsets[0] = std::numeric_limits<int64_t>::max() - 1; },
                "recv block of peer 0");
  expect_broken([](AllToAllLayout& l) { l.recv_buffer_bytes = -1; }, "recv_buffer_bytes = -1");
  expect_broken([](AllToAllLayout& l) { l.send = nullptr; }, "send buffer is null");
  expect_broken([](AllToAllLayout& l) { l.recv_bytes[1] = 19; }, "own block is 20 bytes in send_bytes",
                "19 bytes in recv_bytes");
  expect_broken([](AllToAllLayout& l) { l.recv_offsets[0] = 45; }, "receive blocks of peers 2 and 0 overlap");
  expect_broken([](AllToAllLayout& l) { l.recv = static_cast<std::byte*>(const_cast<void*>(l.send)) + 10; },
                "inside the send buffer");
}

TEST(CollectiveArguments, AllGatherBroadcastAndElementChecks) {
  int buffer = 0;
  check_all_gather_arguments(0, 4, &buffer, 4, &buffer);
  check_all_gather_arguments(0, 4, nullptr, 0, nullptr);
  expect_error([&] { check_all_gather_arguments(2, 4, &buffer, -1, &buffer); }, ErrorCode::kInvalidArgument,
               {"rank 2: NCCL all_gather", "bytes = -1"});
  expect_error(
      [&] { check_all_gather_arguments(0, 4, &buffer, std::numeric_limits<int64_t>::max() / 2, &buffer); },
      ErrorCode::kInvalidArgument, {"overflow"});
  expect_error([&] { check_all_gather_arguments(0, 4, &buffer, 8, nullptr); }, ErrorCode::kInvalidArgument,
               {"null buffer for 8 bytes"});

  check_broadcast_arguments(1, 2, &buffer, 4, 1);
  for (const int root : {-1, 2}) {
    expect_error([&] { check_broadcast_arguments(1, 2, &buffer, 4, root); }, ErrorCode::kInvalidArgument,
                 {"rank 1: NCCL broadcast", "root " + std::to_string(root) + " is not a rank (0 to 1)"});
  }
  expect_error([&] { check_broadcast_arguments(0, 2, nullptr, 4, 0); }, ErrorCode::kInvalidArgument,
               {"null buffer for 4 bytes"});

  check_element_arguments(0, "all_reduce_sum", &buffer, &buffer, 1);
  expect_error([&] { check_element_arguments(3, "exchange_counts", &buffer, &buffer, -2); },
               ErrorCode::kInvalidArgument, {"rank 3: NCCL exchange_counts", "count = -2"});
  expect_error([&] { check_element_arguments(0, "all_reduce_sum", nullptr, &buffer, 3); },
               ErrorCode::kInvalidArgument, {"null buffer for 3 elements"});
}

}  // namespace
}  // namespace epic
