// NcclCommunicator: start-up through the host communicator, the device collectives, and the bounded
// waits (synchronize, start-up, finalize) that turn an NCCL error or a stuck peer into one Error.
#include "comm/nccl/nccl_communicator.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <sstream>
#include <thread>
#include <utility>

#include "kernels/cuda/cuda_check.h"
#include "kernels/error.h"

namespace epic {

namespace {

// NCCL's start-up (topology discovery, connections to every peer) takes seconds on a loaded machine, far
// longer than a tight --comm-timeout allows a collective; a start-up timeout could not name the stuck rank.
constexpr double kStartupFloorSeconds = 60.0;
// Poll in a tight loop this long (a collective on one node finishes well within it), then sleep between
// polls so a rank waiting on a slow peer leaves the CPU to it.
constexpr auto kSpinDuration = std::chrono::milliseconds(1);
constexpr auto kPollSleep = std::chrono::microseconds(50);

using Clock = std::chrono::steady_clock;

// ncclCommAbort first raises the abort flag that ends this rank's NCCL kernels, then frees what it shares
// with the ranks of this host, and for that it waits for them to abort too (NVIDIA/nccl#863): with a peer
// that is stopped (SIGSTOP, a debugger) it never returns. A failing rank needs only the first part, and
// must go on to report and end the job; so the abort runs on a thread of its own and is given this long.
constexpr auto kAbortGrace = std::chrono::seconds(5);
// PeerMonitor indices of NCCL communicators: far above the MPI communicators' (0, 1, ...), and the same on
// every rank because every rank creates its communicators in the same order (the constructor is a
// collective).
constexpr int kMonitorIndexBase = 1 << 20;
std::atomic<int> g_nccl_communicators_created{0};

Clock::time_point deadline_after(double seconds) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

void pause_between_polls(Clock::time_point started) {
  if (Clock::now() - started < kSpinDuration) {
    std::this_thread::yield();
  } else {
    std::this_thread::sleep_for(kPollSleep);
  }
}

std::string format_seconds(double seconds) {
  std::ostringstream text;
  text << seconds;
  return text.str();
}

std::string cuda_error_text(cudaError_t status) {
  return std::string(cudaGetErrorName(status)) + " (" + cudaGetErrorString(status) + ")";
}

// Polls ncclCommGetAsyncError until the communicator leaves ncclInProgress or the deadline passes; never
// throws (the destructor uses it). Returns the last state: ncclInProgress means it timed out.
ncclResult_t poll_until_settled(ncclComm_t comm, double timeout_seconds) {
  const Clock::time_point started = Clock::now();
  const Clock::time_point deadline = deadline_after(timeout_seconds);
  while (true) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t queried = ncclCommGetAsyncError(comm, &state);
    if (queried != ncclSuccess) return queried;
    if (state != ncclInProgress || Clock::now() > deadline) return state;
    pause_between_polls(started);
  }
}

// Aborts `comm` and returns true once ncclCommAbort has returned, or false after kAbortGrace with the
// abort still running (left to finish on its own thread; the process is about to end the job).
bool abort_within_grace(ncclComm_t comm, int device) {
  auto finished = std::make_shared<std::atomic<bool>>(false);
  std::thread aborting([comm, device, finished] {
    cudaSetDevice(device);
    ncclCommAbort(comm);
    finished->store(true, std::memory_order_release);
  });
  const Clock::time_point started = Clock::now();
  while (!finished->load(std::memory_order_acquire) && Clock::now() - started < kAbortGrace)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  if (finished->load(std::memory_order_acquire)) {
    aborting.join();
    return true;
  }
  aborting.detach();
  return false;
}

std::string abort_outcome(bool finished) {
  return finished ? "the NCCL communicator was aborted"
                  : "the NCCL communicator's abort did not return within " +
                        std::to_string(std::chrono::seconds(kAbortGrace).count()) +
                        " s (ncclCommAbort waits for the ranks of this host; one is stuck) and goes on in "
                        "the background";
}

// The unique id on its way from rank 0, with rank 0's failure if it could not make one (so every rank
// fails with the same message rather than waiting for an id that never comes).
struct UniqueIdMessage {
  int32_t ok = 0;
  ncclUniqueId id{};
  char error[256] = {};
};

}  // namespace

NcclCommunicator::NcclCommunicator(Communicator& host, const CommOptions& options,
                                   const NcclOptions& nccl_options)
    : host_(host), options_(options), nccl_options_(nccl_options), rank_(host.rank()), size_(host.size()) {
  // NVLink SHARP (NVLS, multicast objects) must stay off on the shared GPU machines: it reserves fabric
  // resources beyond this job's GPUs. An explicit NCCL_NVLS_ENABLE (e.g. =1 on a dedicated node) is kept;
  // NCCL reads it when the first communicator starts, so it is set before anything NCCL runs.
  setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
  EPIC_CHECK(options_.timeout_seconds > 0, ErrorCode::kInvalidArgument,
             "rank " + std::to_string(rank_) + ": NCCL communicator: timeout_seconds must be positive, got " +
                 format_seconds(options_.timeout_seconds));
  device_ = select_device(host, nccl_options.device);
  monitor_ = PeerMonitor::instance();
  monitor_index_ = kMonitorIndexBase + g_nccl_communicators_created++;
  try {
    initialize(host);
  } catch (...) {
    // The destructor does not run for a constructor that throws: release here, never waiting.
    if (comm_ != nullptr) abort_within_grace(comm_, device_.device);
    comm_ = nullptr;
    if (owns_stream_) cudaStreamDestroy(stream_);
    throw;
  }
}

void NcclCommunicator::initialize(Communicator& host) {
  if (nccl_options_.stream == nullptr) {
    EPIC_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    owns_stream_ = true;
  } else {
    stream_ = nccl_options_.stream;
  }

  UniqueIdMessage message;
  if (rank_ == 0) {
    const ncclResult_t made = ncclGetUniqueId(&message.id);
    message.ok = made == ncclSuccess ? 1 : 0;
    if (made != ncclSuccess)
      std::snprintf(message.error, sizeof(message.error), "ncclGetUniqueId failed: %s (%s)",
                    ncclGetErrorString(made), ncclGetLastError(nullptr));
  }
  host.broadcast(&message, static_cast<int64_t>(sizeof(message)), 0);
  EPIC_CHECK(
      message.ok == 1, ErrorCode::kCommunication,
      "rank " + std::to_string(rank_) + ": NCCL communicator: rank 0 could not start it: " + message.error);

  // Non-blocking: the call returns at once and start-up proceeds in the background, so a rank that never
  // joins leaves this rank polling a deadline instead of blocked inside NCCL.
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  config.commName = "epic";
  pending_.push_back("start-up");
  const ncclResult_t started = ncclCommInitRankConfig(&comm_, size_, message.id, rank_, &config);
  if (started != ncclSuccess && started != ncclInProgress) {
    int version = 0;
    ncclGetVersion(&version);
    fail(ErrorCode::kCommunication,
         "ncclCommInitRankConfig failed: " + std::string(ncclGetErrorString(started)) + ": " +
             ncclGetLastError(comm_) + " (NCCL library " + std::to_string(version) + ", header " +
             std::to_string(NCCL_VERSION_CODE) + ")");
  }
  if (wait_until_ready(std::max(options_.timeout_seconds, kStartupFloorSeconds), "start-up") ==
      Readiness::kTimedOut) {
    fail(ErrorCode::kTimeout, "did not complete within " +
                                  format_seconds(std::max(options_.timeout_seconds, kStartupFloorSeconds)) +
                                  " s: a rank has not joined (see its own message)");
  }
  pending_.clear();
}

NcclCommunicator::~NcclCommunicator() {
  if (comm_ != nullptr) {
    cudaSetDevice(device_.device);
    bool idle = pending_.empty();
    if (!idle) {  // enqueued but never synchronized: done already, or still waiting on a peer?
      ncclResult_t state = ncclInProgress;
      idle = ncclCommGetAsyncError(comm_, &state) == ncclSuccess && state == ncclSuccess &&
             cudaStreamQuery(stream_) == cudaSuccess;
      cudaGetLastError();
    }
    std::string abort_reason;
    if (!idle) {
      abort_reason = "collectives still pending (" + pending_names() + ")";
    } else {
      // Finalize waits for the communicator to be quiescent on every rank: bounded, a gone peer aborts it.
      const ncclResult_t finalizing = ncclCommFinalize(comm_);
      const ncclResult_t state = (finalizing == ncclSuccess || finalizing == ncclInProgress)
                                     ? poll_until_settled(comm_, options_.timeout_seconds)
                                     : finalizing;
      if (state == ncclSuccess) {
        if (ncclCommDestroy(comm_) != ncclSuccess) abort_reason = "ncclCommDestroy failed";
      } else {
        abort_reason = state == ncclInProgress
                           ? "ncclCommFinalize did not finish within " +
                                 format_seconds(options_.timeout_seconds) + " s (a peer is gone or stuck)"
                           : std::string("ncclCommFinalize failed: ") + ncclGetErrorString(state);
      }
    }
    if (!abort_reason.empty()) {
      const std::string outcome = abort_outcome(abort_within_grace(comm_, device_.device));
      std::fprintf(stderr, "epic: warning: rank %d: NCCL communicator at destruction: %s; %s\n", rank_,
                   abort_reason.c_str(), outcome.c_str());
    }
    comm_ = nullptr;
  }
  // Returns at once; the stream's resources go when its work is done (aborted NCCL kernels exit).
  if (owns_stream_) cudaStreamDestroy(stream_);
}

void NcclCommunicator::abort() {
  if (comm_ == nullptr) return;
  const bool finished = abort_within_grace(comm_, device_.device);
  comm_ = nullptr;
  abort_reason_ = std::string("abort() was called") + (finished ? "" : "; " + abort_outcome(false));
  pending_.clear();
  pending_bytes_sent_ = pending_bytes_received_ = 0;
}

void NcclCommunicator::begin(const char* operation, uint64_t bytes_sent, uint64_t bytes_received) {
  EPIC_CHECK(comm_ != nullptr, ErrorCode::kCommunication,
             "rank " + std::to_string(rank_) + ": NCCL " + operation +
                 ": the NCCL communicator was aborted earlier (" + abort_reason_ + "); a new one is needed");
  EPIC_CUDA_CHECK(cudaSetDevice(device_.device));
  pending_.push_back(std::string(operation) + " #" + std::to_string(++sequence_));
  pending_bytes_sent_ += bytes_sent;
  pending_bytes_received_ += bytes_received;
}

void NcclCommunicator::check_call(ncclResult_t result, const char* statement, const char* file, int line) {
  if (result == ncclSuccess) return;
  if (result == ncclInProgress) {
    if (wait_until_ready(options_.timeout_seconds, statement) == Readiness::kReady) return;
    fail(ErrorCode::kTimeout, std::string(statement) + " did not finish within " +
                                  format_seconds(options_.timeout_seconds) +
                                  " s: a peer has not joined it (stuck, dead, or in another collective)");
  }
  fail(ErrorCode::kCommunication, std::string(statement) + " failed at " + file + ":" + std::to_string(line) +
                                      ": " + ncclGetErrorString(result) + ": " + ncclGetLastError(comm_));
}

NcclCommunicator::Readiness NcclCommunicator::wait_until_ready(double timeout_seconds,
                                                               const std::string& what) {
  const ncclResult_t state = poll_until_settled(comm_, timeout_seconds);
  if (state == ncclSuccess) return Readiness::kReady;
  if (state == ncclInProgress) return Readiness::kTimedOut;
  fail(ErrorCode::kCommunication, what + ": " + describe_async_error(state));
}

std::string NcclCommunicator::describe_async_error(ncclResult_t error) const {
  // ncclRemoteError: a peer failed or went away; the others are this rank's or the system's.
  const char* last = comm_ != nullptr ? ncclGetLastError(comm_) : "";
  return std::string(error == ncclRemoteError ? "a peer failed or is gone: " : "NCCL error: ") +
         ncclGetErrorString(error) + (last != nullptr && *last != '\0' ? std::string(": ") + last : "");
}

std::string NcclCommunicator::pending_names() const {
  std::string names;
  for (const std::string& name : pending_) names += (names.empty() ? "" : ", ") + name;
  // Nothing enqueued from the host since the last wait: a replayed graph's collectives, or others' work.
  return names.empty() ? "work queued on its stream" : names;
}

void NcclCommunicator::fail(ErrorCode code, const std::string& what) {
  const std::string activity = host_.activity().empty() ? "" : " (" + host_.activity() + ")";
  // Reached it and gave up: ranks diagnosing the same fault must not take this one for the stuck rank.
  if (monitor_ != nullptr) monitor_->set_state(RankState::kGaveUp);
  const bool aborted = comm_ == nullptr || abort_within_grace(comm_, device_.device);
  const std::string message = "rank " + std::to_string(rank_) + ": NCCL " + pending_names() + activity +
                              " on CUDA device " + std::to_string(device_.device) + " (" +
                              device_.pci_bus_id + "): " + what + "; " + abort_outcome(aborted);
  comm_ = nullptr;
  abort_reason_ = message;
  pending_.clear();
  pending_bytes_sent_ = pending_bytes_received_ = 0;
  throw Error(code, message);
}

void NcclCommunicator::synchronize() {
  EPIC_CHECK(comm_ != nullptr, ErrorCode::kCommunication,
             "rank " + std::to_string(rank_) +
                 ": NCCL synchronize: the NCCL communicator was aborted earlier (" + abort_reason_ +
                 "); a new one is needed");
  EPIC_CUDA_CHECK(cudaSetDevice(device_.device));
  ++waits_;
  if (monitor_ != nullptr)
    monitor_->entering(monitor_index_, waits_, CollectiveKind::kDeviceWait, host_.activity());
  const Clock::time_point started = Clock::now();
  const Clock::time_point deadline = deadline_after(options_.timeout_seconds);
  while (true) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t queried = ncclCommGetAsyncError(comm_, &state);
    if (queried != ncclSuccess) fail(ErrorCode::kCommunication, describe_async_error(queried));
    if (state != ncclSuccess && state != ncclInProgress)
      fail(ErrorCode::kCommunication, describe_async_error(state));
    const cudaError_t stream_state = cudaStreamQuery(stream_);
    if (stream_state == cudaSuccess && state == ncclSuccess) break;
    if (stream_state != cudaSuccess && stream_state != cudaErrorNotReady) {
      cudaGetLastError();
      fail(ErrorCode::kInternal, "the stream failed: " + cuda_error_text(stream_state));
    }
    if (Clock::now() > deadline) {
      // The PeerMonitor sees the ranks of this host: which never reached this wait, and what they do.
      const std::string who = monitor_ != nullptr
                                  ? monitor_->who_did_not_reach(monitor_index_, waits_)
                                  : "a peer has not joined it (stuck, dead, or in another collective)";
      fail(ErrorCode::kTimeout, "did not complete within " + format_seconds(options_.timeout_seconds) +
                                    " s: " + who +
                                    ". If the ranks are only slow, raise the timeout (epic run "
                                    "--comm-timeout)");
    }
    pause_between_polls(started);
  }
  if (monitor_ != nullptr) monitor_->set_state(RankState::kComputing);
  bytes_sent_ += std::exchange(pending_bytes_sent_, 0);
  bytes_received_ += std::exchange(pending_bytes_received_, 0);
  pending_.clear();
}

}  // namespace epic
