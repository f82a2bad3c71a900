// What the serve scheduler drives (issue 11): an engine that takes sequences at any time, runs one step
// of every live sequence when asked and reports the tokens it produced, and cancels between steps. Two
// of them: the model in the coordinator's own process (launch/local_step_engine.h) and a worker job
// over TCP (coordinator/remote_step_engine.h), which may die and come back without the scheduler seeing
// more than a slow step.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace epic {

struct EngineSequence {
  int64_t id = 0;
  std::vector<int32_t> prompt;
  // Tokens already produced and sent to the client (a sequence resumed after its worker job died): the
  // engine continues after them and reports only the tokens that follow.
  std::vector<int32_t> resumed;
  int64_t max_new_tokens = 0;  // counting the resumed tokens
  double temperature = 0, top_p = 1;
  uint64_t seed = 0;
};

struct EngineEvent {
  int64_t id = 0;
  std::optional<int32_t> token;
  bool finished = false;  // an end-of-sequence id or max_new_tokens: the sequence left the engine
};

class StepEngine {
 public:
  virtual ~StepEngine() = default;
  // Queues a sequence (its id unique among those admitted and not finished or cancelled).
  virtual void admit(EngineSequence sequence) = 0;
  // Drops a sequence before the next step (its KV freed); false when the id is unknown.
  virtual bool cancel(int64_t id) = 0;
  virtual bool idle() const = 0;
  // One step of every live sequence; events in no particular order across sequences.
  virtual std::vector<EngineEvent> step() = 0;
  virtual int64_t live_sequences() const = 0;
  virtual int64_t waiting_sequences() const = 0;
  // False while the engine cannot step (a worker job starting or restarting): /health says so.
  virtual bool ready() const { return true; }
  // While idle the scheduler calls heartbeat() this often (zero: never), so a remote engine notices a dead
  // worker job between requests too.
  virtual std::chrono::milliseconds heartbeat_interval() const { return std::chrono::milliseconds(0); }
  virtual void heartbeat() {}
  // The engine's own lines for /metrics (Prometheus text), e.g. worker restarts and per-worker load.
  virtual std::string metrics_text() const { return {}; }
};

}  // namespace epic
