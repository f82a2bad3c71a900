// EPIC_TEST_COMM_FAULT, read once per process (see fault_injection.h).
#include "comm/fault_injection.h"

#include <csignal>
#include <cstdlib>
#include <optional>
#include <sstream>
#include <string>

#include "kernels/error.h"

namespace epic {

namespace {

constexpr const char* kVariable = "EPIC_TEST_COMM_FAULT";

enum class FaultAction { kStop, kSpin, kKill, kThrow };

struct Fault {
  int rank = -1;
  int64_t sequence = 0;
  FaultAction action = FaultAction::kStop;
};

std::optional<Fault> parse_fault(const std::string& text) {
  std::istringstream stream(text);
  Fault fault;
  char colon1 = 0, colon2 = 0;
  std::string action;
  stream >> fault.rank >> colon1 >> fault.sequence >> colon2 >> action;
  const bool well_formed = stream && colon1 == ':' && colon2 == ':' && fault.rank >= 0 && fault.sequence >= 1;
  if (well_formed && action == "stop")
    fault.action = FaultAction::kStop;
  else if (well_formed && action == "spin")
    fault.action = FaultAction::kSpin;
  else if (well_formed && action == "kill")
    fault.action = FaultAction::kKill;
  else if (well_formed && action == "throw")
    fault.action = FaultAction::kThrow;
  else
    return std::nullopt;
  return fault;
}

}  // namespace

void inject_test_fault(int comm_index, int rank, int64_t sequence) {
  static const char* const value = std::getenv(kVariable);
  if (value == nullptr || *value == '\0' || comm_index != 0) return;
  static const std::optional<Fault> fault = parse_fault(value);
  if (!fault) {
    throw Error(ErrorCode::kInvalidArgument, std::string(kVariable) + "=\"" + value +
                                                 "\" is not RANK:COLLECTIVE:ACTION with ACTION one of stop, "
                                                 "spin, kill, throw (a test-only variable: unset it)");
  }
  if (fault->rank != rank || fault->sequence != sequence) return;
  switch (fault->action) {
    case FaultAction::kStop:
      std::raise(SIGSTOP);
      return;
    case FaultAction::kSpin: {
      volatile uint64_t work = 0;
      while (true) work = work + 1;  // busy, never calls MPI again
    }
    case FaultAction::kKill:
      std::raise(SIGKILL);
      return;
    case FaultAction::kThrow:
      throw Error(ErrorCode::kInternal, "rank " + std::to_string(rank) + ": injected test fault (" +
                                            kVariable + ") before collective #" + std::to_string(sequence));
  }
}

}  // namespace epic
