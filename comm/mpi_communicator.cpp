// MpiCommunicator: host-buffer collectives through non-blocking MPI, each bounded by a deadline, and
// the process-wide MPI init/finalize bookkeeping.
#include "comm/mpi_communicator.h"

#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <thread>

#include "comm/fault_injection.h"
#include "comm/mpi_check.h"
#include "kernels/error.h"

namespace epic {

namespace {

// Process-wide: MPI can be initialised once per process, so the last MpiCommunicator alive finalises
// it, and only if one of them initialised it (an application that called MPI_Init itself keeps it).
std::mutex g_mpi_lifetime_mutex;
int g_live_mpi_communicators = 0;
bool g_epic_initialized_mpi = false;
int g_communicators_created = 0;    // numbers them: the same order, so the same index, on every rank
bool g_peer_monitor_tried = false;  // the first communicator sets the monitor up, whether or not it works

// MPI counts are int: the most bytes one MPI call can carry, and the most requests one MPI_Testall waits for.
constexpr int64_t kMaxMpiCount = INT_MAX;
// all_to_all_v's messages carry the operation's number as their tag (modulo the smallest MPI_TAG_UB the
// standard allows): a rank that enters another operation than its peers waits and times out naming it,
// instead of taking a message meant for another operation.
constexpr int64_t kTagCycle = 32768;
// Test use only: overrides CommOptions::max_message_bytes, so that a whole `epic run` under mpirun can be
// made to cut its payloads into small pieces.
constexpr const char* kMessageBytesVariable = "EPIC_TEST_MPI_MESSAGE_BYTES";
// Poll in a tight loop this long (most collectives finish well within it), then sleep between polls so
// ranks waiting on a slow peer leave the core to it: tests oversubscribe 5 ranks on 2 cores.
constexpr auto kSpinDuration = std::chrono::milliseconds(1);
constexpr auto kPollSleep = std::chrono::microseconds(50);
// Start-up (every process launched and past MPI_Init) and MPI_Finalize wait at least this long, whatever
// the data-plane timeout: launching processes on a loaded machine takes far longer than a tight
// --comm-timeout, and a start-up that fails on a timeout could not even name the stuck rank yet.
constexpr double kStartupAndShutdownFloorSeconds = 10.0;
// A rank that does not report a job-ending error waits this long for the reporter's MPI_Abort before it
// aborts the job itself (a report cut off by the abort would leave the user with mpirun's text alone).
constexpr auto kReporterGrace = std::chrono::seconds(2);

std::string format_seconds(double seconds) {
  std::ostringstream text;
  text << seconds;
  return text.str();
}

std::string rank_prefix(int rank) { return "rank " + std::to_string(rank) + ": "; }

void grow(std::vector<std::byte>* buffer, int64_t bytes) {
  // At least one byte so MPI never sees a null buffer, even for all-empty exchanges.
  const size_t needed = static_cast<size_t>(std::max<int64_t>(bytes, 1));
  if (buffer->size() < needed) buffer->resize(needed);
}

void check_per_rank(const std::vector<int64_t>& values, int num_ranks, int rank, const char* argument) {
  if (values.size() != static_cast<size_t>(num_ranks)) {
    throw Error(ErrorCode::kInvalidArgument,
                rank_prefix(rank) + "all_to_all_v: " + argument + " has " + std::to_string(values.size()) +
                    " entries; it needs one per rank (" + std::to_string(num_ranks) + ")");
  }
  for (int peer = 0; peer < num_ranks; ++peer) {
    if (values[peer] < 0) {
      throw Error(ErrorCode::kInvalidArgument, rank_prefix(rank) + "all_to_all_v: " + argument + "[" +
                                                   std::to_string(peer) +
                                                   "] = " + std::to_string(values[peer]) + " is negative");
    }
  }
}

// Pieces of at most piece_bytes that cover `bytes`.
int64_t piece_count(int64_t bytes, int64_t piece_bytes) {
  return bytes / piece_bytes + (bytes % piece_bytes != 0 ? 1 : 0);
}

// A collective runs even for an empty payload (every rank joins it, as with any other size); an exchange
// of point-to-point messages sends nothing for an empty block.
enum class EmptyPayload { kNoPiece, kOneEmptyPiece };

// Calls piece(offset, length) for the consecutive pieces of at most piece_bytes that cover [0, bytes), in
// order. Every MPI call of the communicator carries one piece, so no count passes MPI's int.
template <typename Piece>
void for_each_piece(int64_t bytes, int64_t piece_bytes, EmptyPayload empty, Piece&& piece) {
  if (bytes == 0 && empty == EmptyPayload::kOneEmptyPiece) piece(int64_t{0}, 0);
  for (int64_t offset = 0; offset < bytes; offset += piece_bytes)
    piece(offset, static_cast<int>(std::min(piece_bytes, bytes - offset)));
}

// The only limit left on a payload: MPI_Testall takes an int count of requests.
void check_message_count(int rank, const char* operation, int64_t messages, int64_t max_message_bytes) {
  if (messages <= kMaxMpiCount) return;
  throw Error(ErrorCode::kInvalidArgument,
              rank_prefix(rank) + operation + " would need " + std::to_string(messages) +
                  " MPI messages of at most " + std::to_string(max_message_bytes) +
                  " bytes (CommOptions::max_message_bytes), more than one MPI_Testall can wait for (" +
                  std::to_string(kMaxMpiCount) + "); raise max_message_bytes");
}

// CommOptions::max_message_bytes, or the test override, checked.
int64_t checked_max_message_bytes(const CommOptions& options) {
  int64_t bytes = options.max_message_bytes;
  std::string source = "CommOptions::max_message_bytes";
  const char* value = std::getenv(kMessageBytesVariable);
  if (value != nullptr && *value != '\0') {
    source = std::string(kMessageBytesVariable) + "=\"" + value + "\" (a test-only variable)";
    const char* end = value + std::strlen(value);
    const auto [parsed_to, error] = std::from_chars(value, end, bytes);
    if (error != std::errc() || parsed_to != end) {
      throw Error(ErrorCode::kInvalidArgument, source + " is not a decimal number of bytes");
    }
  }
  if (bytes < 1 || bytes > kMaxMpiCount) {
    throw Error(ErrorCode::kInvalidArgument, source + " must be 1 to " + std::to_string(kMaxMpiCount) +
                                                 " bytes (MPI counts are int), got " + std::to_string(bytes));
  }
  return bytes;
}

// MPI_Testall failed: names the request's own error (MPI_ERR_TRUNCATE, ...) rather than MPI_ERR_IN_STATUS.
[[noreturn]] void throw_testall_failure(int status, const std::vector<MPI_Status>& statuses) {
  if (status == MPI_ERR_IN_STATUS) {
    for (size_t index = 0; index < statuses.size(); ++index) {
      const int request_status = statuses[index].MPI_ERROR;
      if (request_status == MPI_SUCCESS || request_status == MPI_ERR_PENDING) continue;
      const std::string statement = "MPI_Testall (request " + std::to_string(index + 1) + " of " +
                                    std::to_string(statuses.size()) + ")";
      throw Error(ErrorCode::kCommunication,
                  mpi_failure_message(request_status, statement.c_str(), __FILE__, __LINE__));
    }
  }
  throw Error(ErrorCode::kCommunication, mpi_failure_message(status, "MPI_Testall", __FILE__, __LINE__));
}

void check_timeout(double timeout_seconds) {
  if (!(timeout_seconds > 0.0) || !std::isfinite(timeout_seconds)) {
    throw Error(ErrorCode::kInvalidArgument,
                "CommOptions::timeout_seconds must be a positive number of seconds, got " +
                    format_seconds(timeout_seconds));
  }
}

}  // namespace

MpiCommunicator::MpiCommunicator(const CommOptions& options) : options_(options) {
  check_timeout(options_.timeout_seconds);
  options_.max_message_bytes = checked_max_message_bytes(options_);
  std::lock_guard<std::mutex> lock(g_mpi_lifetime_mutex);
  int finalized = 0;
  EPIC_MPI_CHECK(MPI_Finalized(&finalized));
  if (finalized) {
    throw Error(
        ErrorCode::kCommunication,
        "MPI is already finalized in this process and cannot be initialised again; keep one communicator "
        "alive for the life of the process");
  }
  int initialized = 0;
  EPIC_MPI_CHECK(MPI_Initialized(&initialized));
  if (!initialized) {
    int provided = MPI_THREAD_SINGLE;
    // SERIALIZED: a worker may call from more than one thread (never two at once).
    EPIC_MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided));
    g_epic_initialized_mpi = true;
    // We own MPI in this process: make world errors reportable too (the default aborts the job).
    EPIC_MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  }
  EPIC_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &rank_));
  // Our own context: our collectives never match another library's traffic on MPI_COMM_WORLD. The
  // non-blocking form, so a rank that never arrives fails this rank's start-up instead of hanging it.
  MPI_Request duplicating = MPI_REQUEST_NULL;
  EPIC_MPI_CHECK(MPI_Comm_idup(MPI_COMM_WORLD, &comm_, &duplicating));
  wait_for_startup(&duplicating, "creating the communicator (MPI_Comm_idup)");
  ++g_live_mpi_communicators;
  comm_index_ = g_communicators_created++;
  try {
    EPIC_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
    EPIC_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    EPIC_MPI_CHECK(MPI_Comm_size(comm_, &size_));
    check_max_message_bytes_agree();
    if (!g_peer_monitor_tried) {
      g_peer_monitor_tried = true;
      set_up_peer_monitor();
    }
    monitor_ = PeerMonitor::instance();
  } catch (...) {
    --g_live_mpi_communicators;
    MPI_Comm_free(&comm_);
    throw;
  }
}

void MpiCommunicator::wait_for_startup(MPI_Request* request, const std::string& what) {
  const double bound = std::max(options_.timeout_seconds, kStartupAndShutdownFloorSeconds);
  std::vector<MPI_Request> requests = {*request};
  const WaitResult result = test_until_deadline(&requests, bound);
  *request = requests[0];
  if (result != WaitResult::kDone) {
    throw Error(ErrorCode::kTimeout, rank_prefix(rank_) + what + " did not complete within " +
                                         format_seconds(bound) +
                                         " s: a peer rank did not start or is stuck (every rank must "
                                         "create its communicators in the same order)");
  }
}

void MpiCommunicator::check_max_message_bytes_agree() {
  const int64_t mine = options_.max_message_bytes;
  std::vector<int64_t> all(static_cast<size_t>(size_));
  MPI_Request request = MPI_REQUEST_NULL;
  EPIC_MPI_CHECK(MPI_Iallgather(&mine, 1, MPI_INT64_T, all.data(), 1, MPI_INT64_T, comm_, &request));
  wait_for_startup(&request, "exchanging max_message_bytes");
  for (int peer = 0; peer < size_; ++peer) {
    if (all[peer] == all[0]) continue;
    throw Error(
        ErrorCode::kInvalidArgument,
        rank_prefix(rank_) + "ranks split payloads at different sizes: rank 0 has max_message_bytes " +
            std::to_string(all[0]) + ", rank " + std::to_string(peer) + " has " + std::to_string(all[peer]) +
            "; every rank must use the same (CommOptions::max_message_bytes, " + kMessageBytesVariable + ")");
  }
}

void MpiCommunicator::set_up_peer_monitor() {
  // Every rank's pid and host, then the host's shared table; its name goes once every rank of the host
  // has mapped it (after the barrier), so nothing is left in /dev/shm however the job ends.
  const PeerIdentity mine = PeerMonitor::my_identity();
  std::vector<PeerIdentity> identities(static_cast<size_t>(size_));
  MPI_Request request = MPI_REQUEST_NULL;
  EPIC_MPI_CHECK(MPI_Iallgather(&mine, sizeof(PeerIdentity), MPI_BYTE, identities.data(),
                                sizeof(PeerIdentity), MPI_BYTE, comm_, &request));
  wait_for_startup(&request, "exchanging the pid and host of every rank");
  PeerMonitor* monitor = PeerMonitor::create(rank_, identities);
  EPIC_MPI_CHECK(MPI_Ibarrier(comm_, &request));
  wait_for_startup(&request, "mapping the host's table of ranks");
  if (monitor != nullptr) monitor->unlink_name();
}

namespace {

// MPI_Finalize waits for every rank (OpenMPI fences): if a peer never gets there (stuck between its last
// collective and the end), end this process with a message instead of hanging the job.
void finalize_within(double seconds, int rank) {
  std::mutex mutex;
  std::condition_variable finished_condition;
  bool finished = false;
  std::thread watchdog([&] {
    std::unique_lock<std::mutex> lock(mutex);
    if (finished_condition.wait_for(lock, std::chrono::duration<double>(seconds), [&] { return finished; }))
      return;
    std::fprintf(
        stderr,
        "epic: error [timeout]: rank %d: MPI_Finalize did not complete within %g s: a peer rank never "
        "reached it (stuck or dead); this rank exits without it\n",
        rank, seconds);
    std::fflush(stderr);
    std::_Exit(1);
  });
  EPIC_MPI_WARN(MPI_Finalize());
  {
    std::lock_guard<std::mutex> lock(mutex);
    finished = true;
  }
  finished_condition.notify_one();
  watchdog.join();
}

}  // namespace

MpiCommunicator::~MpiCommunicator() {
  if (pending_) {
    // One look, no wait: the timeout that left it pending was reported already, and waiting a second
    // timeout here would only delay the end of a broken job.
    int done = 0;
    const int status = MPI_Testall(static_cast<int>(pending_->requests.size()), pending_->requests.data(),
                                   &done, MPI_STATUSES_IGNORE);
    if (status == MPI_SUCCESS && done) pending_.reset();
  }
  std::lock_guard<std::mutex> lock(g_mpi_lifetime_mutex);
  --g_live_mpi_communicators;
  if (pending_) {
    // MPI still owns buffers of the stuck operation and MPI_Finalize would wait for the dead peer:
    // leak both and leave MPI as it is; the launcher reports the rank that exited without finalising.
    std::fprintf(stderr,
                 "epic: rank %d: leaving MPI without MPI_Finalize because an earlier %s never completed; the "
                 "job is broken\n",
                 rank_, pending_->name.c_str());
    (void)pending_.release();
    if (monitor_ != nullptr && g_live_mpi_communicators == 0) monitor_->set_state(RankState::kEnding);
    return;
  }
  EPIC_MPI_WARN(MPI_Comm_free(&comm_));
  if (g_live_mpi_communicators == 0) {
    // From here on this rank's exit is orderly: its peers must not report it as dead.
    if (monitor_ != nullptr) monitor_->set_state(RankState::kLeft);
    if (g_epic_initialized_mpi) {
      finalize_within(std::max(options_.timeout_seconds, kStartupAndShutdownFloorSeconds), rank_);
      g_epic_initialized_mpi = false;
    }
  }
}

void MpiCommunicator::end_job(const std::function<void()>& report, int exit_code) {
  const PeerMonitor::Claim claim =
      monitor_ != nullptr ? monitor_->claim_report() : PeerMonitor::Claim::kClaimed;
  if (claim == PeerMonitor::Claim::kClaimed) report();
  std::fflush(stdout);
  std::fflush(stderr);
  if (claim == PeerMonitor::Claim::kReportedElsewhere ||
      (monitor_ != nullptr && monitor_->dead_peer() >= 0)) {
    // The reporting rank prints and aborts the job, or the launcher, which saw the peer die, is ending
    // it already: either ends this process too, without MPI_Abort's own text on top. If that does not
    // come (the reporter is stuck itself), abort from here.
    std::this_thread::sleep_for(kReporterGrace);
  }
  MPI_Abort(comm_, exit_code);
  std::_Exit(exit_code);  // MPI_Abort does not return; if it ever did, end anyway
}

void MpiCommunicator::set_timeout_seconds(double timeout_seconds) {
  check_timeout(timeout_seconds);
  options_.timeout_seconds = timeout_seconds;
}

std::string MpiCommunicator::timeout_message(const std::string& what) const {
  return rank_prefix(rank_) + what + " within " + format_seconds(options_.timeout_seconds) +
         " s; a peer rank is stuck or dead (" + std::to_string(size_) +
         " ranks; every rank must enter the same collectives in the same order; if the peers are only slow, "
         "raise CommOptions::timeout_seconds). The operation stays pending: this communicator completes it "
         "before its next collective";
}

std::string MpiCommunicator::fault_message(WaitResult result, const Operation& operation) const {
  if (result == WaitResult::kPeerDied) {
    return monitor_->death_report(monitor_->dead_peer()) + " (rank " + std::to_string(rank_) +
           " was waiting for it in " + operation.name + ")";
  }
  if (monitor_ == nullptr) return timeout_message(operation.name + " did not complete");
  return rank_prefix(rank_) + operation.name + " did not complete within " +
         format_seconds(options_.timeout_seconds) +
         " s: " + monitor_->who_did_not_reach(comm_index_, operation.sequence) +
         ". Every rank must enter the same collectives in the same order; if the ranks are only slow, raise "
         "the timeout (CommOptions::timeout_seconds; epic run --comm-timeout)";
}

MpiCommunicator::WaitResult MpiCommunicator::test_until_deadline(std::vector<MPI_Request>* requests,
                                                                 double timeout_seconds) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::duration_cast<Clock::duration>(
                                    std::chrono::duration<double>(std::min(timeout_seconds, 1.0e7)));
  const auto spin_until = start + kSpinDuration;
  const int count = static_cast<int>(requests->size());  // at most kMaxMpiCount: check_message_count
  std::vector<MPI_Status> statuses(requests->size());
  while (true) {
    int done = 0;
    // MPI_Testall also drives OpenMPI's progress engine: a non-blocking call advances only inside MPI calls.
    const int status = MPI_Testall(count, requests->data(), &done, statuses.data());
    if (status != MPI_SUCCESS) throw_testall_failure(status, statuses);
    if (done) return WaitResult::kDone;
    // A dead peer never answers: stop at once rather than at the deadline (the launcher is about to end
    // the job, and the report must come first).
    if (monitor_ != nullptr && monitor_->dead_peer() >= 0) return WaitResult::kPeerDied;
    const auto now = Clock::now();
    if (now >= deadline) return WaitResult::kTimedOut;
    if (now >= spin_until) std::this_thread::sleep_for(kPollSleep);
  }
}

void MpiCommunicator::finish_pending(const char* operation) {
  if (!pending_) return;
  WaitResult result = WaitResult::kDone;
  try {
    result = test_until_deadline(&pending_->requests, options_.timeout_seconds);
  } catch (...) {
    abandon(std::move(*pending_));  // the failed request is freed, but others may still be active
    pending_.reset();
    throw;
  }
  if (result == WaitResult::kPeerDied)
    throw Error(ErrorCode::kCommunication, fault_message(result, *pending_));
  if (result == WaitResult::kTimedOut) {
    throw Error(ErrorCode::kTimeout,
                timeout_message(std::string(operation) + " could not start: the earlier " + pending_->name +
                                " that timed out still did not complete"));
  }
  // The caller of the timed-out operation got an exception, so its late data is dropped, but it did move.
  bytes_sent_ += pending_->bytes_sent;
  bytes_received_ += pending_->bytes_received;
  if (current_.send_staging.empty() && current_.recv_staging.empty()) current_ = std::move(*pending_);
  pending_.reset();
}

MpiCommunicator::Operation& MpiCommunicator::begin(CollectiveKind kind) {
  finish_pending(collective_kind_name(kind));
  ++sequence_;
  inject_test_fault(comm_index_, rank_, sequence_, activity_);
  if (monitor_ != nullptr) monitor_->entering(comm_index_, sequence_, kind, activity_);
  current_.name = std::string(collective_kind_name(kind)) + " #" + std::to_string(sequence_) +
                  (activity_.empty() ? "" : " (" + activity_ + ")");
  current_.sequence = sequence_;
  current_.requests.clear();
  current_.bytes_sent = 0;
  current_.bytes_received = 0;
  return current_;
}

void MpiCommunicator::abandon(Operation&& operation) {
  // Moving keeps the buffers where MPI knows them; never freed on purpose.
  (void)new Operation(std::move(operation));
}

template <typename Post>
void MpiCommunicator::post_current(Post&& post) {
  try {
    post();
  } catch (...) {
    abandon(std::move(current_));
    current_ = Operation{};
    if (monitor_ != nullptr) monitor_->set_state(RankState::kGaveUp);
    throw;
  }
}

void MpiCommunicator::wait_for_current() {
  WaitResult result = WaitResult::kDone;
  try {
    result = test_until_deadline(&current_.requests, options_.timeout_seconds);
  } catch (...) {
    abandon(std::move(current_));  // the failed request is freed, but others may still be active
    current_ = Operation{};
    if (monitor_ != nullptr) monitor_->set_state(RankState::kGaveUp);
    throw;
  }
  if (result != WaitResult::kDone) {
    pending_ = std::make_unique<Operation>(std::move(current_));
    current_ = Operation{};
    // Reached it, gave up: the ranks diagnosing the same fault must not take this rank for the stuck one.
    if (monitor_ != nullptr) monitor_->set_state(RankState::kGaveUp);
    throw Error(result == WaitResult::kPeerDied ? ErrorCode::kCommunication : ErrorCode::kTimeout,
                fault_message(result, *pending_));
  }
  if (monitor_ != nullptr) monitor_->set_state(RankState::kComputing);
  bytes_sent_ += current_.bytes_sent;
  bytes_received_ += current_.bytes_received;
}

void MpiCommunicator::all_to_all_v(const void* send, const std::vector<int64_t>& send_bytes,
                                   const std::vector<int64_t>& send_offsets, void* recv,
                                   const std::vector<int64_t>& recv_bytes,
                                   const std::vector<int64_t>& recv_offsets) {
  // Check everything before any collective starts, so a bad call fails here and not as a peer's timeout.
  check_per_rank(send_bytes, size_, rank_, "send_bytes");
  check_per_rank(send_offsets, size_, rank_, "send_offsets");
  check_per_rank(recv_bytes, size_, rank_, "recv_bytes");
  check_per_rank(recv_offsets, size_, rank_, "recv_offsets");
  if (send_bytes[rank_] != recv_bytes[rank_]) {
    throw Error(ErrorCode::kInvalidArgument,
                rank_prefix(rank_) + "all_to_all_v: sends " + std::to_string(send_bytes[rank_]) +
                    " bytes to itself but expects to receive " + std::to_string(recv_bytes[rank_]));
  }
  // Send staging: one copy of the span of the send buffer that covers every block for another rank
  // (blocks may share bytes, as in all_gather_v). Receive staging: the blocks packed in rank order.
  const int64_t piece_bytes = options_.max_message_bytes;
  int64_t send_begin = INT64_MAX;
  int64_t send_end = 0;
  int64_t recv_total = 0;
  int64_t messages = 0;
  for (int peer = 0; peer < size_; ++peer) {
    if (peer == rank_) continue;
    if (send_bytes[peer] > 0) {
      send_begin = std::min(send_begin, send_offsets[peer]);
      send_end = std::max(send_end, send_offsets[peer] + send_bytes[peer]);
    }
    recv_total += recv_bytes[peer];
    messages += piece_count(send_bytes[peer], piece_bytes) + piece_count(recv_bytes[peer], piece_bytes);
  }
  if (send_begin == INT64_MAX) send_begin = send_end = 0;
  check_message_count(rank_, "all_to_all_v", messages, piece_bytes);

  Operation& operation = begin(CollectiveKind::kAllToAllV);
  grow(&operation.send_staging, send_end - send_begin);
  grow(&operation.recv_staging, recv_total);
  if (send_end > send_begin) {
    std::memcpy(operation.send_staging.data(), static_cast<const std::byte*>(send) + send_begin,
                static_cast<size_t>(send_end - send_begin));
  }
  operation.recv_positions.assign(size_, 0);
  operation.requests.reserve(static_cast<size_t>(messages));
  // Point-to-point, not MPI_Ialltoallv: its int counts and displacements cap a block at 2 GiB, and pieces
  // of several rounds of it would need every rank to know the largest block of any pair. Each pair knows
  // its own block's size, and MPI keeps the pieces of one pair in order (same source, tag, communicator).
  const int tag = static_cast<int>(operation.sequence % kTagCycle);
  post_current([&] {
    // Receives first, so that pieces land in place instead of in MPI's queue of unexpected messages.
    int64_t recv_position = 0;
    for (int peer = 0; peer < size_; ++peer) {
      if (peer == rank_) continue;  // the own block is copied directly below, MPI moves nothing for it
      operation.recv_positions[peer] = recv_position;
      std::byte* block = operation.recv_staging.data() + recv_position;
      for_each_piece(recv_bytes[peer], piece_bytes, EmptyPayload::kNoPiece, [&](int64_t offset, int length) {
        MPI_Request& request = operation.requests.emplace_back(MPI_REQUEST_NULL);
        EPIC_MPI_CHECK(MPI_Irecv(block + offset, length, MPI_BYTE, peer, tag, comm_, &request));
      });
      recv_position += recv_bytes[peer];
      operation.bytes_received += static_cast<uint64_t>(recv_bytes[peer]);
    }
    for (int peer = 0; peer < size_; ++peer) {
      if (peer == rank_ || send_bytes[peer] == 0) continue;
      const std::byte* block = operation.send_staging.data() + (send_offsets[peer] - send_begin);
      for_each_piece(send_bytes[peer], piece_bytes, EmptyPayload::kNoPiece, [&](int64_t offset, int length) {
        MPI_Request& request = operation.requests.emplace_back(MPI_REQUEST_NULL);
        EPIC_MPI_CHECK(MPI_Isend(block + offset, length, MPI_BYTE, peer, tag, comm_, &request));
      });
      operation.bytes_sent += static_cast<uint64_t>(send_bytes[peer]);
    }
  });
  if (send_bytes[rank_] > 0) {
    std::memmove(static_cast<std::byte*>(recv) + recv_offsets[rank_],
                 static_cast<const std::byte*>(send) + send_offsets[rank_],
                 static_cast<size_t>(send_bytes[rank_]));
  }
  wait_for_current();
  for (int peer = 0; peer < size_; ++peer) {
    if (peer == rank_ || recv_bytes[peer] == 0) continue;
    std::memcpy(static_cast<std::byte*>(recv) + recv_offsets[peer],
                current_.recv_staging.data() + current_.recv_positions[peer],
                static_cast<size_t>(recv_bytes[peer]));
  }
}

void MpiCommunicator::all_gather(const void* send, int64_t bytes, void* recv) {
  if (bytes < 0) {
    throw Error(ErrorCode::kInvalidArgument,
                rank_prefix(rank_) + "all_gather: bytes = " + std::to_string(bytes) + " is negative");
  }
  if (bytes > INT64_MAX / size_) {
    throw Error(ErrorCode::kInvalidArgument, rank_prefix(rank_) + "all_gather: " + std::to_string(bytes) +
                                                 " bytes from each of " + std::to_string(size_) +
                                                 " ranks add up to more than 2^63 bytes");
  }
  const int64_t piece_bytes = options_.max_message_bytes;
  check_message_count(rank_, "all_gather", piece_count(bytes, piece_bytes), piece_bytes);
  Operation& operation = begin(CollectiveKind::kAllGather);
  const int64_t total = bytes * size_;
  grow(&operation.recv_staging, total);
  operation.bytes_sent = static_cast<uint64_t>(bytes) * static_cast<uint64_t>(size_ - 1);
  operation.bytes_received = operation.bytes_sent;
  // One MPI_Iallgather per piece; every rank knows `bytes`, so all issue the same pieces in the same
  // order. Piece [offset, offset + length) of every rank lies at staging + offset * size, rank r's at
  // + r * length (an all-gather puts the blocks side by side); in place, so one staging buffer suffices.
  std::byte* staging = operation.recv_staging.data();
  post_current([&] {
    for_each_piece(bytes, piece_bytes, EmptyPayload::kOneEmptyPiece, [&](int64_t offset, int length) {
      std::byte* piece = staging + offset * size_;
      if (length > 0) {
        std::memcpy(piece + static_cast<int64_t>(rank_) * length,
                    static_cast<const std::byte*>(send) + offset, static_cast<size_t>(length));
      }
      MPI_Request& request = operation.requests.emplace_back(MPI_REQUEST_NULL);
      EPIC_MPI_CHECK(
          MPI_Iallgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, piece, length, MPI_BYTE, comm_, &request));
    });
  });
  wait_for_current();
  for_each_piece(bytes, piece_bytes, EmptyPayload::kNoPiece, [&](int64_t offset, int length) {
    const std::byte* piece = current_.recv_staging.data() + offset * size_;
    for (int source = 0; source < size_; ++source) {
      std::memcpy(static_cast<std::byte*>(recv) + source * bytes + offset,
                  piece + static_cast<int64_t>(source) * length, static_cast<size_t>(length));
    }
  });
}

void MpiCommunicator::broadcast(void* data, int64_t bytes, int root) {
  if (root < 0 || root >= size_) {
    throw Error(ErrorCode::kInvalidArgument, rank_prefix(rank_) + "broadcast: root " + std::to_string(root) +
                                                 " is not a rank of this " + std::to_string(size_) +
                                                 "-rank communicator");
  }
  if (bytes < 0) {
    throw Error(ErrorCode::kInvalidArgument,
                rank_prefix(rank_) + "broadcast: bytes = " + std::to_string(bytes) + " is negative");
  }
  const int64_t piece_bytes = options_.max_message_bytes;
  check_message_count(rank_, "broadcast", piece_count(bytes, piece_bytes), piece_bytes);
  Operation& operation = begin(CollectiveKind::kBroadcast);
  grow(&operation.send_staging, bytes);
  if (rank_ == root) {
    if (bytes > 0) std::memcpy(operation.send_staging.data(), data, static_cast<size_t>(bytes));
    operation.bytes_sent = static_cast<uint64_t>(bytes) * static_cast<uint64_t>(size_ - 1);
  } else {
    operation.bytes_received = static_cast<uint64_t>(bytes);
  }
  // One MPI_Ibcast per piece; every rank knows `bytes`, so all issue the same pieces in the same order.
  std::byte* staging = operation.send_staging.data();
  post_current([&] {
    for_each_piece(bytes, piece_bytes, EmptyPayload::kOneEmptyPiece, [&](int64_t offset, int length) {
      MPI_Request& request = operation.requests.emplace_back(MPI_REQUEST_NULL);
      EPIC_MPI_CHECK(MPI_Ibcast(staging + offset, length, MPI_BYTE, root, comm_, &request));
    });
  });
  wait_for_current();
  if (rank_ != root && bytes > 0) std::memcpy(data, current_.send_staging.data(), static_cast<size_t>(bytes));
}

void MpiCommunicator::barrier() {
  Operation& operation = begin(CollectiveKind::kBarrier);
  post_current([&] {
    MPI_Request& request = operation.requests.emplace_back(MPI_REQUEST_NULL);
    EPIC_MPI_CHECK(MPI_Ibarrier(comm_, &request));
  });
  wait_for_current();
}

}  // namespace epic
