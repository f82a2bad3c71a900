// Host-side checks of the NCCL communicator's arguments, before anything reaches the GPU: a block out of
// its buffer or two receive blocks on the same bytes would be silent corruption on the device. Pure
// functions (no CUDA) so they are unit-tested anywhere. Each throws Error(kInvalidArgument) naming the
// rank and the operation ("rank 1: NCCL all_to_all_v: ...").
#pragma once

#include <cstdint>
#include <vector>

namespace epic {

// One rank's side of an all_to_all_v: per peer, a block of bytes at an offset in each buffer.
struct AllToAllLayout {
  const void* send = nullptr;
  int64_t send_buffer_bytes = 0;  // the send buffer's size: every block must lie inside it
  std::vector<int64_t> send_bytes;
  std::vector<int64_t> send_offsets;
  void* recv = nullptr;
  int64_t recv_buffer_bytes = 0;
  std::vector<int64_t> recv_bytes;
  std::vector<int64_t> recv_offsets;
};

// One entry per rank, none negative, every block inside its buffer, a buffer wherever a byte moves, this
// rank's own block the same size both ways, no two receive blocks and no receive block and the send
// buffer on the same bytes. What it cannot check: that peer p's send_bytes[me] equals my recv_bytes[p]
// (NcclOptions::verify_counts does, through the host).
void check_all_to_all_v_arguments(int rank, int num_ranks, const AllToAllLayout& layout);
// recv holds num_ranks * bytes.
void check_all_gather_arguments(int rank, int num_ranks, const void* send, int64_t bytes, const void* recv);
void check_broadcast_arguments(int rank, int num_ranks, const void* data, int64_t bytes, int root);
// Element-wise operations (all_reduce_sum, exchange_counts): a count >= 0 and buffers when it is not 0.
void check_element_arguments(int rank, const char* operation, const void* send, const void* recv,
                             int64_t count);

}  // namespace epic
