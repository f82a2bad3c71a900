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
  int32_t sample(std::span<const float> logits);

 private:
  SamplingOptions options_;
  std::mt19937_64 generator_;
};

// The lowest id among the maximal logits.
int32_t argmax(std::span<const float> logits);

}  // namespace epic
