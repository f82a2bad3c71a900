// Communicator over MPI on host buffers: every collective is a non-blocking MPI call polled until it
// completes or CommOptions::timeout_seconds runs out (then Error(kTimeout)). One caller at a time.
// MPI lets a rank finish a collective locally when it needs nothing from a missing peer (an all-to-all-v
// with nothing to receive from it), so a timeout fires only where this rank really waits.
#pragma once

#include <mpi.h>

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"

namespace epic {

class MpiCommunicator final : public Communicator {
 public:
  // Initialises MPI (MPI_THREAD_SERIALIZED) unless someone already did; the last MpiCommunicator of
  // the process finalises it only if one of them initialised it. Works on a duplicate of
  // MPI_COMM_WORLD with MPI_ERRORS_RETURN, so MPI failures become Error(kCommunication).
  explicit MpiCommunicator(const CommOptions& options = {});
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  // The typed helpers share their names with the byte-level overrides below.
  using Communicator::all_to_all_v;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "mpi"; }

  void all_to_all_v(const void* send, const std::vector<int64_t>& send_bytes,
                    const std::vector<int64_t>& send_offsets, void* recv,
                    const std::vector<int64_t>& recv_bytes,
                    const std::vector<int64_t>& recv_offsets) override;
  void all_gather(const void* send, int64_t bytes, void* recv) override;
  void broadcast(void* data, int64_t bytes, int root) override;
  void barrier() override;

  // The duplicated world communicator the collectives run on (e.g. to bootstrap NCCL through MPI).
  MPI_Comm mpi_comm() const { return comm_; }
  const CommOptions& options() const { return options_; }
  // For phases that need a different bound (a slow startup, a test that provokes a timeout); local to
  // this rank, ranks need not agree.
  void set_timeout_seconds(double timeout_seconds);
  // True after a collective timed out and its peers have not joined yet. The next collective first
  // waits (bounded) for it; the data it delivers late is dropped, the byte counters count it.
  bool has_pending_operation() const { return pending_ != nullptr; }

 private:
  // One collective in flight with everything MPI may still touch: staging buffers (a timed-out request
  // cannot be cancelled, MPI forbids cancelling collectives, so it reads and writes these until the late
  // peers arrive, long after the caller's own buffers are gone) and the count arrays (MPI-3 requires
  // them unchanged until completion).
  struct Operation {
    std::string name;
    MPI_Request request = MPI_REQUEST_NULL;
    std::vector<std::byte> send_staging;
    std::vector<std::byte> recv_staging;
    std::vector<int> send_counts, send_displacements, recv_counts, recv_displacements;
    uint64_t bytes_sent = 0;      // to other ranks, added to the counters on completion
    uint64_t bytes_received = 0;  // from other ranks
  };

  // Completes an operation left pending by a timeout, or throws Error(kTimeout) naming `operation`.
  void finish_pending(const char* operation);
  // Starts tracking a new collective in current_ (after finish_pending).
  Operation& begin(const char* operation);
  // Polls current_.request until done (adds its bytes to the counters) or the deadline (moves it to
  // pending_ and throws Error(kTimeout)).
  void wait_for_current();
  // MPI_Test until done (true) or timeout_seconds passed (false); spins ~1 ms, then sleeps between polls.
  bool test_until_deadline(MPI_Request* request);
  std::string timeout_message(const std::string& what) const;

  CommOptions options_;
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 0;
  Operation current_;
  std::unique_ptr<Operation> pending_;
};

}  // namespace epic
