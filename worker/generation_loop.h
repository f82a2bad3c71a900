// The worker's step loop: this worker's sequences advance in lockstep with every other worker's.
// At most GenerationOptions::max_active_sequences of them are live at once (prefilling or
// decoding, each with its KV cache); the rest wait in their given order and are admitted as slots
// free, a newly admitted sequence prefilling in the same step as the others decode. A finished
// sequence's cache is freed at once and its result travels to the result root at the next step's
// agreement, so neither caches nor results pile up with the number of prompts. Steps go on until
// no worker has a sequence left, so a worker with nothing to do still joins every MoE layer's
// collectives. Every row is computed on its own, so batch composition never changes a result.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <vector>

#include "comm/communicator.h"
#include "worker/model_runner.h"
#include "worker/sampler.h"

namespace epic {

struct SequenceRequest {
  int64_t sequence_id = 0;  // position in the user's prompt list
  std::vector<int32_t> prompt;
  int64_t max_new_tokens = 0;
  bool want_prompt_logits = false;
  SamplingOptions sampling;  // seed is mixed with sequence_id, so results do not depend on placement
  // Experts per token of this sequence (its residency state: ModelRunner's SequenceChunk::top_k);
  // 0: the routing policy's.
  int64_t top_k = 0;
  // The id mixed into the seed instead of sequence_id (epic serve: 0, so a request samples what `epic run`
  // samples for a single prompt with the same seed). Last: callers fill the fields above positionally.
  std::optional<int64_t> seed_id = std::nullopt;
  // Tokens this sequence produced before (epic serve resuming it after its worker job was restarted): they
  // are prefilled after the prompt, count towards max_new_tokens, are not reported again, and the sampler
  // skips the draws that produced them, so the tokens after them are the ones an uninterrupted run gives.
  std::vector<int32_t> resumed_ids = {};
};

struct SequenceResult {
  int64_t sequence_id = 0;
  std::vector<int32_t> new_ids;      // stops after an eos id (included)
  std::vector<float> prompt_logits;  // [prompt_len, vocab] when asked for
};

struct GenerationStats {
  int64_t steps = 0;
  int64_t tokens_processed = 0;       // prompt + generated tokens this worker ran
  int64_t most_active_sequences = 0;  // the most sequences live at once on this worker
};

// 64 live sequences give a decode step 64 rows per worker (64 x top-k rows for the experts), enough
// to keep the batched linears busy, while the KV caches held stay at 64 x (prompt + new tokens) x
// kv_cache_bytes_per_token (the tiny preset: 1 KiB per token; Qwen3-30B-A3B: 192 KiB per token).
constexpr int64_t kDefaultMaxActiveSequences = 64;
// The largest value accepted: a million live sequences already means a million KV caches per worker.
constexpr int64_t kMaxActiveSequencesBound = int64_t{1} << 20;

struct GenerationOptions {
  int64_t max_active_sequences = kDefaultMaxActiveSequences;  // in [1, kMaxActiveSequencesBound], per worker
  int result_root = 0;                                        // the rank whose sink receives results
  int64_t prefill_chunk_tokens = 0;  // prompt tokens a step feeds at most (GenerationEngine); 0: whole prompts
};

// Receives, on the result root only, each finished sequence of every worker, one step after the
// step it finished in (a worker's in its finishing order; across workers in no fixed order).
using ResultSink = std::function<void(SequenceResult&& result)>;

// Runs `sequences` (this worker's share, admitted in this order) to the end on every rank together.
// Throws Error(kInvalidArgument) for an empty prompt or max_active_sequences out of its range. Results
// already handed to the sink stay delivered if a later step throws.
GenerationStats run_generation(ModelRunner& runner, std::span<const SequenceRequest> sequences,
                               Communicator& comm, const GenerationOptions& options, const ResultSink& sink);

// Every result at the result root (rank 0), in sequence id order; other ranks get none. For tests
// and small jobs: it holds every result until the end.
std::vector<SequenceResult> run_generation(ModelRunner& runner, const std::vector<SequenceRequest>& sequences,
                                           Communicator& comm, GenerationStats* stats = nullptr);

// The sampling seed of one sequence: a mix of the run's seed and the sequence id.
uint64_t sequence_seed(uint64_t seed, int64_t sequence_id);

}  // namespace epic
