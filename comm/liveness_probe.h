// Whether a rank on another host is still there, for the fault reports of a job spread over nodes
// (issue 9). The PeerMonitor sees the ranks of its own host through shared memory and pidfds; a rank on
// another host it can only ask. Every rank therefore keeps a TCP socket listening on an ephemeral port
// (its address and port travel with its PeerIdentity), and a probe connects to it: accepted means the
// process is alive, refused means it is gone (its host answers for it), no answer in time means its host
// is down or cut off. Nothing is sent or read: the probe is the TCP handshake alone, which the kernel
// completes for a listening socket even while the process is busy or stuck.
// Everything here is system calls only (no allocation, no stdio): the PeerMonitor's watcher thread runs
// it while the job is being ended by a signal.
#pragma once

#include <cstdint>

namespace epic {

struct ProbeEndpoint {
  static constexpr int kMaxAddresses = 4;
  uint16_t port = 0;                       // 0: this rank has no listener (not probeable)
  char addresses[kMaxAddresses][16] = {};  // IPv4, dotted: the host's up interfaces, loopback last
};

enum class Liveness : int8_t { kUnknown = 0, kAlive, kGone, kUnreachable };

// The process's listening socket, opened on the first call (every address, an ephemeral port,
// non-blocking, close-on-exec); -1 when the system refuses one (then nothing is probeable).
int liveness_listener();
// The listener's port and this host's addresses (non-loopback IPv4 first; loopback when there is none).
ProbeEndpoint liveness_endpoint(int listener);
// Accepts and closes what is pending on the listener (so its backlog never fills).
void drain_liveness_listener(int listener);

// Probes `count` endpoints at once and writes one Liveness each into `results`: kAlive when any address
// accepts, kGone when every address refuses, kUnreachable when none answers within timeout_ms (or the
// network says unreachable), kUnknown for an endpoint without a port. `sockets` is caller-provided room
// for count * ProbeEndpoint::kMaxAddresses descriptors (no allocation here).
void probe_liveness(const ProbeEndpoint* endpoints, int count, int timeout_ms, Liveness* results,
                    int* sockets);

const char* liveness_name(Liveness liveness);

}  // namespace epic
