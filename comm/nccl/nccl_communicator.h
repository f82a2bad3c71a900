// Collectives on device buffers through NCCL, on one CUDA stream, bootstrapped through a host
// Communicator (the MPI one). Calls enqueue on the stream and return; synchronize() waits for them,
// bounded by CommOptions::timeout_seconds: an NCCL error or a peer that never joins aborts the NCCL
// communicator and throws Error(kCommunication / kTimeout) naming this rank, the operations and the
// host communicator's Activity, and (through the PeerMonitor, for ranks of this host) the rank that
// holds the wait up and what it is doing. Nothing here waits unbounded, the destructor and the abort
// included (see abort_within_grace in the .cpp).
// Not a Communicator subclass on purpose: its typed helpers take host vectors, which NCCL cannot read.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm/nccl/collective_arguments.h"
#include "comm/nccl/select_device.h"
#include "comm/peer_monitor.h"

namespace epic {

struct NcclOptions {
  std::optional<int> device;      // --device: this CUDA device instead of the node-local rank's
  cudaStream_t stream = nullptr;  // the stream to enqueue on; null: the communicator creates and owns one
  // all_to_all_v first checks through the host communicator that every pair agrees on its block sizes
  // (a host round trip per call: for tests and debugging; a mismatch otherwise corrupts or hangs).
  bool verify_counts = false;
};

class NcclCommunicator {
 public:
  // A collective over `host` (every rank of it calls this): chooses and activates the device
  // (select_device), rank 0 makes the NCCL unique id and broadcasts it through `host`, every rank
  // joins a non-blocking NCCL communicator (start-up bounded by the timeout). `host` must outlive this.
  // Sets NCCL_NVLS_ENABLE=0 when unset (see nccl_communicator.cpp).
  NcclCommunicator(Communicator& host, const CommOptions& options, const NcclOptions& nccl_options = {});
  // Never waits unbounded: aborts when a collective is still pending, else finalizes within the timeout
  // (aborting if a peer keeps it from finishing) and destroys.
  ~NcclCommunicator();
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int device() const { return device_.device; }
  const SelectedDevice& selected_device() const { return device_; }
  cudaStream_t stream() const { return stream_; }

  // The collectives of Communicator on device pointers, enqueued on stream(). all_to_all_v: this rank
  // sends send_bytes[r] bytes at send + send_offsets[r] to rank r and receives recv_bytes[r] bytes from
  // rank r at recv + recv_offsets[r]; sizes must agree pairwise; layout.send/recv_buffer_bytes bound the
  // blocks (checked on the host). The own block is a device-to-device copy.
  // `on`: another stream to enqueue on (null: stream()), e.g. a communication stream that overlaps the
  // compute on stream(); the caller joins it back into stream() (an event) before synchronize(), which
  // then covers that work too. Every rank must still issue the collectives in the same order.
  void all_to_all_v(const AllToAllLayout& layout, cudaStream_t on = nullptr);
  // recv holds size() * bytes: rank r's contribution at recv + r * bytes.
  void all_gather(const void* send, int64_t bytes, void* recv);
  void broadcast(void* data, int64_t bytes, int root);
  // Element-wise sums over the ranks (send == recv allowed): handy for counts.
  void all_reduce_sum(const int32_t* send, int32_t* recv, int64_t count);
  void all_reduce_sum(const int64_t* send, int64_t* recv, int64_t count);
  // The count exchange of a dispatch without a host round trip: send_counts[r] (one int64 on the device
  // per rank) goes to rank r, which finds it at recv_counts[this rank].
  void exchange_counts(const int64_t* send_counts, int64_t* recv_counts, cudaStream_t on = nullptr);

  // Waits until everything enqueued on stream() (collectives and whatever else is on it) is done,
  // at most CommOptions::timeout_seconds; see the header comment for what a failure does.
  void synchronize();
  // Ends the NCCL communicator now without waiting for any peer (what a fault does); later calls throw.
  void abort();
  bool aborted() const { return comm_ == nullptr; }

  // Payload bytes to and from other ranks of the collectives synchronize() saw complete.
  uint64_t bytes_sent() const { return bytes_sent_; }
  uint64_t bytes_received() const { return bytes_received_; }

 private:
  enum class Readiness { kReady, kTimedOut };

  void initialize(Communicator& host);
  void enqueue_all_to_all_v(const AllToAllLayout& layout, const char* operation, cudaStream_t stream);
  // NcclOptions::verify_counts: every pair's block sizes compared through the host; every rank throws
  // Error(kInvalidArgument) when any pair disagrees.
  void verify_pairwise_counts(const AllToAllLayout& layout, const char* operation);
  void enqueue_all_reduce_sum(const void* send, void* recv, int64_t count, ncclDataType_t type,
                              size_t element_bytes);
  // Starts one operation: the device current, the communicator usable, its name on the pending list.
  void begin(const char* operation, uint64_t bytes_sent, uint64_t bytes_received);
  // An NCCL call's result: ncclInProgress waits (bounded) for the communicator to be ready again, which
  // non-blocking NCCL requires before the next call; an error aborts and throws.
  void check_call(ncclResult_t result, const char* statement, const char* file, int line);
  // Polls ncclCommGetAsyncError until it is not ncclInProgress, or the deadline; an error aborts, throws.
  Readiness wait_until_ready(double timeout_seconds, const std::string& what);
  // Aborts and throws Error(code) with "rank R: NCCL <pending ops> (<activity>) on CUDA device D: <what>".
  [[noreturn]] void fail(ErrorCode code, const std::string& what);
  std::string pending_names() const;
  std::string describe_async_error(ncclResult_t error) const;

  Communicator& host_;
  CommOptions options_;
  NcclOptions nccl_options_;
  SelectedDevice device_;
  int rank_ = 0;
  int size_ = 0;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  bool owns_stream_ = false;
  int64_t sequence_ = 0;
  std::vector<std::string> pending_;  // "all_to_all_v #12": enqueued since the last synchronize
  uint64_t pending_bytes_sent_ = 0;
  uint64_t pending_bytes_received_ = 0;
  uint64_t bytes_sent_ = 0;
  uint64_t bytes_received_ = 0;
  std::string abort_reason_;  // why the communicator was aborted, for later calls' errors
  // This communicator's waits in the PeerMonitor's table (null without one): synchronize() enters wait
  // number waits_ under monitor_index_, so a timeout names the ranks that never reached that wait.
  PeerMonitor* monitor_ = nullptr;
  int monitor_index_ = 0;
  int64_t waits_ = 0;
};

}  // namespace epic
