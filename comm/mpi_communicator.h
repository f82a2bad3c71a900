// Communicator over MPI on host buffers: every collective is a non-blocking MPI call polled until it
// completes or CommOptions::timeout_seconds runs out (then Error(kTimeout)). One caller at a time.
// MPI lets a rank finish a collective locally when it needs nothing from a missing peer (an all-to-all-v
// with nothing to receive from it), so a timeout fires only where this rank really waits.
// Collectives are numbered per communicator; through the host's PeerMonitor a timeout names the ranks
// that did not reach the collective and what they are doing, and a same-host peer's death ends the wait
// at once with Error(kCommunication) naming it.
// Payloads of any size: MPI counts are int, so no MPI call carries more than
// CommOptions::max_message_bytes (1 GiB by default). all_to_all_v moves each pair's block as
// point-to-point messages of at most that size (every pair knows its block's size, so no rank needs
// to know the others'); all_gather and broadcast, whose size every rank knows, run one collective per
// piece. The pieces of one operation are all in flight at once and complete together.
#pragma once

#include <mpi.h>

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm/peer_monitor.h"

namespace epic {

class MpiCommunicator final : public Communicator {
 public:
  // Initialises MPI (MPI_THREAD_SERIALIZED) unless someone already did; the last MpiCommunicator of
  // the process finalises it only if one of them initialised it (bounded: a peer that never reaches
  // MPI_Finalize ends this process with a message instead of hanging it). Works on a duplicate of
  // MPI_COMM_WORLD with MPI_ERRORS_RETURN, so MPI failures become Error(kCommunication). The first one
  // of the process also sets up the PeerMonitor (a collective: every rank creates its communicators
  // in the same order).
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
  // Collectives started on this communicator so far (the number in messages: "all_to_all_v #23").
  int64_t collectives_started() const { return sequence_; }
  // Which communicator of the process this is (0 = the first created), the same on every rank.
  int comm_index() const { return comm_index_; }

 private:
  // One collective in flight with everything MPI may still touch: its requests (one per message or
  // collective piece) and staging buffers (a timed-out request cannot be cancelled, MPI forbids
  // cancelling collectives, so it reads and writes these until the late peers arrive, long after the
  // caller's own buffers are gone).
  struct Operation {
    std::string name;  // "all_to_all_v #23 (MoE layer dispatch)"
    int64_t sequence = 0;
    std::vector<MPI_Request> requests;
    std::vector<std::byte> send_staging;
    std::vector<std::byte> recv_staging;
    std::vector<int64_t> recv_positions;  // all_to_all_v: where each peer's block lies in recv_staging
    uint64_t bytes_sent = 0;              // to other ranks, added to the counters on completion
    uint64_t bytes_received = 0;          // from other ranks
  };

  // end_job_after_error: claims the report through the PeerMonitor (one rank per host prints), then
  // MPI_Abort. A rank that does not report waits a moment for the reporter's abort, so the report is not
  // cut off.
  void end_job(const std::function<void()>& report, int exit_code) override;

  enum class WaitResult { kDone, kTimedOut, kPeerDied };

  // Completes an operation left pending by a timeout, or throws Error(kTimeout) naming `operation`.
  void finish_pending(const char* operation);
  // Starts tracking a new collective in current_ (after finish_pending): numbers it, publishes it.
  Operation& begin(CollectiveKind kind);
  // Posts the MPI calls of current_ through `post` (each adds its request); if one fails, the ones already
  // posted keep current_'s buffers, so it is abandoned (leaked) before the error goes on.
  template <typename Post>
  void post_current(Post&& post);
  // Polls current_.requests until all are done (adds its bytes to the counters), the deadline or a peer's
  // death (moves it to pending_ and throws Error(kTimeout) or Error(kCommunication)).
  void wait_for_current();
  // MPI_Testall until done, timeout_seconds passed or a same-host peer died; spins ~1 ms, then sleeps
  // between polls. An MPI error throws, naming the failing request's own error.
  WaitResult test_until_deadline(std::vector<MPI_Request>* requests, double timeout_seconds);
  // An operation whose requests may still be active after an MPI error: MPI may touch its buffers, so
  // they are never freed (the job is broken, nothing is reused).
  static void abandon(Operation&& operation);
  // Start-up waits (MPI_Comm_idup, the PeerMonitor exchange): throws Error(kTimeout) naming `what`.
  void wait_for_startup(MPI_Request* request, const std::string& what);
  void set_up_peer_monitor();
  // Every rank must split payloads at the same size: a start-up exchange checks it, on every rank alike.
  void check_max_message_bytes_agree();
  std::string timeout_message(const std::string& what) const;
  std::string fault_message(WaitResult result, const Operation& operation) const;

  CommOptions options_;
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 0;
  int comm_index_ = 0;
  int64_t sequence_ = 0;
  PeerMonitor* monitor_ = nullptr;  // null when shared memory is unavailable
  Operation current_;
  std::unique_ptr<Operation> pending_;
};

}  // namespace epic
