// PeerMonitor: the host's shared table of rank positions, the pidfd watcher of same-host peers and the
// SIGTERM report. Everything the watcher thread and the signal handler run is async-signal-safe: atomics,
// open/read/close/write, no allocation, no stdio.
#include "comm/peer_monitor.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <random>
#include <sstream>
#include <thread>

#include "comm/node_topology.h"

namespace epic {

namespace {

constexpr size_t kActivityBytes = 48;

int64_t monotonic_ns() {
  timespec now{};
  clock_gettime(CLOCK_MONOTONIC, &now);  // one clock for every process of the host
  return static_cast<int64_t>(now.tv_sec) * 1000000000 + now.tv_nsec;
}

// A message built without allocation (for the signal handler and the watcher thread).
class FixedText {
 public:
  FixedText& add(const char* text) {
    while (*text != '\0' && size_ + 1 < sizeof(buffer_)) buffer_[size_++] = *text++;
    buffer_[size_] = '\0';
    return *this;
  }
  FixedText& add(int64_t value) {
    char digits[24];
    int count = 0;
    uint64_t magnitude = value < 0 ? 0 - static_cast<uint64_t>(value) : static_cast<uint64_t>(value);
    do {
      digits[count++] = static_cast<char>('0' + magnitude % 10);
      magnitude /= 10;
    } while (magnitude != 0);
    if (value < 0) add("-");
    char one[2] = {0, 0};
    while (count > 0) {
      one[0] = digits[--count];
      add(one);
    }
    return *this;
  }
  const char* c_str() const { return buffer_; }
  size_t size() const { return size_; }

 private:
  char buffer_[768] = {};
  size_t size_ = 0;
};

// The state letter of /proc/PID/stat ('R', 'S', 'T', 'Z', ...), or 0 when the process is gone.
char process_state(int pid) {
  FixedText path;
  path.add("/proc/").add(static_cast<int64_t>(pid)).add("/stat");
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  char text[512];
  const ssize_t length = read(fd, text, sizeof(text));
  close(fd);
  if (length <= 0) return 0;
  // "pid (command) S ...": the command may hold spaces and parentheses, so look for the last ')'.
  for (ssize_t i = length - 1; i >= 0; --i) {
    if (text[i] == ')') return i + 2 < length ? text[i + 2] : 0;
  }
  return 0;
}

bool process_gone(char state) { return state == 0 || state == 'Z' || state == 'X'; }
bool process_stopped(char state) { return state == 'T' || state == 't'; }

std::atomic<PeerMonitor*> g_monitor{nullptr};

// How long a probe of the other hosts' ranks may take: the launcher sends SIGKILL about a second after
// SIGTERM (OpenMPI's default), and the report must be out before.
constexpr int kProbeTimeoutMs = 300;

extern "C" void epic_report_on_sigterm(int signal_number) {
  const int saved_errno = errno;
  PeerMonitor* monitor = g_monitor.load(std::memory_order_acquire);
  if (monitor != nullptr && monitor->on_terminate_signal()) {
    errno = saved_errno;  // the watcher thread probes, reports and ends the process
    return;
  }
  // Die of SIGTERM as if no handler were installed (the launcher sees the usual status).
  std::signal(signal_number, SIG_DFL);
  std::raise(signal_number);
  errno = saved_errno;
}

}  // namespace

const char* collective_kind_name(CollectiveKind kind) {
  switch (kind) {
    case CollectiveKind::kAllToAllV:
      return "all_to_all_v";
    case CollectiveKind::kAllGather:
      return "all_gather";
    case CollectiveKind::kBroadcast:
      return "broadcast";
    case CollectiveKind::kBarrier:
      return "barrier";
    case CollectiveKind::kDeviceWait:
      return "NCCL wait";
    case CollectiveKind::kNone:
      break;
  }
  return "none";
}

// Shared between the processes of one host: plain lock-free atomics in zero-filled shared memory (zero is
// every field's initial value, so no constructor has to run).
struct RankSlot {
  std::atomic<int32_t> pid;
  std::atomic<int32_t> state;
  std::atomic<int32_t> comm_index;
  std::atomic<int32_t> kind;
  std::atomic<int64_t> sequence;
  std::atomic<int64_t> since_ns;
  char activity[kActivityBytes];  // written by its rank only; a torn read shows a garbled name, nothing worse
};
static_assert(std::atomic<int32_t>::is_always_lock_free && std::atomic<int64_t>::is_always_lock_free,
              "the shared table needs lock-free atomics (they work across processes)");

struct PeerMonitor::Table {
  std::atomic<int32_t> reporter_plus_one;  // 0: nobody reports yet
  int32_t padding;
  RankSlot slots[1];  // num_ranks of them

  static size_t bytes_for(int num_ranks) {
    return offsetof(Table, slots) + sizeof(RankSlot) * static_cast<size_t>(num_ranks);
  }
};

namespace {

RankSlot& slot_of(PeerMonitor::Table* table, int rank) { return table->slots[rank]; }

// "during all_to_all_v #23 (MoE layer dispatch)", from a slot, with no allocation; the prefixes say how the
// rank relates to its last collective (inside it, or computing after it).
void add_position(FixedText& text, const RankSlot& slot, const char* waiting_prefix = "during ",
                  const char* computing_prefix = "while computing after ") {
  const auto kind = static_cast<CollectiveKind>(slot.kind.load(std::memory_order_acquire));
  const auto state = static_cast<RankState>(slot.state.load(std::memory_order_acquire));
  if (kind == CollectiveKind::kNone) {
    text.add("before its first collective");
    return;
  }
  text.add(state == RankState::kWaiting ? waiting_prefix : computing_prefix);
  text.add(collective_kind_name(kind)).add(" #").add(slot.sequence.load(std::memory_order_acquire));
  char activity[kActivityBytes];
  std::memcpy(activity, slot.activity, kActivityBytes);
  activity[kActivityBytes - 1] = '\0';
  if (activity[0] != '\0') text.add(" (").add(activity).add(")");
}

}  // namespace

PeerIdentity PeerMonitor::my_identity() {
  PeerIdentity identity;
  identity.pid = static_cast<int32_t>(getpid());
  std::strncpy(identity.host, this_host_name().c_str(), sizeof(identity.host) - 1);
  identity.probe = liveness_endpoint(liveness_listener());
  std::random_device random;
  identity.nonce = (static_cast<uint64_t>(random()) << 32) ^ random() ^ static_cast<uint64_t>(monotonic_ns());
  return identity;
}

PeerMonitor* PeerMonitor::instance() { return g_monitor.load(std::memory_order_acquire); }

PeerMonitor* PeerMonitor::create(int rank, const std::vector<PeerIdentity>& identities) {
  if (instance() != nullptr || identities.empty()) return instance();
  const int num_ranks = static_cast<int>(identities.size());
  // One table per job and host. The host name is in it because hosts may share /dev/shm (emulated nodes are
  // network namespaces of one machine): a shared table would let a rank on a cut-off node claim the one
  // report for every host, and its line never reaches the launcher.
  std::ostringstream name;
  name << "/epic-" << identities[0].pid << "-" << std::hex << identities[0].nonce << "-";
  const char* host = identities[rank].host;
  for (size_t i = 0; i < sizeof(PeerIdentity::host) && host[i] != '\0'; ++i)
    name << (std::isalnum(static_cast<unsigned char>(host[i])) || host[i] == '.' || host[i] == '-' ? host[i]
                                                                                                   : '_');
  const size_t bytes = Table::bytes_for(num_ranks);
  const int fd = shm_open(name.str().c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) return nullptr;
  // Every rank of the host sizes it to the same length: growing only, so nobody's slot is cut or zeroed.
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    close(fd);
    shm_unlink(name.str().c_str());
    return nullptr;
  }
  void* memory = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (memory == MAP_FAILED) return nullptr;

  auto* monitor = new PeerMonitor;  // lives as long as the process: the watcher and the handler use it
  monitor->rank_ = rank;
  monitor->num_ranks_ = num_ranks;
  monitor->identities_ = identities;
  monitor->table_name_ = name.str();
  monitor->table_ = static_cast<Table*>(memory);
  RankSlot& mine = slot_of(monitor->table_, rank);
  mine.since_ns.store(monotonic_ns(), std::memory_order_relaxed);
  mine.state.store(static_cast<int32_t>(RankState::kComputing), std::memory_order_relaxed);
  mine.pid.store(identities[rank].pid, std::memory_order_release);

  monitor->pidfds_.assign(num_ranks, -1);
  for (int peer = 0; peer < num_ranks; ++peer) {
    if (peer == rank) continue;
    if (!monitor->same_host(peer)) {
      monitor->other_host_ranks_.push_back(peer);
      continue;
    }
    monitor->pidfds_[peer] = static_cast<int>(syscall(SYS_pidfd_open, identities[peer].pid, 0));
  }
  const size_t others = monitor->other_host_ranks_.size();
  monitor->probe_endpoints_.resize(others);
  monitor->probe_results_.resize(others);
  monitor->probe_sockets_.resize(others * ProbeEndpoint::kMaxAddresses);
  monitor->listener_ = liveness_listener();
  if (pipe2(monitor->wake_, O_CLOEXEC | O_NONBLOCK) != 0) monitor->wake_[0] = monitor->wake_[1] = -1;
  g_monitor.store(monitor, std::memory_order_release);
  std::thread([monitor] { monitor->watch_peers(); }).detach();

  struct sigaction current {};
  if (sigaction(SIGTERM, nullptr, &current) == 0 && current.sa_handler == SIG_DFL) {
    struct sigaction report {};
    report.sa_handler = epic_report_on_sigterm;
    sigemptyset(&report.sa_mask);
    sigaction(SIGTERM, &report, nullptr);
  }
  return monitor;
}

void PeerMonitor::unlink_name() {
  if (!table_name_.empty()) shm_unlink(table_name_.c_str());  // ENOENT: another rank of the host did it
}

bool PeerMonitor::same_host(int rank) const {
  return std::strncmp(identities_[rank].host, identities_[rank_].host, sizeof(PeerIdentity::host)) == 0;
}

void PeerMonitor::entering(int comm_index, int64_t sequence, CollectiveKind kind,
                           const std::string& activity) {
  RankSlot& mine = slot_of(table_, rank_);
  const size_t length = std::min(activity.size(), kActivityBytes - 1);
  std::memcpy(mine.activity, activity.data(), length);
  mine.activity[length] = '\0';
  mine.comm_index.store(comm_index, std::memory_order_relaxed);
  mine.kind.store(static_cast<int32_t>(kind), std::memory_order_relaxed);
  mine.sequence.store(sequence, std::memory_order_relaxed);
  mine.since_ns.store(monotonic_ns(), std::memory_order_relaxed);
  mine.state.store(static_cast<int32_t>(RankState::kWaiting), std::memory_order_release);
}

void PeerMonitor::set_state(RankState state) {
  RankSlot& mine = slot_of(table_, rank_);
  mine.since_ns.store(monotonic_ns(), std::memory_order_relaxed);
  mine.state.store(static_cast<int32_t>(state), std::memory_order_release);
}

bool PeerMonitor::died(int rank) const {
  const RankSlot& slot = slot_of(table_, rank);
  const auto state = static_cast<RankState>(slot.state.load(std::memory_order_acquire));
  if (state == RankState::kUnknown || state == RankState::kEnding || state == RankState::kLeft ||
      state == RankState::kTerminated) {
    return false;
  }
  return process_gone(process_state(identities_[rank].pid));
}

namespace {

// "rank R (pid P on host H) died <position>": one text for the signal-safe report and the message.
void add_death_description(FixedText& text, int rank, const PeerIdentity& identity, const RankSlot& slot) {
  text.add("rank ").add(static_cast<int64_t>(rank)).add(" (pid ").add(static_cast<int64_t>(identity.pid));
  text.add(" on host ").add(identity.host).add(") died ");
  add_position(text, slot);
}

}  // namespace

void PeerMonitor::write_death_report(int rank) const {
  FixedText text;
  // The same form as epic's print_error, which reports every other error.
  text.add("epic: error [communication]: ");
  add_death_description(text, rank, identities_[rank], slot_of(table_, rank));
  text.add("; rank ").add(static_cast<int64_t>(rank_)).add(" saw it exit without leaving the job in order\n");
  ssize_t ignored = write(STDERR_FILENO, text.c_str(), text.size());
  (void)ignored;
}

std::string PeerMonitor::death_report(int rank) const {
  FixedText text;
  add_death_description(text, rank, identities_[rank], slot_of(table_, rank));
  return text.c_str();
}

PeerMonitor::Claim PeerMonitor::claim_report() {
  int32_t expected = 0;
  const bool claimed = table_->reporter_plus_one.compare_exchange_strong(expected, rank_ + 1);
  set_state(RankState::kEnding);
  if (claimed) return Claim::kClaimed;
  if (expected != rank_ + 1) return Claim::kReportedElsewhere;
  // The watcher thread or the signal handler of this process claimed it: let its one write finish.
  for (int i = 0; i < 1000 && !reported_here_.load(std::memory_order_acquire); ++i)
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  return Claim::kAlreadyReportedHere;
}

void PeerMonitor::watch_peers() {
  // Same-host peers' pidfds (each dropped once it fired), the liveness listener (ranks of other hosts
  // asking), and the wake pipe of the SIGTERM handler.
  std::vector<pollfd> watched;
  std::vector<int> watched_rank;  // -1: the listener, -2: the wake pipe
  for (int peer = 0; peer < num_ranks_; ++peer) {
    if (pidfds_[peer] < 0) continue;
    watched.push_back({pidfds_[peer], POLLIN, 0});
    watched_rank.push_back(peer);
  }
  if (listener_ >= 0) {
    watched.push_back({listener_, POLLIN, 0});
    watched_rank.push_back(-1);
  }
  if (wake_[0] >= 0) {
    watched.push_back({wake_[0], POLLIN, 0});
    watched_rank.push_back(-2);
  }
  while (!watched.empty()) {
    if (poll(watched.data(), watched.size(), -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    for (size_t i = 0; i < watched.size();) {
      if (watched[i].revents == 0) {
        ++i;
        continue;
      }
      watched[i].revents = 0;
      if (watched_rank[i] == -1) {
        drain_liveness_listener(listener_);
        ++i;
        continue;
      }
      if (watched_rank[i] == -2) {
        report_termination();  // does not return
        ++i;
        continue;
      }
      // The peer exited (a pidfd turns readable at exit, before the launcher reaps it).
      const int peer = watched_rank[i];
      if (died(peer)) {
        int expected = -1;
        dead_rank_.compare_exchange_strong(expected, peer, std::memory_order_acq_rel);
        int32_t nobody = 0;
        if (table_->reporter_plus_one.compare_exchange_strong(nobody, rank_ + 1)) {
          write_death_report(peer);
          reported_here_.store(true, std::memory_order_release);
        }
      }
      close(watched[i].fd);
      watched.erase(watched.begin() + static_cast<std::ptrdiff_t>(i));
      watched_rank.erase(watched_rank.begin() + static_cast<std::ptrdiff_t>(i));
    }
  }
}

void PeerMonitor::probe_ranks(const int* other_ranks, int count, int timeout_ms, Liveness* results,
                              ProbeEndpoint* endpoints, int* sockets) const {
  for (int i = 0; i < count; ++i) endpoints[i] = identities_[other_ranks[i]].probe;
  probe_liveness(endpoints, count, timeout_ms, results, sockets);
}

void PeerMonitor::report_termination() {
  const int others = static_cast<int>(other_host_ranks_.size());
  probe_ranks(other_host_ranks_.data(), others, kProbeTimeoutMs, probe_results_.data(),
              probe_endpoints_.data(), probe_sockets_.data());
  // The first live host reports: the one holding the lowest rank still alive (this host counts as live).
  int lowest_alive = rank_;
  for (int peer = 0; peer < rank_; ++peer)
    if (same_host(peer) && !process_gone(process_state(identities_[peer].pid)))
      lowest_alive = std::min(lowest_alive, peer);
  bool any_failed = false;
  for (int i = 0; i < others; ++i) {
    if (probe_results_[i] == Liveness::kAlive) lowest_alive = std::min(lowest_alive, other_host_ranks_[i]);
    if (probe_results_[i] == Liveness::kGone || probe_results_[i] == Liveness::kUnreachable)
      any_failed = true;
  }
  int32_t nobody = 0;
  if (any_failed && same_host(lowest_alive) &&
      table_->reporter_plus_one.compare_exchange_strong(nobody, rank_ + 1)) {
    FixedText text;
    text.add("epic: error [communication]: ");
    // Per host of a failed rank, once: the host when all its ranks failed alike, else the ranks.
    bool first_host = true;
    for (int i = 0; i < others; ++i) {
      const Liveness state = probe_results_[i];
      if (state != Liveness::kGone && state != Liveness::kUnreachable) continue;
      const char* host = identities_[other_host_ranks_[i]].host;
      bool seen = false;
      for (int j = 0; j < i; ++j)
        seen = seen ||
               std::strncmp(identities_[other_host_ranks_[j]].host, host, sizeof(PeerIdentity::host)) == 0;
      if (seen) continue;
      int total = 0, alike = 0;
      for (int j = i; j < others; ++j) {
        if (std::strncmp(identities_[other_host_ranks_[j]].host, host, sizeof(PeerIdentity::host)) != 0)
          continue;
        ++total;
        if (probe_results_[j] == state) ++alike;
      }
      text.add(first_host ? "" : "; ");
      first_host = false;
      text.add(alike == total ? "host " : "on host ").add(host).add(alike == total ? " is " : ", ");
      if (alike != total) text.add("ranks ");
      bool first_rank = true;
      if (alike == total) text.add(state == Liveness::kGone ? "gone (" : "unreachable (");
      if (alike == total) text.add("ranks ");
      for (int j = i; j < others; ++j) {
        if (probe_results_[j] != state ||
            std::strncmp(identities_[other_host_ranks_[j]].host, host, sizeof(PeerIdentity::host)) != 0)
          continue;
        text.add(first_rank ? "" : ", ").add(static_cast<int64_t>(other_host_ranks_[j]));
        first_rank = false;
      }
      text.add(state == Liveness::kGone ? " refuse connections: their processes ended"
                                        : " do not answer: the host is down or cut off");
      if (alike == total) text.add(")");
    }
    text.add("; rank ")
        .add(static_cast<int64_t>(rank_))
        .add(" (host ")
        .add(identities_[rank_].host)
        .add(") was ");
    const char* how =
        terminated_while_waiting_.load(std::memory_order_acquire) ? "waiting in " : "computing after ";
    add_position(text, slot_of(table_, rank_), how, how);
    text.add(" when the launcher ended the job\n");
    ssize_t ignored = write(STDERR_FILENO, text.c_str(), text.size());
    (void)ignored;
    reported_here_.store(true, std::memory_order_release);
  }
  std::signal(SIGTERM, SIG_DFL);
  kill(getpid(), SIGTERM);
  pause();
}

bool PeerMonitor::on_terminate_signal() {
  const int reporter = table_->reporter_plus_one.load(std::memory_order_acquire) - 1;
  RankSlot& mine = slot_of(table_, rank_);
  const auto state_before = static_cast<RankState>(mine.state.load(std::memory_order_acquire));
  mine.state.store(static_cast<int32_t>(RankState::kTerminated), std::memory_order_release);
  if (reporter >= 0) return false;  // someone reports the job's error already
  for (int peer = 0; peer < num_ranks_; ++peer) {
    if (peer == rank_ || !same_host(peer) || !died(peer)) continue;
    int32_t nobody = 0;
    if (table_->reporter_plus_one.compare_exchange_strong(nobody, rank_ + 1)) {
      write_death_report(peer);
      reported_here_.store(true, std::memory_order_release);
    }
    return false;
  }
  // Nothing seen on this host: ask the other hosts (the watcher thread; a signal handler must not wait).
  if (other_host_ranks_.empty() || wake_[1] < 0) return false;
  terminated_while_waiting_.store(state_before == RankState::kWaiting, std::memory_order_release);
  const char wake = 't';
  return write(wake_[1], &wake, 1) == 1;
}

std::vector<int> PeerMonitor::ranks_not_reached(int comm_index, int64_t sequence) const {
  std::vector<int> missing;
  for (int peer = 0; peer < num_ranks_; ++peer) {
    if (peer == rank_) continue;
    if (!same_host(peer)) {
      missing.push_back(peer);
      continue;
    }
    const RankSlot& slot = slot_of(table_, peer);
    const bool reached = slot.comm_index.load(std::memory_order_acquire) == comm_index &&
                         slot.sequence.load(std::memory_order_acquire) >= sequence &&
                         static_cast<RankState>(slot.state.load()) != RankState::kUnknown;
    const char process = process_state(identities_[peer].pid);
    // A rank stopped inside the collective reached it but will never finish it.
    if (!reached || process_stopped(process) || process_gone(process)) missing.push_back(peer);
  }
  return missing;
}

namespace {

std::string rank_list(const std::vector<int>& ranks) {
  std::string text;
  for (size_t i = 0; i < ranks.size(); ++i) text += (i == 0 ? "" : ", ") + std::to_string(ranks[i]);
  return text;
}

}  // namespace

std::string PeerMonitor::who_did_not_reach(int comm_index, int64_t sequence) const {
  const std::vector<int> missing = ranks_not_reached(comm_index, sequence);
  // Of the ranks that did not reach it, those waiting in (or timed out of) an earlier collective of this
  // communicator are held up by someone else; the others (computing, stopped, dead, in another
  // communicator's collective) are the ones at fault.
  std::vector<int> reached, stuck, held_up, other_hosts;
  std::string stuck_details, held_up_details;
  const int64_t now = monotonic_ns();
  for (int peer = 0; peer < num_ranks_; ++peer) {
    if (std::find(missing.begin(), missing.end(), peer) == missing.end()) {
      reached.push_back(peer);
      continue;
    }
    if (!same_host(peer)) {
      other_hosts.push_back(peer);
      continue;
    }
    const RankSlot& slot = slot_of(table_, peer);
    const auto state = static_cast<RankState>(slot.state.load(std::memory_order_acquire));
    const char process = process_state(identities_[peer].pid);
    FixedText position;
    add_position(position, slot, "in ", "after ");
    const bool same_comm = slot.comm_index.load() == comm_index;
    const std::string where =
        std::string(position.c_str()) + (slot.kind.load() != 0 && !same_comm
                                             ? " of communicator " + std::to_string(slot.comm_index.load())
                                             : "");
    std::ostringstream text;
    text.precision(3);
    const double seconds = static_cast<double>(now - slot.since_ns.load()) / 1e9;
    if ((state == RankState::kWaiting || state == RankState::kGaveUp) && same_comm &&
        !process_gone(process) && !process_stopped(process)) {
      held_up.push_back(peer);
      text << "rank " << peer << (state == RankState::kGaveUp ? " gave up waiting " : " is waiting ")
           << where;
      held_up_details += (held_up_details.empty() ? "" : "; ") + text.str();
      continue;
    }
    stuck.push_back(peer);
    text << "rank " << peer << " (pid " << identities_[peer].pid << " on host " << identities_[peer].host
         << ": ";
    if (state == RankState::kLeft) {
      text << "has already left the job";
    } else if (state == RankState::kTerminated) {
      text << "was terminated by a signal";
    } else if (state == RankState::kEnding) {
      text << "is ending the job after an error of its own";
    } else {
      text << (process_gone(process)          ? "dead, "
               : process_stopped(process)     ? "stopped by a signal, "
               : state == RankState::kWaiting ? "waiting "
               : process == 'R'               ? "busy computing "
                                              : "alive but in no collective, ")
           << where << ", for " << seconds << " s";
    }
    text << ")";
    stuck_details += (stuck_details.empty() ? "" : "; ") + text.str();
  }
  auto ranks_text = [](const std::vector<int>& ranks) {
    return (ranks.size() == 1 ? "rank " : "ranks ") + rank_list(ranks);
  };
  std::string message;
  if (!stuck.empty()) {
    message = ranks_text(stuck) + (stuck.size() == 1 ? " is" : " are") + " stuck or dead: " + stuck_details;
  }
  if (!held_up.empty()) message += (message.empty() ? "" : "; ") + held_up_details;
  if (!other_hosts.empty()) {
    // Not seen from here: asked (liveness_probe.h), and named with their hosts.
    std::vector<Liveness> liveness(other_hosts.size());
    std::vector<ProbeEndpoint> endpoints(other_hosts.size());
    std::vector<int> sockets(other_hosts.size() * ProbeEndpoint::kMaxAddresses);
    probe_ranks(other_hosts.data(), static_cast<int>(other_hosts.size()), kProbeTimeoutMs, liveness.data(),
                endpoints.data(), sockets.data());
    std::string described;
    for (size_t i = 0; i < other_hosts.size(); ++i) {
      const int peer = other_hosts[i];
      described +=
          (described.empty() ? "" : ", ") + std::string("rank ") + std::to_string(peer) + " (host " +
          identities_[peer].host +
          (liveness[i] == Liveness::kGone          ? ": gone, its port refuses connections)"
           : liveness[i] == Liveness::kUnreachable ? ": does not answer, host down or cut off)"
           : liveness[i] == Liveness::kAlive       ? ": alive; whether it reached it, this rank cannot see)"
                                                   : ": not probeable)");
    }
    message += (message.empty() ? "" : "; ") + std::string("on other hosts ") + described;
  }

  if (message.empty()) return "every rank reached it, so the ranks are only slow or the transport is stuck";
  return message + "; " + ranks_text(reached) + " reached it";
}

}  // namespace epic
