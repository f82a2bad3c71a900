// Picks the next token from logits: greedy (temperature 0) or temperature + nucleus (top-p)
// sampling from a seeded generator, so a run is reproducible from its seed.
#pragma once

#include <cstdint>
#include <random>
#include <span>

namespace epic {

struct SamplingOptions {
  double temperature = 0.0;  // 0: greedy
  double top_p = 1.0;        // keep the smallest set of tokens whose probability reaches top_p
  uint64_t seed = 0;
};

class Sampler {
 public:
  // Throws Error(kInvalidArgument) for a negative or non-finite temperature or top_p outside (0, 1].
  explicit Sampler(const SamplingOptions& options);
  // Throws Error(kInvalidCheckpoint) for logits holding NaN or Inf (an argmax over NaN would
  // silently pick token 0); callers that know the sequence and step check first, to name them.
  int32_t sample(std::span<const float> logits);
  // Advances the generator past `count` samples at a temperature above 0 (each draws one number), as if
  // they had been taken: a sequence resumed after `count` sampled tokens goes on with the draws it would
  // have had. Greedy sampling draws nothing, so there it changes nothing.
  void skip_samples(int64_t count);

 private:
  SamplingOptions options_;
  std::mt19937_64 generator_;
};

// The lowest id among the maximal logits.
int32_t argmax(std::span<const float> logits);

// Throws Error(kInvalidCheckpoint) unless every logit is finite, naming the sequence, the step
// (0 is the prefill, then decode steps 1, 2, ...), the first bad token id and its kind: NaN or
// Inf logits mean the weights or activations overflowed, and no token choice is meaningful.
void check_logits_finite(std::span<const float> logits, int64_t sequence_id, int64_t step);

}  // namespace epic
