// EPIC_TEST_COMM_FAULT and EPIC_TEST_STEP_FAULT, each read once per process (see fault_injection.h).
#include "comm/fault_injection.h"

#include <csignal>
#include <cstdlib>
#include <optional>
#include <sstream>
#include <string>

#include "kernels/error.h"

namespace epic {

namespace {

constexpr const char* kCommVariable = "EPIC_TEST_COMM_FAULT";
constexpr const char* kStepVariable = "EPIC_TEST_STEP_FAULT";
constexpr int kEveryRank = -1;

enum class FaultAction { kStop, kSpin, kKill, kThrow, kNan };

struct Fault {
  int rank = kEveryRank;
  int64_t at = 0;  // the collective or step number, from 1
  FaultAction action = FaultAction::kStop;
};

std::optional<FaultAction> parse_action(const std::string& text, bool allow_nan) {
  if (text == "stop") return FaultAction::kStop;
  if (text == "spin") return FaultAction::kSpin;
  if (text == "kill") return FaultAction::kKill;
  if (text == "throw") return FaultAction::kThrow;
  if (text == "nan" && allow_nan) return FaultAction::kNan;
  return std::nullopt;
}

// "RANK:NUMBER:ACTION"; RANK may be * where allow_every_rank.
std::optional<Fault> parse_fault(const std::string& text, bool allow_every_rank, bool allow_nan) {
  std::istringstream stream(text);
  std::string rank_text, at_text, action_text;
  if (!std::getline(stream, rank_text, ':') || !std::getline(stream, at_text, ':') ||
      !std::getline(stream, action_text) || rank_text.empty() || at_text.empty())
    return std::nullopt;
  Fault fault;
  size_t used = 0;
  try {
    if (rank_text != "*" || !allow_every_rank) {
      fault.rank = std::stoi(rank_text, &used);
      if (used != rank_text.size() || fault.rank < 0) return std::nullopt;
    }
    fault.at = std::stoll(at_text, &used);
    if (used != at_text.size() || fault.at < 1) return std::nullopt;
  } catch (const std::exception&) {
    return std::nullopt;
  }
  const std::optional<FaultAction> action = parse_action(action_text, allow_nan);
  if (!action) return std::nullopt;
  fault.action = *action;
  return fault;
}

// The variable's fault, or none when it is unset or empty; a malformed value throws, naming the variable.
std::optional<Fault> read_fault(const char* variable, const char* value, bool for_steps) {
  if (value == nullptr || *value == '\0') return std::nullopt;
  const std::optional<Fault> fault = parse_fault(value, for_steps, for_steps);
  if (!fault) {
    throw Error(
        ErrorCode::kInvalidArgument,
        std::string(variable) + "=\"" + value + "\" is not " +
            (for_steps ? "RANK:STEP:ACTION with RANK a rank or *, ACTION one of stop, spin, kill, throw, nan"
                       : "RANK:COLLECTIVE:ACTION with ACTION one of stop, spin, kill, throw") +
            " (a test-only variable: unset it)");
  }
  return fault;
}

// stop, spin and kill; throw and nan are the caller's, which knows what to say or poison.
void act(FaultAction action) {
  switch (action) {
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
    case FaultAction::kNan:
      return;
  }
}

}  // namespace

void inject_test_fault(int comm_index, int rank, int64_t sequence, const std::string& activity) {
  static const char* const value = std::getenv(kCommVariable);
  if (value == nullptr || *value == '\0' || comm_index != 0) return;
  static const std::optional<Fault> fault = read_fault(kCommVariable, value, false);
  if (fault->rank != rank || fault->at != sequence) return;
  if (fault->action == FaultAction::kThrow) {
    throw Error(ErrorCode::kInternal, "rank " + std::to_string(rank) + ": injected test fault (" +
                                          kCommVariable + ") before collective #" + std::to_string(sequence) +
                                          (activity.empty() ? "" : " (" + activity + ")"));
  }
  act(fault->action);
}

bool inject_test_step_fault(int rank, int64_t step) {
  // Read once: the happy path pays one branch per step.
  static const char* const value = std::getenv(kStepVariable);
  if (value == nullptr || *value == '\0') return false;
  static const std::optional<Fault> fault = read_fault(kStepVariable, value, true);
  if ((fault->rank != kEveryRank && fault->rank != rank) || fault->at != step) return false;
  if (fault->action == FaultAction::kThrow) {
    throw Error(ErrorCode::kInternal, "rank " + std::to_string(rank) + ": injected test fault (" +
                                          kStepVariable + ") at generation step " + std::to_string(step));
  }
  if (fault->action == FaultAction::kNan) return true;
  act(fault->action);
  return false;
}

}  // namespace epic
