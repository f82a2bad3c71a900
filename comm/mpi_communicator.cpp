// MpiCommunicator: host-buffer collectives through non-blocking MPI, each bounded by a deadline, and
// the process-wide MPI init/finalize bookkeeping.
#include "comm/mpi_communicator.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <sstream>
#include <thread>

#include "comm/mpi_check.h"
#include "kernels/error.h"

namespace epic {

namespace {

// Process-wide: MPI can be initialised once per process, so the last MpiCommunicator alive finalises
// it, and only if one of them initialised it (an application that called MPI_Init itself keeps it).
std::mutex g_mpi_lifetime_mutex;
int g_live_mpi_communicators = 0;
bool g_epic_initialized_mpi = false;

constexpr int64_t kMaxMpiCount = INT_MAX;
// Poll in a tight loop this long (most collectives finish well within it), then sleep between polls so
// ranks waiting on a slow peer leave the core to it: tests oversubscribe 5 ranks on 2 cores.
constexpr auto kSpinDuration = std::chrono::milliseconds(1);
constexpr auto kPollSleep = std::chrono::microseconds(50);

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

[[noreturn]] void throw_count_too_large(int rank, const std::string& what, int64_t bytes) {
  throw Error(ErrorCode::kCommunication, rank_prefix(rank) + what + " " + std::to_string(bytes) +
                                             " bytes, more than MPI's int count limit (" +
                                             std::to_string(kMaxMpiCount) +
                                             " bytes); send fewer tokens per step");
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
  // Our own context: our collectives never match another library's traffic on MPI_COMM_WORLD.
  EPIC_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &comm_));
  ++g_live_mpi_communicators;
  try {
    EPIC_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
    EPIC_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    EPIC_MPI_CHECK(MPI_Comm_size(comm_, &size_));
  } catch (...) {
    --g_live_mpi_communicators;
    MPI_Comm_free(&comm_);
    throw;
  }
}

MpiCommunicator::~MpiCommunicator() {
  if (pending_) {
    try {
      finish_pending("shutdown");
    } catch (const std::exception& error) {
      std::fprintf(stderr, "epic: %s\n", error.what());
    }
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
    return;
  }
  EPIC_MPI_WARN(MPI_Comm_free(&comm_));
  if (g_live_mpi_communicators == 0 && g_epic_initialized_mpi) {
    EPIC_MPI_WARN(MPI_Finalize());
    g_epic_initialized_mpi = false;
  }
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

bool MpiCommunicator::test_until_deadline(MPI_Request* request) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::duration_cast<Clock::duration>(
                                    std::chrono::duration<double>(std::min(options_.timeout_seconds, 1.0e7)));
  const auto spin_until = start + kSpinDuration;
  while (true) {
    int done = 0;
    // MPI_Test also drives OpenMPI's progress engine: a non-blocking collective advances only inside MPI
    // calls.
    EPIC_MPI_CHECK(MPI_Test(request, &done, MPI_STATUS_IGNORE));
    if (done) return true;
    const auto now = Clock::now();
    if (now >= deadline) return false;
    if (now >= spin_until) std::this_thread::sleep_for(kPollSleep);
  }
}

void MpiCommunicator::finish_pending(const char* operation) {
  if (!pending_) return;
  bool done = false;
  try {
    done = test_until_deadline(&pending_->request);
  } catch (...) {
    pending_.reset();  // a request that failed is complete (and freed) in MPI's eyes
    throw;
  }
  if (!done) {
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

MpiCommunicator::Operation& MpiCommunicator::begin(const char* operation) {
  finish_pending(operation);
  current_.name = operation;
  current_.request = MPI_REQUEST_NULL;
  current_.bytes_sent = 0;
  current_.bytes_received = 0;
  return current_;
}

void MpiCommunicator::wait_for_current() {
  bool done = false;
  try {
    done = test_until_deadline(&current_.request);
  } catch (...) {
    current_.request = MPI_REQUEST_NULL;
    throw;
  }
  if (!done) {
    pending_ = std::make_unique<Operation>(std::move(current_));
    current_ = Operation{};
    throw Error(ErrorCode::kTimeout, timeout_message(pending_->name + " did not complete"));
  }
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
  int64_t send_begin = INT64_MAX;
  int64_t send_end = 0;
  int64_t recv_total = 0;
  for (int peer = 0; peer < size_; ++peer) {
    if (peer == rank_) continue;
    if (send_bytes[peer] > kMaxMpiCount) {
      throw_count_too_large(rank_, "all_to_all_v would send rank " + std::to_string(peer), send_bytes[peer]);
    }
    if (recv_bytes[peer] > kMaxMpiCount) {
      throw_count_too_large(rank_, "all_to_all_v would receive from rank " + std::to_string(peer),
                            recv_bytes[peer]);
    }
    if (send_bytes[peer] > 0) {
      send_begin = std::min(send_begin, send_offsets[peer]);
      send_end = std::max(send_end, send_offsets[peer] + send_bytes[peer]);
    }
    recv_total += recv_bytes[peer];
  }
  if (send_begin == INT64_MAX) send_begin = send_end = 0;
  if (send_end - send_begin > kMaxMpiCount) {
    throw_count_too_large(rank_, "all_to_all_v: the blocks for other ranks span", send_end - send_begin);
  }
  if (recv_total > kMaxMpiCount) {
    throw_count_too_large(rank_, "all_to_all_v: the blocks from other ranks add up to", recv_total);
  }

  Operation& operation = begin("all_to_all_v");
  grow(&operation.send_staging, send_end - send_begin);
  grow(&operation.recv_staging, recv_total);
  operation.send_counts.assign(size_, 0);
  operation.send_displacements.assign(size_, 0);
  operation.recv_counts.assign(size_, 0);
  operation.recv_displacements.assign(size_, 0);
  if (send_end > send_begin) {
    std::memcpy(operation.send_staging.data(), static_cast<const std::byte*>(send) + send_begin,
                static_cast<size_t>(send_end - send_begin));
  }
  int64_t recv_position = 0;
  for (int peer = 0; peer < size_; ++peer) {
    if (peer == rank_) continue;  // the own block is copied directly below, MPI moves nothing for it
    operation.send_counts[peer] = static_cast<int>(send_bytes[peer]);
    operation.send_displacements[peer] =
        send_bytes[peer] > 0 ? static_cast<int>(send_offsets[peer] - send_begin) : 0;
    operation.recv_counts[peer] = static_cast<int>(recv_bytes[peer]);
    operation.recv_displacements[peer] = static_cast<int>(recv_position);
    recv_position += recv_bytes[peer];
    operation.bytes_sent += static_cast<uint64_t>(send_bytes[peer]);
    operation.bytes_received += static_cast<uint64_t>(recv_bytes[peer]);
  }
  EPIC_MPI_CHECK(MPI_Ialltoallv(operation.send_staging.data(), operation.send_counts.data(),
                                operation.send_displacements.data(), MPI_BYTE, operation.recv_staging.data(),
                                operation.recv_counts.data(), operation.recv_displacements.data(), MPI_BYTE,
                                comm_, &operation.request));
  if (send_bytes[rank_] > 0) {
    std::memmove(static_cast<std::byte*>(recv) + recv_offsets[rank_],
                 static_cast<const std::byte*>(send) + send_offsets[rank_],
                 static_cast<size_t>(send_bytes[rank_]));
  }
  wait_for_current();
  for (int peer = 0; peer < size_; ++peer) {
    if (peer == rank_ || recv_bytes[peer] == 0) continue;
    std::memcpy(static_cast<std::byte*>(recv) + recv_offsets[peer],
                current_.recv_staging.data() + current_.recv_displacements[peer],
                static_cast<size_t>(recv_bytes[peer]));
  }
}

void MpiCommunicator::all_gather(const void* send, int64_t bytes, void* recv) {
  if (bytes < 0) {
    throw Error(ErrorCode::kInvalidArgument,
                rank_prefix(rank_) + "all_gather: bytes = " + std::to_string(bytes) + " is negative");
  }
  if (bytes > kMaxMpiCount) throw_count_too_large(rank_, "all_gather would send every rank", bytes);
  Operation& operation = begin("all_gather");
  const int64_t total = bytes * size_;
  grow(&operation.recv_staging, total);
  // In place: our block goes straight into its slot, so only one staging buffer is needed.
  if (bytes > 0) std::memcpy(operation.recv_staging.data() + rank_ * bytes, send, static_cast<size_t>(bytes));
  operation.bytes_sent = static_cast<uint64_t>(bytes) * static_cast<uint64_t>(size_ - 1);
  operation.bytes_received = operation.bytes_sent;
  EPIC_MPI_CHECK(MPI_Iallgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, operation.recv_staging.data(),
                                static_cast<int>(bytes), MPI_BYTE, comm_, &operation.request));
  wait_for_current();
  if (total > 0) std::memcpy(recv, current_.recv_staging.data(), static_cast<size_t>(total));
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
  if (bytes > kMaxMpiCount) throw_count_too_large(rank_, "broadcast would move", bytes);
  Operation& operation = begin("broadcast");
  grow(&operation.send_staging, bytes);
  if (rank_ == root) {
    if (bytes > 0) std::memcpy(operation.send_staging.data(), data, static_cast<size_t>(bytes));
    operation.bytes_sent = static_cast<uint64_t>(bytes) * static_cast<uint64_t>(size_ - 1);
  } else {
    operation.bytes_received = static_cast<uint64_t>(bytes);
  }
  EPIC_MPI_CHECK(MPI_Ibcast(operation.send_staging.data(), static_cast<int>(bytes), MPI_BYTE, root, comm_,
                            &operation.request));
  wait_for_current();
  if (rank_ != root && bytes > 0) std::memcpy(data, current_.send_staging.data(), static_cast<size_t>(bytes));
}

void MpiCommunicator::barrier() {
  Operation& operation = begin("barrier");
  EPIC_MPI_CHECK(MPI_Ibarrier(comm_, &operation.request));
  wait_for_current();
}

}  // namespace epic
