// Status-carrying broadcast and all-gather (see rank_agreement.h).
#include "launch/rank_agreement.h"

#include <exception>

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

}  // namespace epic::cli
