// The device choice of device_choice.h: node-local rank, override, and the ranks-vs-GPUs checks.
#include "comm/nccl/device_choice.h"

#include <algorithm>
#include <charconv>
#include <cstring>
#include <map>
#include <utility>

#include "kernels/error.h"

namespace epic {

namespace {

std::optional<int> parse_non_negative(const char* text) {
  if (text == nullptr || *text == '\0') return std::nullopt;
  int value = -1;
  const char* end = text + std::strlen(text);
  const auto [parsed_to, error] = std::from_chars(text, end, value);
  if (error != std::errc() || parsed_to != end || value < 0) return std::nullopt;
  return value;
}

}  // namespace

NodeLocalRank node_local_rank_from_hosts(const std::vector<std::string>& hosts, int rank) {
  EPIC_CHECK(rank >= 0 && static_cast<size_t>(rank) < hosts.size(), ErrorCode::kInternal,
             "node_local_rank_from_hosts: rank " + std::to_string(rank) + " outside the " +
                 std::to_string(hosts.size()) + " gathered host names");
  NodeLocalRank local{0, 0, "host names"};
  for (size_t other = 0; other < hosts.size(); ++other) {
    if (hosts[other] != hosts[static_cast<size_t>(rank)]) continue;
    if (other < static_cast<size_t>(rank)) ++local.rank;
    ++local.num_ranks;
  }
  return local;
}

NodeLocalRank node_local_rank(const NodeLocalRank& from_hosts,
                              const std::function<const char*(const char*)>& lookup) {
  for (const char* variable : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"}) {
    const char* value = lookup(variable);
    if (value == nullptr) continue;
    const std::optional<int> parsed = parse_non_negative(value);
    EPIC_CHECK(parsed.has_value(), ErrorCode::kInvalidArgument,
               std::string(variable) + "=\"" + value +
                   "\" is not a node-local rank (a non-negative integer); the launcher sets it, so unset it "
                   "if it was set by hand");
    // The host names still count the node's ranks; a launcher rank beyond them means the two views differ,
    // and the larger count is the honest one for the "too many ranks" message.
    return NodeLocalRank{*parsed, std::max(from_hosts.num_ranks, *parsed + 1), variable};
  }
  return from_hosts;
}

int choose_device(const NodeLocalRank& local, int num_visible_devices, std::optional<int> device_override) {
  EPIC_CHECK(
      num_visible_devices > 0, ErrorCode::kUnsupported,
      "no CUDA device is visible to this process (local rank " + std::to_string(local.rank) + " from " +
          local.source +
          "): the NCCL communicator needs one GPU per rank; check CUDA_VISIBLE_DEVICES and the driver");
  if (device_override.has_value()) {
    EPIC_CHECK(*device_override >= 0 && *device_override < num_visible_devices, ErrorCode::kInvalidArgument,
               "--device " + std::to_string(*device_override) +
                   " is not a visible CUDA device: " + std::to_string(num_visible_devices) +
                   " visible (0 to " + std::to_string(num_visible_devices - 1) + ")");
    return *device_override;
  }
  EPIC_CHECK(local.rank < num_visible_devices, ErrorCode::kInvalidArgument,
             std::to_string(local.num_ranks) + " ranks on this node but only " +
                 std::to_string(num_visible_devices) + " GPUs visible (this rank is local rank " +
                 std::to_string(local.rank) + ", from " + local.source + "): launch at most " +
                 std::to_string(num_visible_devices) +
                 " ranks per node or set CUDA_VISIBLE_DEVICES (or --device) per rank");
  return local.rank;
}

void check_distinct_devices(const std::vector<std::string>& hosts,
                            const std::vector<std::string>& device_ids) {
  EPIC_CHECK(hosts.size() == device_ids.size(), ErrorCode::kInternal,
             "check_distinct_devices: " + std::to_string(hosts.size()) + " host names but " +
                 std::to_string(device_ids.size()) + " device ids");
  std::map<std::pair<std::string, std::string>, size_t> first_rank_on_device;
  std::string shared;
  for (size_t rank = 0; rank < hosts.size(); ++rank) {
    const auto [where, inserted] = first_rank_on_device.try_emplace({hosts[rank], device_ids[rank]}, rank);
    if (inserted) continue;
    shared += (shared.empty() ? "" : "; ") + std::string("ranks ") + std::to_string(where->second) + " and " +
              std::to_string(rank) + " on " + hosts[rank] + " GPU " + device_ids[rank];
  }
  EPIC_CHECK(
      shared.empty(), ErrorCode::kInvalidArgument,
      "two ranks of the NCCL communicator would share one GPU (" + shared +
          "): NCCL needs one GPU per rank; drop --device so each rank takes its node-local rank's GPU, "
          "or launch fewer ranks per node");
}

}  // namespace epic
