// The arithmetic of `epic eval` (launch/eval_command.cpp), kept apart from the model so it can be checked
// by hand: the sliding windows a long text is scored in, and the per-token figures of a variant's logits
// against the reference's (negative log-likelihood of the true next token, KL divergence from the
// reference distribution, agreement of the most likely token). Sums are in double: a file of 10^5 tokens
// adds 10^5 terms.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kernels/next_token_scores.h"  // log_sum_exp and the row arithmetic

namespace epic {

// One window of a sliding-window evaluation: the model reads tokens [begin, end) with no earlier context
// and is scored on predicting the tokens at [first_target, end), each from the logits of the position
// before it. Windows advance by `stride`. With stride < window each token from position 1 on is a target
// exactly once, with up to window - stride tokens of context carried over from the previous window; with
// stride = window the first token of each window has nothing before it and is not scored. Both as
// transformers' perplexity guide computes it.
struct EvalWindow {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t first_target = 0;
};

// Error(kInvalidArgument) for window < 2, stride < 1 or stride > window, or fewer than 2 tokens.
std::vector<EvalWindow> sliding_windows(int64_t num_tokens, int64_t window, int64_t stride);

struct TokenQuality {
  double nll_sum = 0;      // - log p(target), natural log
  double kl_sum = 0;       // KL(reference || variant), nats
  int64_t agreements = 0;  // argmax equal to the reference's argmax (lowest id among ties)
  int64_t tokens = 0;
  void add(const TokenQuality& other);
  double perplexity() const;      // exp(nll_sum / tokens)
  double mean_kl() const;         // kl_sum / tokens
  double top1_agreement() const;  // agreements / tokens
};

// The log-softmax of one row of logits (float: exact to ~1e-7, far below the differences measured).
std::vector<float> log_softmax(std::span<const float> logits);

// Adds one scored position: the reference's log-probabilities (log_softmax of its logits) and argmax,
// the variant's logits and the true next token. Error(kInvalidArgument) for mismatched sizes or a target
// outside the vocabulary. The arithmetic is score_row's (kernels/next_token_scores.h), the one the backends'
// score_rows op runs on the device, so a caller with logits on a backend scores them there instead.
void add_token_quality(std::span<const float> reference_log_probs, int64_t reference_argmax,
                       std::span<const float> variant_logits, int32_t target, TokenQuality& into);

}  // namespace epic
