// Sliding windows and per-token quality figures (quality_metrics.h).
#include "worker/quality_metrics.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "kernels/error.h"

namespace epic {

std::vector<EvalWindow> sliding_windows(int64_t num_tokens, int64_t window, int64_t stride) {
  if (window < 2)
    throw Error(ErrorCode::kInvalidArgument, "window of " + std::to_string(window) +
                                                 " tokens: a window needs at least 2 (one to predict from)");
  if (stride < 1 || stride > window)
    throw Error(ErrorCode::kInvalidArgument,
                "stride of " + std::to_string(stride) + " tokens: give a stride from 1 to the window (" +
                    std::to_string(window) + "); smaller strides give more context");
  if (num_tokens < 2)
    throw Error(ErrorCode::kInvalidArgument,
                "the text has " + std::to_string(num_tokens) + " token(s): perplexity needs at least 2");
  std::vector<EvalWindow> windows;
  int64_t scored_until = 1;  // every target before this position is scored already
  for (int64_t begin = 0; scored_until < num_tokens; begin += stride) {
    const int64_t end = std::min(begin + window, num_tokens);
    windows.push_back({begin, end, std::max(scored_until, begin + 1)});
    scored_until = end;
  }
  return windows;
}

void TokenQuality::add(const TokenQuality& other) {
  nll_sum += other.nll_sum;
  kl_sum += other.kl_sum;
  agreements += other.agreements;
  tokens += other.tokens;
}

double TokenQuality::perplexity() const { return tokens > 0 ? std::exp(nll_sum / double(tokens)) : 0.0; }
double TokenQuality::mean_kl() const { return tokens > 0 ? kl_sum / double(tokens) : 0.0; }
double TokenQuality::top1_agreement() const { return tokens > 0 ? double(agreements) / double(tokens) : 0.0; }

std::vector<float> log_softmax(std::span<const float> logits) {
  std::vector<float> out(logits.size());
  log_softmax_row(logits, out);
  return out;
}

void add_token_quality(std::span<const float> reference_log_probs, int64_t reference_argmax,
                       std::span<const float> variant_logits, int32_t target, TokenQuality& into) {
  if (reference_log_probs.size() != variant_logits.size())
    throw Error(ErrorCode::kInvalidArgument,
                "quality: reference rows of " + std::to_string(reference_log_probs.size()) +
                    " and variant rows of " + std::to_string(variant_logits.size()) + " logits");
  if (target < 0 || static_cast<size_t>(target) >= variant_logits.size())
    throw Error(ErrorCode::kInvalidArgument, "quality: target token " + std::to_string(target) +
                                                 " outside a vocabulary of " +
                                                 std::to_string(variant_logits.size()));
  const RowScore score = score_row(variant_logits, target, reference_log_probs);
  into.nll_sum += double(score.log_sum_exp) - double(score.target_logit);
  into.kl_sum += score.kl_divergence;
  into.agreements += score.argmax == reference_argmax ? 1 : 0;
  into.tokens += 1;
}

}  // namespace epic
