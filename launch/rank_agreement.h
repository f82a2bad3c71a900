// Making every rank fail together: an error on one rank (a bad prompt read by the coordinator, a
// corrupt shard only one worker reads) reaches every rank at the next agreement point, instead of
// leaving the others waiting in a collective until their timeout.
#pragma once

#include <functional>
#include <string>

#include "comm/communicator.h"
#include "kernels/error.h"

namespace epic::cli {

// An error every rank raised together: rank 0 reports it, the other ranks exit quietly.
class AgreedError : public Error {
 public:
  using Error::Error;
};

// Thrown instead of an AgreedError on ranks other than 0: exit with this code, print nothing.
struct SilentFailure {
  int exit_code;
};

// Runs produce() on root only and broadcasts its result; if it threw an epic::Error, every rank
// throws the same AgreedError.
std::string broadcast_from_root(Communicator& comm, int root, const std::function<std::string()>& produce);

// Runs phase() on every rank, then agrees: if any rank threw, every rank throws (as AgreedError) the error of
// the lowest failing rank, its message prefixed with "rank R: " when there are several ranks.
void run_on_all_ranks(Communicator& comm, const std::function<void()>& phase);

// Ends the job after an error raised on this rank alone, its report naming the rank (printed once, by
// Communicator::end_job_after_error): the communicator's own errors start with "rank R" already (this rank,
// or the peer at fault), the others (a bad value, a backend error) get this rank's prefix.
[[noreturn]] void end_job_naming_rank(Communicator& comm, const Error& error);

// A job's command from start to exit code: check_flags() first on every rank before MPI starts (a bad
// flag is reported by the launcher's rank 0 alone; the others wait a moment and exit quietly, since
// mpirun ends the job at the first non-zero exit), then the communicator, then body(comm). An
// AgreedError is reported once by rank 0 after a last barrier; an error on one rank alone ends the job
// at once, naming the rank (end_job_naming_rank). One process: errors go up as they are.
int run_job(const std::function<void()>& check_flags, double comm_timeout_seconds,
            const std::function<int(Communicator&)>& body);

// This process's rank as the launcher's environment tells it before MPI starts (0 when none does).
int launcher_rank();

}  // namespace epic::cli
