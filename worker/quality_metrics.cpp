// Sliding windows and per-token quality figures (quality_metrics.h).
#include "worker/quality_metrics.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "kernels/error.h"
#include "worker/sampler.h"

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

double log_sum_exp(std::span<const float> logits) {
  if (logits.empty()) return -INFINITY;
  const float max = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (float value : logits) sum += std::exp(value - max);
  return double(max) + std::log(sum);
}

std::vector<float> log_softmax(std::span<const float> logits) {
  const double log_sum = log_sum_exp(logits);
  std::vector<float> out(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) out[i] = static_cast<float>(double(logits[i]) - log_sum);
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
  const float log_sum = static_cast<float>(log_sum_exp(variant_logits));
  double kl = 0;
  for (size_t v = 0; v < variant_logits.size(); ++v) {
    const float ref = reference_log_probs[v];
    kl += double(std::exp(ref) * (ref - (variant_logits[v] - log_sum)));
  }
  into.nll_sum += double(log_sum) - double(variant_logits[static_cast<size_t>(target)]);
  into.kl_sum += std::max(0.0, kl);  // >= 0 mathematically; rounding can give -1e-9
  into.agreements += argmax(variant_logits) == reference_argmax ? 1 : 0;
  into.tokens += 1;
}

}  // namespace epic
