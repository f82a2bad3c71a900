// The host arithmetic of scoring next-token predictions one row of logits at a time (what `epic eval`
// measures: worker/quality_metrics.h), run by the CPU backend's log_softmax and score_rows
// (kernels/backend.h) and by add_token_quality. Terms in fp32, sums in double.
#pragma once

#include <cstdint>
#include <span>

namespace epic {

// log(sum(exp(logits))), the max subtracted first, summed in double; -inf for an empty row.
double log_sum_exp(std::span<const float> logits);

// out[v] = logits[v] - log_sum_exp(logits), in double, rounded to fp32. out has the size of logits.
void log_softmax_row(std::span<const float> logits, std::span<float> out);

// One row's figures against the reference's log-probabilities of the same position (log_softmax_row
// of its logits; the same size as logits, checked by the caller, as is 0 <= target < logits.size()).
struct RowScore {
  float log_sum_exp = 0;  // rounded to fp32: the log-probabilities below use this value
  float target_logit = 0;
  // sum_v exp(ref[v]) * (ref[v] - (logits[v] - log_sum_exp)), fp32 terms: >= 0 (NaN for non-finite logits)
  double kl_divergence = 0;
  int32_t argmax = 0;  // the lowest id among the largest logits
};
RowScore score_row(std::span<const float> logits, int32_t target, std::span<const float> reference_log_probs);

}  // namespace epic
