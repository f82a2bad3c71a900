// Lockstep prefill + decode over this worker's sequences (see generation_loop.h).
#include "worker/generation_loop.h"

#include <algorithm>

#include "kernels/error.h"
#include "worker/random_values.h"

namespace epic {

uint64_t sequence_seed(uint64_t seed, int64_t sequence_id) {
  return splitmix64(seed + 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(sequence_id));
}

std::vector<SequenceResult> run_generation(ModelRunner& runner, const std::vector<SequenceRequest>& sequences,
                                           Communicator& comm, GenerationStats* stats) {
  const ModelConfig& config = runner.config();
  const int64_t vocab = config.vocab_size;
  const size_t count = sequences.size();
  std::vector<SequenceResult> results(count);
  std::vector<KvCache> caches;
  std::vector<Sampler> samplers;
  std::vector<bool> active(count, false);
  caches.reserve(count);
  samplers.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    EPIC_CHECK(!sequences[i].prompt.empty(), ErrorCode::kInvalidArgument,
               "sequence " + std::to_string(sequences[i].sequence_id) + " has an empty prompt");
    results[i].sequence_id = sequences[i].sequence_id;
    caches.emplace_back(config);
    SamplingOptions sampling = sequences[i].sampling;
    sampling.seed = sequence_seed(sampling.seed, sequences[i].sequence_id);
    samplers.emplace_back(sampling);
  }

  // Samples the next token of sequence i from its last logits; false when it is finished.
  auto advance = [&](size_t i, const float* last_logits) {
    if (static_cast<int64_t>(results[i].new_ids.size()) >= sequences[i].max_new_tokens) return false;
    const int32_t next = samplers[i].sample(std::span<const float>(last_logits, vocab));
    results[i].new_ids.push_back(next);
    const bool eos = std::find(config.eos_token_ids.begin(), config.eos_token_ids.end(), next) !=
                     config.eos_token_ids.end();
    return !eos && static_cast<int64_t>(results[i].new_ids.size()) < sequences[i].max_new_tokens;
  };

  GenerationStats local_stats;
  // Step 0: prefill every sequence at once.
  {
    std::vector<SequenceChunk> chunks;
    for (size_t i = 0; i < count; ++i) {
      chunks.push_back({&caches[i], sequences[i].prompt, sequences[i].want_prompt_logits});
      local_stats.tokens_processed += static_cast<int64_t>(sequences[i].prompt.size());
    }
    std::vector<std::vector<float>> logits = runner.forward_batch(chunks);
    for (size_t i = 0; i < count; ++i) {
      if (sequences[i].want_prompt_logits) results[i].prompt_logits = logits[i];
      active[i] = advance(i, logits[i].data() + logits[i].size() - vocab);
    }
    ++local_stats.steps;
  }
  // Decode steps until every worker is done.
  while (true) {
    const int64_t my_active = std::count(active.begin(), active.end(), true);
    const std::vector<int64_t> all_active = comm.all_gather_value<int64_t>(my_active);
    int64_t total_active = 0;
    for (int64_t a : all_active) total_active += a;
    if (total_active == 0) break;
    std::vector<SequenceChunk> chunks;
    std::vector<size_t> chunk_sequence;
    for (size_t i = 0; i < count; ++i) {
      if (!active[i]) continue;
      chunks.push_back({&caches[i], std::span<const int32_t>(&results[i].new_ids.back(), 1), false});
      chunk_sequence.push_back(i);
    }
    local_stats.tokens_processed += static_cast<int64_t>(chunks.size());
    std::vector<std::vector<float>> logits = runner.forward_batch(chunks);
    for (size_t c = 0; c < chunks.size(); ++c)
      active[chunk_sequence[c]] = advance(chunk_sequence[c], logits[c].data());
    ++local_stats.steps;
  }
  if (stats) *stats = local_stats;
  return results;
}

}  // namespace epic
