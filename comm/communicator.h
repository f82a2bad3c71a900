// The communicator interface of the expert-parallel data plane: all-to-all-v, all-gather,
// broadcast, barrier between the worker ranks. MpiCommunicator moves host buffers; an NCCL
// implementation on device buffers slots in beside it (same calls, device pointers).
// Every wait is bounded by CommOptions::timeout_seconds and fails with Error(kTimeout) naming
// this rank and the operation (and the peers that did not answer, where the transport knows them).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace epic {

struct CommOptions {
  double timeout_seconds = 300.0;
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

 protected:
  uint64_t bytes_sent_ = 0;
  uint64_t bytes_received_ = 0;
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
