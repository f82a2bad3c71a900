// One worker's sequences as an engine its driver advances a step at a time (issue 11: the coordinator
// drives the step loop instead of running a closed one). Sequences are admitted at any time and wait in
// order; each step first lets waiting sequences join the running batch (up to max_active_sequences live,
// and only while the KV cache can hold the longest each may grow to), prefills the ones that joined and
// decodes the rest, and reports every token produced, so a server can stream them. With a prefill chunk,
// a step feeds at most that many prompt tokens over all prefilling sequences (a long prompt is fed over
// several steps) while every decoding sequence still takes its one token, so a long prompt never stalls
// the running decodes; a sequence that ends (an end-of-sequence id or max_new_tokens)
// leaves with its result and its cache freed at once, and one can be cancelled between steps. Every row is
// computed on its own, so what else is in the batch never changes a sequence's tokens.
//
// run_generation (generation_loop.h) drives it in lockstep with the other workers: next_step() says what the
// coming step will hold before it is built, so the ranks can agree on the step's shape first.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <unordered_set>
#include <vector>

#include "worker/generation_loop.h"
#include "worker/model_runner.h"

namespace epic {

// The coming step on this worker, before it runs (what the lockstep agreement needs).
struct PlannedStep {
  int64_t unfinished = 0;   // live + waiting sequences
  int64_t joining = 0;      // waiting sequences that join (prefill) in it
  int64_t rows = 0;         // token rows: each live sequence's one, the joining ones' prompts
  bool decode_only = true;  // no sequence joins
  // The fewest and most experts per token among the step's rows (0: no rows): StepAgreement::top_k.
  int64_t fewest_top_k = 0, most_top_k = 0;
};

// What one step did for one sequence: the token it produced (none when it had already reached
// max_new_tokens), and, when it ended, its whole result.
struct SequenceStepEvent {
  int64_t sequence_id = 0;
  std::optional<int32_t> token;
  std::optional<SequenceResult> finished;
};

// The shape every rank's coming step agrees on (one all-gather of each rank's plan), for an engine driven
// from outside (epic worker: the coordinator sends every rank each step). run_generation agrees the same
// way, with its results in the same collective.
// `unfinished_everywhere`: the sequences left on all ranks together (0: no step to run).
StepAgreement agree_on_step(Communicator& comm, const PlannedStep& plan, uint64_t graph_buckets,
                            int64_t& unfinished_everywhere);

class GenerationEngine {
 public:
  // max_active_sequences in [1, kMaxActiveSequencesBound], prefill_chunk_tokens >= 0 (0: a prompt in one
  // step) (Error(kInvalidArgument) otherwise). The runner must outlive the engine.
  GenerationEngine(ModelRunner& runner, int64_t max_active_sequences, int64_t prefill_chunk_tokens = 0);
  ~GenerationEngine();
  GenerationEngine(const GenerationEngine&) = delete;
  GenerationEngine& operator=(const GenerationEngine&) = delete;

  // Queues a sequence behind those waiting. Error(kInvalidArgument) for an empty prompt, a sequence id
  // that is waiting or live already (results are told apart by id), or one whose prompt plus
  // max_new_tokens exceeds the whole KV cache (it could never join).
  void admit(SequenceRequest request);
  // Drops a waiting or live sequence (its cache freed, no result); false when the id is neither.
  bool cancel(int64_t sequence_id);

  PlannedStep next_step() const;
  // Runs the step next_step() describes; with `agreement` (several ranks) the step shape the ranks agreed on
  // (ModelRunner::forward_batch). Events in live order (admission order). `poison` is the test fault of
  // generation_loop.cpp (non-finite logits on every sequence). Errors: what forward_batch throws, and
  // Error(kInvalidCheckpoint) naming the sequence when its logits are not finite.
  std::vector<SequenceStepEvent> step(const StepAgreement* agreement = nullptr, bool poison = false);

  bool idle() const { return live_.empty() && waiting_.empty(); }
  int64_t live_sequences() const { return static_cast<int64_t>(live_.size()); }
  int64_t waiting_sequences() const { return static_cast<int64_t>(waiting_.size()); }
  // Positions held in the live sequences' KV caches.
  int64_t kv_positions() const;
  const GenerationStats& stats() const { return stats_; }

 private:
  struct LiveSequence;
  // The coming step: how many waiting sequences join, and the rows each live then joining sequence feeds
  // (0: it sits the step out, its prompt waiting for the chunk budget).
  struct Layout {
    int64_t joining = 0;
    std::vector<int64_t> rows;
  };
  Layout layout() const;
  // Blocks of the KV cache a sequence may come to hold (prompt and every new token).
  static int64_t blocks_needed(const SequenceRequest& request);

  ModelRunner& runner_;
  int64_t max_active_sequences_;
  int64_t prefill_chunk_tokens_;
  std::deque<SequenceRequest> waiting_;
  std::vector<std::unique_ptr<LiveSequence>> live_;  // in admission order
  std::unordered_set<int64_t> known_ids_;            // waiting or live
  GenerationStats stats_;
};

}  // namespace epic
