// The worker's step loop: this worker's sequences advance in lockstep with every other worker's.
// Step 0 prefills all of them in one batch; each later step feeds one token per active sequence.
// Steps go on until no worker has an active sequence, so a worker with nothing left to do still
// joins every MoE layer's collectives.
#pragma once

#include <cstdint>
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
};

struct SequenceResult {
  int64_t sequence_id = 0;
  std::vector<int32_t> new_ids;      // stops after an eos id (included)
  std::vector<float> prompt_logits;  // [prompt_len, vocab] when asked for
};

struct GenerationStats {
  int64_t steps = 0;
  int64_t tokens_processed = 0;  // prompt + generated tokens this worker ran
};

std::vector<SequenceResult> run_generation(ModelRunner& runner, const std::vector<SequenceRequest>& sequences,
                                           Communicator& comm, GenerationStats* stats = nullptr);

// The sampling seed of one sequence: a mix of the run's seed and the sequence id.
uint64_t sequence_seed(uint64_t seed, int64_t sequence_id);

}  // namespace epic
