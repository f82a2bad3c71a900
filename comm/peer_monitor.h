// What the ranks of one host can see of each other without MPI, so that a fault names the rank at fault:
// a small shared-memory table (one slot per rank: pid, state, the collective it is in and since when)
// mapped by every rank of the host, the pid and host of every rank, and a watcher thread that notices a
// same-host peer's death the moment it happens (pidfd), before the launcher starts killing the job.
// Lock-free atomics only, so the SIGTERM handler can read it. Ranks on other hosts are not seen but asked
// (liveness_probe.h): when the launcher ends the job (SIGTERM) with nothing reported, the watcher probes
// them, and the first live host's reporter names the host or ranks that are gone or unreachable.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "comm/liveness_probe.h"

namespace epic {

// kDeviceWait: a host wait for a device communicator's collectives (NcclCommunicator::synchronize), whose
// sequence counts those waits: every rank makes the same waits in the same order.
enum class CollectiveKind : int32_t { kNone = 0, kAllToAllV, kAllGather, kBroadcast, kBarrier, kDeviceWait };
const char* collective_kind_name(CollectiveKind kind);

// What a rank is doing, as its slot says.
enum class RankState : int32_t {
  kUnknown = 0,  // slot never written
  kComputing,    // between collectives
  kWaiting,      // inside a collective
  kGaveUp,       // left a collective with an error (timeout, dead peer): it did reach it
  kEnding,       // ending the job after an error (its own or a peer's): neither stuck nor dead
  kLeft,         // left in order (its last communicator was destroyed)
  kTerminated,   // ended by SIGTERM (the launcher ending the job)
};

// Exchanged by every rank at start-up (trivially copyable: it travels as bytes).
struct PeerIdentity {
  int32_t pid = 0;
  char host[64] = {};
  uint64_t nonce = 0;   // rank 0's names the host tables of this job
  ProbeEndpoint probe;  // where ranks on other hosts can ask whether this one is alive (liveness_probe.h)
};

class PeerMonitor {
 public:
  static PeerIdentity my_identity();
  // Maps this host's table of the job (named after rank 0's identity), starts the watcher thread and
  // installs the SIGTERM report (when SIGTERM is not handled already). Null when shared memory is not
  // available: faults are then reported with what MPI alone tells. Once per process.
  static PeerMonitor* create(int rank, const std::vector<PeerIdentity>& identities);
  // The process's monitor, or null.
  static PeerMonitor* instance();
  // Removes the table's name once every rank of the host has mapped it (after a barrier), so nothing is
  // left in /dev/shm however the job ends.
  void unlink_name();

  // This rank's position, for its peers. `activity` is what the collectives are for (may be empty).
  void entering(int comm_index, int64_t sequence, CollectiveKind kind, const std::string& activity);
  void set_state(RankState state);

  // A same-host peer that died without leaving in order (the watcher saw it), or -1.
  int dead_peer() const { return dead_rank_.load(std::memory_order_acquire); }
  // "rank 2 (pid 77 on host h) died during all_to_all_v #23 (MoE layer dispatch)".
  std::string death_report(int rank) const;
  // Which ranks reached collective `sequence` of communicator `comm_index` and what the others are
  // doing, e.g. "rank 2 did not reach it (pid 77 on host h, stopped by a signal; its last collective
  // was all_gather #22, 5.01 s ago); ranks 0, 1 did".
  std::string who_did_not_reach(int comm_index, int64_t sequence) const;
  // The ranks that are not known to have reached that collective (stuck, dead, behind, or on another
  // host); for tests and messages.
  std::vector<int> ranks_not_reached(int comm_index, int64_t sequence) const;

  enum class Claim { kClaimed, kAlreadyReportedHere, kReportedElsewhere };
  // Makes this rank the one of the host that reports the job's error (the first to ask) and marks it as
  // ending. kAlreadyReportedHere: the watcher or the SIGTERM handler of this process printed it already.
  Claim claim_report();

  // Implementation details shared with the watcher thread and the signal handler (peer_monitor.cpp).
  struct Table;
  void watch_peers();
  // The SIGTERM handler's part. Returns true when the watcher thread takes over (it probes the ranks on
  // other hosts, reports, then ends the process with SIGTERM); false: the handler ends it now.
  bool on_terminate_signal();
  // Probes the ranks of other hosts at once (liveness_probe.h): results[i] for other_ranks[i]. No
  // allocation: the caller gives room for the endpoints and count * ProbeEndpoint::kMaxAddresses sockets.
  void probe_ranks(const int* other_ranks, int count, int timeout_ms, Liveness* results,
                   ProbeEndpoint* endpoints, int* sockets) const;

 private:
  PeerMonitor() = default;
  bool same_host(int rank) const;
  // True when `rank` (same host) has exited or is a zombie without having left in order.
  bool died(int rank) const;
  // Writes the death report of `rank` to stderr with write(2) only (signal handler, watcher thread).
  void write_death_report(int rank) const;

  int rank_ = 0;
  int num_ranks_ = 0;
  std::vector<PeerIdentity> identities_;
  std::string table_name_;
  Table* table_ = nullptr;
  std::vector<int> pidfds_;  // per rank: a pidfd for same-host peers, else -1
  std::atomic<int> dead_rank_{-1};
  std::atomic<bool> reported_here_{false};
  std::atomic<bool> terminated_while_waiting_{false};  // SIGTERM came inside a collective
  int listener_ = -1;                                  // this rank's liveness listener (liveness_probe.h)
  int wake_[2] = {-1, -1};                             // the SIGTERM handler writes, the watcher thread wakes
  // The watcher thread's probe scratch, sized at creation (it must not allocate while the job ends).
  std::vector<int> other_host_ranks_;
  std::vector<ProbeEndpoint> probe_endpoints_;
  std::vector<Liveness> probe_results_;
  std::vector<int> probe_sockets_;
  // After SIGTERM with other hosts to ask: probe, report when this host is the first live one, end.
  void report_termination();
};

}  // namespace epic
