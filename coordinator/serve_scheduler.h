// The scheduler of `epic serve` (issue 11): requests checked by the HTTP thread join the engine
// (coordinator/step_engine.h: the model in this process, or a worker job over TCP) at the next step
// boundary (continuous batching), every step's
// tokens go out to their clients as they come (server-sent events, whole UTF-8 characters, stop strings
// held back), a client that leaves has its sequence cancelled, and a full queue is refused with 429. Its
// loop runs on its own thread; submit/cancel/metrics are safe from any thread.
// The tokens of a step go out on an output thread while the engine runs the next step (detokenizing, stop
// strings and every stream's chunk off the step's critical path); a sequence a stop string ends there is
// taken out of the engine at the next boundary (its one extra token is dropped). While nothing runs the
// loop gives the engine its heartbeat (a remote engine notices a dead worker job then).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "coordinator/completion_text.h"
#include "coordinator/http_server.h"
#include "coordinator/openai_api.h"
#include "coordinator/tokenizer.h"
#include "coordinator/step_engine.h"

namespace epic {

// A Prometheus histogram of seconds: cumulative counts per upper bound, their sum and count.
struct LatencyHistogram {
  static constexpr double kBounds[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30};
  int64_t counts[sizeof(kBounds) / sizeof(double)] = {};  // observations <= each bound
  int64_t count = 0;
  double sum = 0;
  void observe(double seconds);
};

struct ServeCounters {
  int64_t requests_ok = 0, requests_cancelled = 0, requests_failed = 0;
  int64_t prompt_tokens = 0, completion_tokens = 0;
  int64_t running = 0, queued = 0;
  int64_t steps = 0;
  double step_seconds = 0;                    // wall time inside engine steps
  double scheduling_seconds = 0;  // the loop's own work around them (admissions, cancels, hand-off)
  double output_seconds = 0;      // the output thread's: tokens into answers, beside the next step
  LatencyHistogram first_token, inter_token;  // seconds from submission to the first token; between tokens
};

class ServeScheduler {
 public:
  // max_queued: requests waiting beyond the engine's live ones; more is a 429.
  ServeScheduler(StepEngine& engine, const Tokenizer& tokenizer, std::vector<int32_t> end_ids,
                 int64_t max_queued);
  ~ServeScheduler();

  // From the HTTP thread. The request is checked, tokenised and fitted already; its answer goes to
  // `exchange`. Returns false (and answers 429) when the queue is full.
  bool submit(CompletionRequest request, std::vector<int32_t> prompt, int64_t max_tokens,
              std::shared_ptr<HttpExchange> exchange);
  // The loop; returns once stop() was called and (after the grace) nothing is left.
  void run();
  // Stops taking requests; running ones may finish for `grace`, then are cancelled (their clients told).
  void stop(std::chrono::milliseconds grace);
  ServeCounters counters() const;
  // /metrics: the counters in Prometheus' text format, then the engine's own lines.
  std::string metrics_text() const;
  // Tokens generated per second over the last kRateWindow.
  double tokens_per_second() const;

 private:
  struct Active;
  struct OutputItem;
  void finish(Active& active, const std::string& reason);
  void fail(Active& active, const std::string& message);
  void hand_to_output(OutputItem item);
  void run_output();  // the output thread
  void deliver(const std::vector<EngineEvent>& events, std::chrono::steady_clock::time_point step_end);

  StepEngine& engine_;
  const Tokenizer& tokenizer_;
  std::vector<int32_t> end_ids_;  // tokens that end a completion (never shown): the model's eos, <|im_end|>
  int64_t max_queued_;
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::unique_ptr<Active>> inbox_;
  std::vector<int64_t> cancelled_;  // ids whose clients left
  std::vector<int64_t> stopped_;    // ids the output thread ended (a stop string): out of the engine next
  bool stopping_ = false;
  std::chrono::steady_clock::time_point stop_deadline_;
  std::map<int64_t, std::unique_ptr<Active>> active_;  // the output thread's own
  // The loop thread -> output thread queue; at most kOutputStepsAhead steps of tokens wait in it.
  static constexpr int64_t kOutputStepsAhead = 2;
  std::mutex output_mutex_;
  std::condition_variable output_wake_, output_room_;
  std::deque<OutputItem> output_queue_;
  int64_t output_steps_pending_ = 0;
  int64_t next_id_ = 0;
  ServeCounters counters_;
  // Tokens generated per step over the last kRateWindow (the tokens/s gauge).
  static constexpr std::chrono::seconds kRateWindow{10};
  std::deque<std::pair<std::chrono::steady_clock::time_point, int64_t>> recent_tokens_;
};

}  // namespace epic
