// The communicator interface of the expert-parallel data plane: all-to-all-v, all-gather,
// broadcast, barrier between the worker ranks. MpiCommunicator moves host buffers; an NCCL
// implementation on device buffers slots in beside it (same calls, device pointers).
// Every wait is bounded by CommOptions::timeout_seconds and fails with Error(kTimeout) naming
// this rank and the operation (and the peers that did not answer, where the transport knows them).
// A peer that dies fails the wait at once with Error(kCommunication) naming it (where it can be seen).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace epic {

struct CommOptions {
  double timeout_seconds = 300.0;
  // The most bytes one MPI call carries (MPI counts are int): MpiCommunicator sends a larger payload as
  // several messages of at most this size, in order, so payloads of any size go through. The same on
  // every rank (checked when the communicator is made), 1 to 2^31 - 1. Tests lower it so small payloads
  // take the same path; EPIC_TEST_MPI_MESSAGE_BYTES overrides it (test use only).
  int64_t max_message_bytes = int64_t{1} << 30;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string name() const = 0;  // "mpi", "self"

  // Byte-level collectives. all_to_all_v: this rank sends send_bytes[r] bytes starting at
  // send + send_offsets[r] to rank r, and receives recv_bytes[r] bytes from rank r at
  // recv + recv_offsets[r]. Sizes must agree pairwise (send_bytes[r] here == recv_bytes[me] on r).
  virtual void all_to_all_v(const void* send, const std::vector<int64_t>& send_bytes,
                            const std::vector<int64_t>& send_offsets, void* recv,
                            const std::vector<int64_t>& recv_bytes,
                            const std::vector<int64_t>& recv_offsets) = 0;
  // recv holds size() * bytes: rank r's contribution at recv + r * bytes.
  virtual void all_gather(const void* send, int64_t bytes, void* recv) = 0;
  virtual void broadcast(void* data, int64_t bytes, int root) = 0;
  virtual void barrier() = 0;

  // Typed helpers over the byte-level calls.
  // Each rank sends counts[r] elements of T (consecutive in `send`, rank 0's first) to rank r and
  // receives, rank by rank, what the others send it. Exchanges counts first. Returns the received
  // elements and fills recv_counts (elements from each rank).
  template <typename T>
  std::vector<T> all_to_all_v(std::span<const T> send, const std::vector<int64_t>& send_counts,
                              std::vector<int64_t>* recv_counts);
  // Like above but the receive counts are already known (e.g. the reverse of an earlier exchange).
  template <typename T>
  std::vector<T> all_to_all_v_known(std::span<const T> send, const std::vector<int64_t>& send_counts,
                                    const std::vector<int64_t>& recv_counts);
  template <typename T>
  std::vector<T> all_gather_value(const T& value);
  // Variable-sized all-gather: every rank gets every rank's vector, in rank order.
  template <typename T>
  std::vector<std::vector<T>> all_gather_v(std::span<const T> send);
  // Broadcast a byte string (e.g. a cereal-serialised plan) from root.
  std::string broadcast_bytes(const std::string& data, int root);

  // Payload bytes to and from other ranks (never this rank's own block), counted when a collective
  // completes: a broadcast root sends bytes * (size() - 1), whatever tree MPI uses underneath.
  uint64_t bytes_sent() const { return bytes_sent_; }
  uint64_t bytes_received() const { return bytes_received_; }

  // Names what the collectives in its scope are for ("MoE layer dispatch"): timeout and failure messages
  // say it, on this rank and on the ranks that wait for it. Restores the previous name at scope end.
  class Activity {
   public:
    Activity(Communicator& comm, std::string name)
        : comm_(comm), previous_(std::exchange(comm.activity_, std::move(name))) {}
    ~Activity() { comm_.activity_ = std::move(previous_); }
    Activity(const Activity&) = delete;
    Activity& operator=(const Activity&) = delete;

   private:
    Communicator& comm_;
    std::string previous_;
  };
  const std::string& activity() const { return activity_; }

  // Ends the whole job after an error the ranks did not raise together (a timeout, a stuck or dead
  // peer, a failure on this rank alone), without waiting for any peer: a barrier or MPI_Finalize would
  // wait for the rank that is gone. report() prints the error; it runs on one rank only (one per host,
  // for what a host can see), so the job says it once. Never returns. The one-rank communicator runs
  // report() and exits with exit_code.
  [[noreturn]] void end_job_after_error(const std::function<void()>& report, int exit_code);

 protected:
  // The implementation's part of end_job_after_error (it should not return; if it does, the process exits).
  virtual void end_job(const std::function<void()>& report, int exit_code);

  uint64_t bytes_sent_ = 0;
  uint64_t bytes_received_ = 0;
  std::string activity_;
};

// MPI when launched under mpirun/srun (or when MPI is already initialised), else a one-rank
// SelfCommunicator. The returned object owns MPI init/finalize when it initialised MPI.
std::unique_ptr<Communicator> make_communicator(const CommOptions& options);
// A one-rank communicator (single process, no MPI).
std::unique_ptr<Communicator> make_self_communicator();
// True when the environment shows an MPI launcher: OMPI_COMM_WORLD_SIZE (mpirun), PMIX_RANK
// (srun --mpi=pmix and other PMIx launchers), PMI_RANK or PMI_SIZE (PMI-1/2 launchers).
bool launched_under_mpi();

}  // namespace epic

#include "comm/communicator_inl.h"
