// SelfCommunicator: the collectives of a one-rank world. Nothing crosses a process boundary, so the byte
// counters (bytes to and from other ranks) stay zero.
#include "comm/self_communicator.h"

#include <cstring>

#include "kernels/error.h"

namespace epic {

namespace {

void check_one_entry(const std::vector<int64_t>& values, const char* argument) {
  if (values.size() != 1) {
    throw Error(ErrorCode::kInvalidArgument, std::string("rank 0: all_to_all_v: ") + argument + " has " +
                                                 std::to_string(values.size()) +
                                                 " entries; it needs one per rank (1)");
  }
  if (values[0] < 0) {
    throw Error(ErrorCode::kInvalidArgument, std::string("rank 0: all_to_all_v: ") + argument +
                                                 "[0] = " + std::to_string(values[0]) + " is negative");
  }
}

}  // namespace

void SelfCommunicator::all_to_all_v(const void* send, const std::vector<int64_t>& send_bytes,
                                    const std::vector<int64_t>& send_offsets, void* recv,
                                    const std::vector<int64_t>& recv_bytes,
                                    const std::vector<int64_t>& recv_offsets) {
  check_one_entry(send_bytes, "send_bytes");
  check_one_entry(send_offsets, "send_offsets");
  check_one_entry(recv_bytes, "recv_bytes");
  check_one_entry(recv_offsets, "recv_offsets");
  if (send_bytes[0] != recv_bytes[0]) {
    throw Error(ErrorCode::kInvalidArgument, "rank 0: all_to_all_v: sends " + std::to_string(send_bytes[0]) +
                                                 " bytes to itself but expects to receive " +
                                                 std::to_string(recv_bytes[0]));
  }
  if (send_bytes[0] == 0) return;
  std::memmove(static_cast<char*>(recv) + recv_offsets[0], static_cast<const char*>(send) + send_offsets[0],
               static_cast<size_t>(send_bytes[0]));
}

void SelfCommunicator::all_gather(const void* send, int64_t bytes, void* recv) {
  if (bytes < 0) {
    throw Error(ErrorCode::kInvalidArgument,
                "rank 0: all_gather: bytes = " + std::to_string(bytes) + " is negative");
  }
  if (bytes > 0 && send != recv) std::memmove(recv, send, static_cast<size_t>(bytes));
}

void SelfCommunicator::broadcast(void* /*data*/, int64_t bytes, int root) {
  if (root != 0) {
    throw Error(ErrorCode::kInvalidArgument, "rank 0: broadcast: root " + std::to_string(root) +
                                                 " is not a rank of this 1-rank communicator");
  }
  if (bytes < 0) {
    throw Error(ErrorCode::kInvalidArgument,
                "rank 0: broadcast: bytes = " + std::to_string(bytes) + " is negative");
  }
}

std::unique_ptr<Communicator> make_self_communicator() { return std::make_unique<SelfCommunicator>(); }

}  // namespace epic
