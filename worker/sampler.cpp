// Greedy and top-p sampling; probabilities in double so tiny tails are not lost.
#include "worker/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "kernels/error.h"

namespace epic {

namespace {

// "NaN at token id 5 (2 of 1000 logits are not finite)", or "" when every logit is finite.
std::string describe_non_finite(std::span<const float> logits) {
  size_t first = logits.size(), count = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    if (std::isfinite(logits[i])) continue;
    if (count++ == 0) first = i;
  }
  if (count == 0) return "";
  const float value = logits[first];
  const char* kind = std::isnan(value) ? "NaN" : value > 0 ? "+Inf" : "-Inf";
  return std::string(kind) + " at token id " + std::to_string(first) + " (" + std::to_string(count) + " of " +
         std::to_string(logits.size()) + " logits are not finite)";
}

constexpr const char* kNonFiniteCause =
    ": the weights or activations overflowed (or the checkpoint holds NaN/Inf weights), so no token can be "
    "chosen; check the checkpoint (re-export it, in f32 or bf16 rather than f16 if it was converted)";

}  // namespace

void check_logits_finite(std::span<const float> logits, int64_t sequence_id, int64_t step) {
  const std::string problem = describe_non_finite(logits);
  if (problem.empty()) return;
  const std::string where =
      "sequence " + std::to_string(sequence_id) + ", " +
      (step == 0 ? std::string("prefill (step 0)") : "decode step " + std::to_string(step));
  throw Error(ErrorCode::kInvalidCheckpoint, where + ": the logits hold " + problem + kNonFiniteCause);
}

int32_t argmax(std::span<const float> logits) {
  EPIC_CHECK(!logits.empty(), ErrorCode::kInvalidArgument, "argmax of empty logits");
  int32_t best = 0;
  for (size_t i = 1; i < logits.size(); ++i)
    if (logits[i] > logits[best]) best = static_cast<int32_t>(i);
  return best;
}

Sampler::Sampler(const SamplingOptions& options) : options_(options), generator_(options.seed) {
  if (!std::isfinite(options.temperature) || options.temperature < 0)
    throw Error(ErrorCode::kInvalidArgument,
                "--temperature must be a finite number >= 0 (0 means greedy), got " +
                    std::to_string(options.temperature));
  if (!std::isfinite(options.top_p) || options.top_p <= 0 || options.top_p > 1)
    throw Error(ErrorCode::kInvalidArgument,
                "--top-p must be in (0, 1], got " + std::to_string(options.top_p));
}

void Sampler::skip_samples(int64_t count) {
  if (options_.temperature == 0.0) return;
  // The same distribution type as sample() draws from: its bounds scale the number, not how many the
  // generator gives.
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  for (int64_t i = 0; i < count; ++i) (void)uniform(generator_);
}

int32_t Sampler::sample(std::span<const float> logits) {
  const std::string problem = describe_non_finite(logits);
  if (!problem.empty())
    throw Error(ErrorCode::kInvalidCheckpoint,
                "the logits given to the sampler hold " + problem + kNonFiniteCause);
  if (options_.temperature == 0.0) return argmax(logits);
  const double max_logit = *std::max_element(logits.begin(), logits.end());
  std::vector<double> probabilities(logits.size());
  double total = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    probabilities[i] = std::exp((logits[i] - max_logit) / options_.temperature);
    total += probabilities[i];
  }
  std::vector<int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  // Descending probability, ties to the lower id, so the kept set is well defined.
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return probabilities[a] > probabilities[b]; });
  size_t kept = 0;
  double kept_mass = 0;
  while (kept < order.size() && (kept == 0 || kept_mass < options_.top_p * total))
    kept_mass += probabilities[order[kept++]];
  std::uniform_real_distribution<double> uniform(0.0, kept_mass);
  double target = uniform(generator_);
  for (size_t i = 0; i < kept; ++i) {
    target -= probabilities[order[i]];
    if (target < 0) return order[i];
  }
  return order[kept - 1];
}

}  // namespace epic
