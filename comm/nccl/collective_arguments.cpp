// The argument checks of collective_arguments.h.
#include "comm/nccl/collective_arguments.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>

#include "kernels/error.h"

namespace epic {

namespace {

std::string prefix(int rank, const char* operation) {
  return "rank " + std::to_string(rank) + ": NCCL " + operation + ": ";
}

void check_per_rank(int rank, int num_ranks, const std::vector<int64_t>& values, const char* argument) {
  EPIC_CHECK(values.size() == static_cast<size_t>(num_ranks), ErrorCode::kInvalidArgument,
             prefix(rank, "all_to_all_v") + argument + " has " + std::to_string(values.size()) +
                 " entries; it needs one per rank (" + std::to_string(num_ranks) + ")");
  for (int peer = 0; peer < num_ranks; ++peer) {
    EPIC_CHECK(values[peer] >= 0, ErrorCode::kInvalidArgument,
               prefix(rank, "all_to_all_v") + argument + "[" + std::to_string(peer) +
                   "] = " + std::to_string(values[peer]) + " is negative");
  }
}

// Every block [offsets[p], offsets[p] + bytes[p]) inside [0, buffer_bytes), and a buffer if any byte moves.
void check_blocks_in_buffer(int rank, const void* buffer, int64_t buffer_bytes,
                            const std::vector<int64_t>& bytes, const std::vector<int64_t>& offsets,
                            const char* side) {
  const std::string what = std::string(side);
  EPIC_CHECK(buffer_bytes >= 0, ErrorCode::kInvalidArgument,
             prefix(rank, "all_to_all_v") + what + "_buffer_bytes = " + std::to_string(buffer_bytes) +
                 " is negative");
  bool moves_bytes = false;
  for (size_t peer = 0; peer < bytes.size(); ++peer) {
    if (bytes[peer] == 0) continue;
    moves_bytes = true;
    // Written so that nothing overflows: offset + bytes could pass INT64_MAX.
    EPIC_CHECK(offsets[peer] <= buffer_bytes && bytes[peer] <= buffer_bytes - offsets[peer],
               ErrorCode::kInvalidArgument,
               prefix(rank, "all_to_all_v") + what + " block of peer " + std::to_string(peer) + " (" +
                   std::to_string(bytes[peer]) + " bytes at offset " + std::to_string(offsets[peer]) +
                   ") ends past the " + what + " buffer's " + std::to_string(buffer_bytes) + " bytes");
  }
  EPIC_CHECK(!moves_bytes || buffer != nullptr, ErrorCode::kInvalidArgument,
             prefix(rank, "all_to_all_v") + what + " buffer is null but " + what + " blocks are not empty");
}

}  // namespace

void check_all_to_all_v_arguments(int rank, int num_ranks, const AllToAllLayout& layout) {
  check_per_rank(rank, num_ranks, layout.send_bytes, "send_bytes");
  check_per_rank(rank, num_ranks, layout.send_offsets, "send_offsets");
  check_per_rank(rank, num_ranks, layout.recv_bytes, "recv_bytes");
  check_per_rank(rank, num_ranks, layout.recv_offsets, "recv_offsets");
  check_blocks_in_buffer(rank, layout.send, layout.send_buffer_bytes, layout.send_bytes, layout.send_offsets,
                         "send");
  check_blocks_in_buffer(rank, layout.recv, layout.recv_buffer_bytes, layout.recv_bytes, layout.recv_offsets,
                         "recv");
  EPIC_CHECK(layout.send_bytes[rank] == layout.recv_bytes[rank], ErrorCode::kInvalidArgument,
             prefix(rank, "all_to_all_v") + "this rank's own block is " +
                 std::to_string(layout.send_bytes[rank]) + " bytes in send_bytes but " +
                 std::to_string(layout.recv_bytes[rank]) +
                 " bytes in recv_bytes; it must be the same both ways");

  // Receive blocks as [begin, end) addresses, sorted: a neighbour that starts before the previous one ends
  // overlaps it (the GPU would write both in no defined order).
  std::vector<std::pair<uintptr_t, int>> blocks;  // (begin, peer)
  for (int peer = 0; peer < num_ranks; ++peer)
    if (layout.recv_bytes[peer] > 0)
      blocks.emplace_back(static_cast<uintptr_t>(layout.recv_offsets[peer]), peer);
  std::sort(blocks.begin(), blocks.end());
  for (size_t index = 1; index < blocks.size(); ++index) {
    const auto [previous_begin, previous_peer] = blocks[index - 1];
    const uintptr_t previous_end = previous_begin + static_cast<uintptr_t>(layout.recv_bytes[previous_peer]);
    EPIC_CHECK(blocks[index].first >= previous_end, ErrorCode::kInvalidArgument,
               prefix(rank, "all_to_all_v") + "the receive blocks of peers " + std::to_string(previous_peer) +
                   " and " + std::to_string(blocks[index].second) + " overlap (offsets " +
                   std::to_string(layout.recv_offsets[previous_peer]) + " and " +
                   std::to_string(layout.recv_offsets[blocks[index].second]) + ")");
  }
  // The send buffer is read while receive blocks are written: the two must not share bytes.
  if (!blocks.empty() && layout.send != nullptr && layout.send_buffer_bytes > 0) {
    const uintptr_t send_begin = reinterpret_cast<uintptr_t>(layout.send);
    const uintptr_t send_end = send_begin + static_cast<uintptr_t>(layout.send_buffer_bytes);
    const uintptr_t recv_base = reinterpret_cast<uintptr_t>(layout.recv);
    for (const auto& [offset, peer] : blocks) {
      const uintptr_t begin = recv_base + offset;
      const uintptr_t end = begin + static_cast<uintptr_t>(layout.recv_bytes[peer]);
      EPIC_CHECK(end <= send_begin || begin >= send_end, ErrorCode::kInvalidArgument,
                 prefix(rank, "all_to_all_v") + "the receive block of peer " + std::to_string(peer) +
                     " lies inside the send buffer; all_to_all_v cannot work in place");
    }
  }
}

void check_all_gather_arguments(int rank, int num_ranks, const void* send, int64_t bytes, const void* recv) {
  EPIC_CHECK(bytes >= 0, ErrorCode::kInvalidArgument,
             prefix(rank, "all_gather") + "bytes = " + std::to_string(bytes) + " is negative");
  EPIC_CHECK(bytes <= std::numeric_limits<int64_t>::max() / std::max(num_ranks, 1),
             ErrorCode::kInvalidArgument,
             prefix(rank, "all_gather") + std::to_string(bytes) + " bytes from each of " +
                 std::to_string(num_ranks) + " ranks overflow a 64-bit size");
  EPIC_CHECK(bytes == 0 || (send != nullptr && recv != nullptr), ErrorCode::kInvalidArgument,
             prefix(rank, "all_gather") + "a null buffer for " + std::to_string(bytes) + " bytes");
}

void check_broadcast_arguments(int rank, int num_ranks, const void* data, int64_t bytes, int root) {
  EPIC_CHECK(root >= 0 && root < num_ranks, ErrorCode::kInvalidArgument,
             prefix(rank, "broadcast") + "root " + std::to_string(root) + " is not a rank (0 to " +
                 std::to_string(num_ranks - 1) + ")");
  EPIC_CHECK(bytes >= 0, ErrorCode::kInvalidArgument,
             prefix(rank, "broadcast") + "bytes = " + std::to_string(bytes) + " is negative");
  EPIC_CHECK(bytes == 0 || data != nullptr, ErrorCode::kInvalidArgument,
             prefix(rank, "broadcast") + "a null buffer for " + std::to_string(bytes) + " bytes");
}

void check_element_arguments(int rank, const char* operation, const void* send, const void* recv,
                             int64_t count) {
  EPIC_CHECK(count >= 0, ErrorCode::kInvalidArgument,
             prefix(rank, operation) + "count = " + std::to_string(count) + " is negative");
  EPIC_CHECK(count == 0 || (send != nullptr && recv != nullptr), ErrorCode::kInvalidArgument,
             prefix(rank, operation) + "a null buffer for " + std::to_string(count) + " elements");
}

}  // namespace epic
