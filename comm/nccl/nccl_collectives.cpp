// NcclCommunicator's collectives: host-side argument checks, then NCCL calls enqueued on the stream.
// Each returns once enqueued; synchronize() waits (bounded) for them.
#include <span>
#include <string>
#include <vector>

#include "comm/nccl/collective_arguments.h"
#include "comm/nccl/nccl_communicator.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/error.h"

// An NCCL call whose result goes through check_call (in-progress waits, errors abort and throw).
#define EPIC_NCCL_CALL(statement) check_call((statement), #statement, __FILE__, __LINE__)

namespace epic {

namespace {

const std::byte* byte_pointer(const void* pointer) { return static_cast<const std::byte*>(pointer); }
std::byte* byte_pointer(void* pointer) { return static_cast<std::byte*>(pointer); }

}  // namespace

void NcclCommunicator::all_to_all_v(const AllToAllLayout& layout, cudaStream_t on) {
  enqueue_all_to_all_v(layout, "all_to_all_v", on != nullptr ? on : stream_);
}

void NcclCommunicator::exchange_counts(const int64_t* send_counts, int64_t* recv_counts, cudaStream_t on) {
  check_element_arguments(rank_, "exchange_counts", send_counts, recv_counts, size_);
  AllToAllLayout layout;
  layout.send = send_counts;
  layout.recv = recv_counts;
  layout.send_buffer_bytes = layout.recv_buffer_bytes = size_ * static_cast<int64_t>(sizeof(int64_t));
  for (int peer = 0; peer < size_; ++peer) {
    layout.send_bytes.push_back(sizeof(int64_t));
    layout.send_offsets.push_back(peer * static_cast<int64_t>(sizeof(int64_t)));
  }
  layout.recv_bytes = layout.send_bytes;
  layout.recv_offsets = layout.send_offsets;
  enqueue_all_to_all_v(layout, "exchange_counts", on != nullptr ? on : stream_);
}

void NcclCommunicator::verify_pairwise_counts(const AllToAllLayout& layout, const char* operation) {
  // What each peer sends this rank, through the host: one int64 per pair.
  const std::vector<int64_t> ones(static_cast<size_t>(size_), 1);
  const std::vector<int64_t> peers_send_me =
      host_.all_to_all_v_known<int64_t>(std::span<const int64_t>(layout.send_bytes), ones, ones);
  std::string mismatch;
  for (int peer = 0; peer < size_; ++peer) {
    if (peers_send_me[peer] == layout.recv_bytes[peer]) continue;
    mismatch += (mismatch.empty() ? "" : "; ") + std::string("rank ") + std::to_string(peer) + " sends " +
                std::to_string(peers_send_me[peer]) + " bytes, recv_bytes[" + std::to_string(peer) +
                "] = " + std::to_string(layout.recv_bytes[peer]);
  }
  // Every rank learns whether any pair disagrees, so none goes on into an exchange that would hang.
  const std::vector<int32_t> disagrees = host_.all_gather_value<int32_t>(mismatch.empty() ? 0 : 1);
  std::string ranks;
  for (int peer = 0; peer < size_; ++peer)
    if (disagrees[peer]) ranks += (ranks.empty() ? "" : ", ") + std::to_string(peer);
  EPIC_CHECK(ranks.empty(), ErrorCode::kInvalidArgument,
             "rank " + std::to_string(rank_) + ": NCCL " + operation +
                 ": block sizes disagree between ranks (" +
                 (mismatch.empty() ? "found by rank(s) " + ranks + ", see their message"
                                   : "for this rank: " + mismatch) +
                 ")");
}

void NcclCommunicator::enqueue_all_to_all_v(const AllToAllLayout& layout, const char* operation,
                                            cudaStream_t stream) {
  check_all_to_all_v_arguments(rank_, size_, layout);
  if (nccl_options_.verify_counts) verify_pairwise_counts(layout, operation);
  uint64_t bytes_sent = 0;
  uint64_t bytes_received = 0;
  for (int peer = 0; peer < size_; ++peer) {
    if (peer == rank_) continue;
    bytes_sent += static_cast<uint64_t>(layout.send_bytes[peer]);
    bytes_received += static_cast<uint64_t>(layout.recv_bytes[peer]);
  }
  begin(operation, bytes_sent, bytes_received);

  // The own block never leaves the GPU.
  if (layout.send_bytes[rank_] > 0) {
    EPIC_CUDA_CHECK(cudaMemcpyAsync(byte_pointer(layout.recv) + layout.recv_offsets[rank_],
                                    byte_pointer(layout.send) + layout.send_offsets[rank_],
                                    static_cast<size_t>(layout.send_bytes[rank_]), cudaMemcpyDeviceToDevice,
                                    stream));
  }
  // One group: NCCL pairs every send with its peer's receive whatever the order, so no rank waits on
  // another's loop. A failed call inside still closes the group (the group depth is per thread).
  EPIC_NCCL_CALL(ncclGroupStart());
  ncclResult_t first_failure = ncclSuccess;
  for (int peer = 0; peer < size_ && first_failure == ncclSuccess; ++peer) {
    if (peer == rank_) continue;
    if (layout.send_bytes[peer] > 0) {
      first_failure = ncclSend(byte_pointer(layout.send) + layout.send_offsets[peer],
                               static_cast<size_t>(layout.send_bytes[peer]), ncclUint8, peer, comm_, stream);
    }
    if (first_failure == ncclSuccess && layout.recv_bytes[peer] > 0) {
      first_failure = ncclRecv(byte_pointer(layout.recv) + layout.recv_offsets[peer],
                               static_cast<size_t>(layout.recv_bytes[peer]), ncclUint8, peer, comm_, stream);
    }
  }
  const ncclResult_t group_end = ncclGroupEnd();
  if (first_failure != ncclInProgress)
    check_call(first_failure, "ncclSend / ncclRecv in the group", __FILE__, __LINE__);
  check_call(group_end, "ncclGroupEnd()", __FILE__, __LINE__);
}

void NcclCommunicator::all_gather(const void* send, int64_t bytes, void* recv) {
  check_all_gather_arguments(rank_, size_, send, bytes, recv);
  const uint64_t others = static_cast<uint64_t>(bytes) * static_cast<uint64_t>(size_ - 1);
  begin("all_gather", others, others);
  // Every rank passes the same size, so every rank skips an empty one alike.
  if (bytes == 0) return;
  EPIC_NCCL_CALL(ncclAllGather(send, recv, static_cast<size_t>(bytes), ncclUint8, comm_, stream_));
}

void NcclCommunicator::broadcast(void* data, int64_t bytes, int root) {
  check_broadcast_arguments(rank_, size_, data, bytes, root);
  const uint64_t payload = static_cast<uint64_t>(bytes);
  begin("broadcast", rank_ == root ? payload * static_cast<uint64_t>(size_ - 1) : 0,
        rank_ == root ? 0 : payload);
  if (bytes == 0) return;
  EPIC_NCCL_CALL(ncclBroadcast(data, data, static_cast<size_t>(bytes), ncclUint8, root, comm_, stream_));
}

void NcclCommunicator::all_reduce_sum(const int32_t* send, int32_t* recv, int64_t count) {
  enqueue_all_reduce_sum(send, recv, count, ncclInt32, sizeof(int32_t));
}

void NcclCommunicator::all_reduce_sum(const int64_t* send, int64_t* recv, int64_t count) {
  enqueue_all_reduce_sum(send, recv, count, ncclInt64, sizeof(int64_t));
}

void NcclCommunicator::enqueue_all_reduce_sum(const void* send, void* recv, int64_t count,
                                              ncclDataType_t type, size_t element_bytes) {
  check_element_arguments(rank_, "all_reduce_sum", send, recv, count);
  const uint64_t others = static_cast<uint64_t>(count) * element_bytes * static_cast<uint64_t>(size_ - 1);
  begin("all_reduce_sum", others, others);
  if (count == 0) return;
  EPIC_NCCL_CALL(ncclAllReduce(send, recv, static_cast<size_t>(count), type, ncclSum, comm_, stream_));
}

}  // namespace epic
