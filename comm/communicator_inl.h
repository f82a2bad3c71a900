// The typed helpers of Communicator (communicator.h), written once over the byte-level virtual calls
// so every implementation (MPI, self, NCCL) gets them with the same argument checks.
#pragma once

#include <cstring>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/error.h"

namespace epic {

namespace comm_detail {

// Checks one count per rank, none negative, and returns their sum.
inline int64_t checked_count_total(const std::vector<int64_t>& counts, int num_ranks, int rank,
                                   const char* operation, const char* argument) {
  if (counts.size() != static_cast<size_t>(num_ranks)) {
    throw Error(ErrorCode::kInvalidArgument, "rank " + std::to_string(rank) + ": " + operation + ": " +
                                                 argument + " has " + std::to_string(counts.size()) +
                                                 " entries; it needs one per rank (" +
                                                 std::to_string(num_ranks) + ")");
  }
  int64_t total = 0;
  for (int peer = 0; peer < num_ranks; ++peer) {
    if (counts[peer] < 0) {
      throw Error(ErrorCode::kInvalidArgument, "rank " + std::to_string(rank) + ": " + operation + ": " +
                                                   argument + "[" + std::to_string(peer) +
                                                   "] = " + std::to_string(counts[peer]) + " is negative");
    }
    total += counts[peer];
  }
  return total;
}

// Element counts -> byte counts and byte offsets of consecutive blocks in rank order.
inline void counts_to_byte_layout(const std::vector<int64_t>& counts, size_t element_bytes,
                                  std::vector<int64_t>* bytes, std::vector<int64_t>* offsets) {
  bytes->resize(counts.size());
  offsets->resize(counts.size());
  int64_t offset = 0;
  for (size_t peer = 0; peer < counts.size(); ++peer) {
    (*bytes)[peer] = counts[peer] * static_cast<int64_t>(element_bytes);
    (*offsets)[peer] = offset;
    offset += (*bytes)[peer];
  }
}

}  // namespace comm_detail

template <typename T>
std::vector<T> Communicator::all_to_all_v(std::span<const T> send, const std::vector<int64_t>& send_counts,
                                          std::vector<int64_t>* recv_counts) {
  static_assert(std::is_trivially_copyable_v<T>, "collectives move raw bytes: T must be trivially copyable");
  comm_detail::checked_count_total(send_counts, size(), rank(), "all_to_all_v", "send_counts");
  // One int64 to every rank: what it will receive from us.
  const int num_ranks = size();
  std::vector<int64_t> counts_from_peers(num_ranks, 0);
  std::vector<int64_t> count_bytes(num_ranks, static_cast<int64_t>(sizeof(int64_t)));
  std::vector<int64_t> count_offsets(num_ranks);
  for (int peer = 0; peer < num_ranks; ++peer)
    count_offsets[peer] = peer * static_cast<int64_t>(sizeof(int64_t));
  all_to_all_v(send_counts.data(), count_bytes, count_offsets, counts_from_peers.data(), count_bytes,
               count_offsets);
  std::vector<T> received = all_to_all_v_known(send, send_counts, counts_from_peers);
  if (recv_counts != nullptr) *recv_counts = std::move(counts_from_peers);
  return received;
}

template <typename T>
std::vector<T> Communicator::all_to_all_v_known(std::span<const T> send,
                                                const std::vector<int64_t>& send_counts,
                                                const std::vector<int64_t>& recv_counts) {
  static_assert(std::is_trivially_copyable_v<T>, "collectives move raw bytes: T must be trivially copyable");
  const int64_t send_total =
      comm_detail::checked_count_total(send_counts, size(), rank(), "all_to_all_v", "send_counts");
  const int64_t recv_total =
      comm_detail::checked_count_total(recv_counts, size(), rank(), "all_to_all_v", "recv_counts");
  if (send_total != static_cast<int64_t>(send.size())) {
    throw Error(ErrorCode::kInvalidArgument,
                "rank " + std::to_string(rank()) + ": all_to_all_v: send_counts add up to " +
                    std::to_string(send_total) + " elements but the send span holds " +
                    std::to_string(send.size()));
  }
  std::vector<int64_t> send_bytes, send_offsets, recv_bytes, recv_offsets;
  comm_detail::counts_to_byte_layout(send_counts, sizeof(T), &send_bytes, &send_offsets);
  comm_detail::counts_to_byte_layout(recv_counts, sizeof(T), &recv_bytes, &recv_offsets);
  std::vector<T> received(static_cast<size_t>(recv_total));
  all_to_all_v(static_cast<const void*>(send.data()), send_bytes, send_offsets,
               static_cast<void*>(received.data()), recv_bytes, recv_offsets);
  return received;
}

template <typename T>
std::vector<T> Communicator::all_gather_value(const T& value) {
  static_assert(std::is_trivially_copyable_v<T>, "collectives move raw bytes: T must be trivially copyable");
  std::vector<T> gathered(static_cast<size_t>(size()));
  all_gather(&value, static_cast<int64_t>(sizeof(T)), gathered.data());
  return gathered;
}

template <typename T>
std::vector<std::vector<T>> Communicator::all_gather_v(std::span<const T> send) {
  static_assert(std::is_trivially_copyable_v<T>, "collectives move raw bytes: T must be trivially copyable");
  const int num_ranks = size();
  const std::vector<int64_t> counts = all_gather_value<int64_t>(static_cast<int64_t>(send.size()));
  // An all-to-all-v where every rank gets the same block (offset 0) from us: the byte-level
  // interface has no all-gather-v, and this moves exactly what one would.
  const int64_t my_bytes = static_cast<int64_t>(send.size_bytes());
  std::vector<int64_t> send_bytes(num_ranks, my_bytes);
  std::vector<int64_t> send_offsets(num_ranks, 0);
  std::vector<int64_t> recv_bytes, recv_offsets;
  comm_detail::counts_to_byte_layout(counts, sizeof(T), &recv_bytes, &recv_offsets);
  const int64_t recv_total = std::accumulate(counts.begin(), counts.end(), int64_t{0});
  std::vector<T> flat(static_cast<size_t>(recv_total));
  all_to_all_v(static_cast<const void*>(send.data()), send_bytes, send_offsets,
               static_cast<void*>(flat.data()), recv_bytes, recv_offsets);
  std::vector<std::vector<T>> gathered(static_cast<size_t>(num_ranks));
  auto block_begin = flat.begin();
  for (int peer = 0; peer < num_ranks; ++peer) {
    gathered[peer].assign(block_begin, block_begin + counts[peer]);
    block_begin += counts[peer];
  }
  return gathered;
}

}  // namespace epic
