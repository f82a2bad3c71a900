// One row of next-token scoring on the host (next_token_scores.h).
#include "kernels/next_token_scores.h"

#include <algorithm>
#include <cmath>

namespace epic {

double log_sum_exp(std::span<const float> logits) {
  if (logits.empty()) return -INFINITY;
  const float max = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (float value : logits) sum += std::exp(value - max);
  return double(max) + std::log(sum);
}

void log_softmax_row(std::span<const float> logits, std::span<float> out) {
  const double log_sum = log_sum_exp(logits);
  for (size_t i = 0; i < logits.size(); ++i) out[i] = static_cast<float>(double(logits[i]) - log_sum);
}

RowScore score_row(std::span<const float> logits, int32_t target,
                   std::span<const float> reference_log_probs) {
  RowScore score;
  score.log_sum_exp = static_cast<float>(log_sum_exp(logits));
  score.target_logit = logits[static_cast<size_t>(target)];
  double kl = 0;
  int32_t best = 0;
  for (size_t v = 0; v < logits.size(); ++v) {
    const float ref = reference_log_probs[v];
    kl += double(std::exp(ref) * (ref - (logits[v] - score.log_sum_exp)));
    if (logits[v] > logits[static_cast<size_t>(best)]) best = static_cast<int32_t>(v);  // strictly: lowest id
  }
  // >= 0 mathematically, rounding can give -1e-9; a NaN (non-finite logits) stays NaN, where std::max
  // (0.0, kl) made it 0
  score.kl_divergence = kl < 0.0 ? 0.0 : kl;
  score.argmax = best;
  return score;
}

}  // namespace epic
