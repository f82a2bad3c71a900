// Status-carrying broadcast and all-gather (see rank_agreement.h).
#include "launch/rank_agreement.h"

#include <chrono>
#include <cstdlib>
#include <exception>
#include <memory>
#include <thread>

#include "launch/cli_commands.h"

namespace epic::cli {
namespace {

// "O" + payload, or "E" + one byte of error code + message.
std::string ok_message(const std::string& payload) { return "O" + payload; }
std::string error_message(ErrorCode code, const std::string& message) {
  return std::string("E") + static_cast<char>(code) + message;
}
[[noreturn]] void throw_error_message(const std::string& wire, const std::string& prefix) {
  throw AgreedError(static_cast<ErrorCode>(wire[1]), prefix + wire.substr(2));
}

std::string capture(const std::function<std::string()>& produce) {
  try {
    return ok_message(produce());
  } catch (const Error& e) {
    return error_message(e.code(), e.what());
  } catch (const std::exception& e) {
    return error_message(ErrorCode::kInternal, e.what());
  }
}

}  // namespace

std::string broadcast_from_root(Communicator& comm, int root, const std::function<std::string()>& produce) {
  std::string wire = comm.rank() == root ? capture(produce) : std::string();
  wire = comm.broadcast_bytes(wire, root);
  if (wire.empty()) throw Error(ErrorCode::kCommunication, "empty message from rank " + std::to_string(root));
  if (wire[0] == 'E') throw_error_message(wire, "");
  return wire.substr(1);
}

void run_on_all_ranks(Communicator& comm, const std::function<void()>& phase) {
  const std::string mine = capture([&] {
    phase();
    return std::string();
  });
  const std::vector<std::vector<char>> all =
      comm.all_gather_v<char>(std::span<const char>(mine.data(), mine.size()));
  for (size_t rank = 0; rank < all.size(); ++rank) {
    const std::string wire(all[rank].begin(), all[rank].end());
    if (!wire.empty() && wire[0] == 'E')
      throw_error_message(wire, comm.size() > 1 ? "rank " + std::to_string(rank) + ": " : "");
  }
}

[[noreturn]] void end_job_naming_rank(Communicator& comm, const Error& error) {
  const std::string message = error.what();
  const Error named = message.starts_with("rank ")
                          ? error
                          : Error(error.code(), "rank " + std::to_string(comm.rank()) + ": " + message);
  comm.end_job_after_error([&] { print_error(named); }, exit_code_for(named.code()));
}

int launcher_rank() {
  for (const char* name : {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"}) {
    const char* value = std::getenv(name);
    if (value != nullptr && *value != '\0') return std::atoi(value);
  }
  return 0;
}

int run_job(const std::function<void()>& check_flags, double comm_timeout_seconds,
            const std::function<int(Communicator&)>& body) {
  try {
    check_flags();
  } catch (const Error& e) {
    if (launcher_rank() > 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
      throw SilentFailure{exit_code_for(e.code())};
    }
    throw;
  }
  std::unique_ptr<Communicator> comm = make_communicator(CommOptions{comm_timeout_seconds});
  try {
    return body(*comm);
  } catch (const AgreedError& e) {
    // Rank 0 reports the error every rank raised. Then all ranks meet once more before exiting,
    // because mpirun aborts the job at the first non-zero exit and would cut rank 0's report off.
    if (comm->rank() == 0) print_error(e);
    try {
      comm->barrier();
    } catch (const Error&) {
      // A rank already gone: nothing left to coordinate; exit with the agreed code anyway.
    }
    throw SilentFailure{exit_code_for(e.code())};
  } catch (const Error& e) {
    if (comm->size() == 1) throw;
    // Raised on this rank alone (a timeout, a stuck or dead peer, non-finite logits, a backend error, a
    // failure inside the MoE exchange): no agreement point comes, and the peers may be waiting in a
    // collective for this rank. End the whole job now, reported once and naming this rank; MPI_Abort
    // tells the peers, no collective per step is spent on it.
    end_job_naming_rank(*comm, e);
  } catch (const std::exception& e) {
    if (comm->size() == 1) throw;
    end_job_naming_rank(*comm, Error(ErrorCode::kInternal, e.what()));
  } catch (...) {
    if (comm->size() == 1) throw;
    end_job_naming_rank(*comm, Error(ErrorCode::kInternal, "an exception that is not a std::exception"));
  }
}

}  // namespace epic::cli
