// The CPU backend's scoring ops: kernels/next_token_scores.h's row arithmetic over rows spread on
// threads (each row alone, so the thread count changes no bit).
#include <span>
#include <string>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/next_token_scores.h"

namespace epic::cpu {
namespace {

std::span<const float> row_of(const Tensor& t, int64_t row) {
  const auto width = static_cast<size_t>(t.dim(1));
  return {t.as<const float>() + static_cast<size_t>(row) * width, width};
}

}  // namespace

void log_softmax(const Tensor& logits, const Tensor& out, int num_threads) {
  const int64_t vocab = logits.dim(1);
  parallel_for(logits.dim(0), vocab, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row)
      log_softmax_row(row_of(logits, row), {out.as<float>() + row * vocab, static_cast<size_t>(vocab)});
  });
}

void score_rows(const Tensor& logits, const Tensor& targets, const Tensor& reference_log_probs,
                const Tensor& scores, const Tensor& ids, int num_threads) {
  const int64_t vocab = logits.dim(1);
  const int32_t* target = targets.as<const int32_t>();
  for (int64_t row = 0; row < logits.dim(0); ++row) {  // before the threads: a throw must not leave one
    if (target[row] < 0 || target[row] >= vocab)
      fail_value("score_rows", "targets[" + std::to_string(row) + "] = " + std::to_string(target[row]) +
                                   " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
  }
  parallel_for(logits.dim(0), 2 * vocab, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const RowScore score = score_row(row_of(logits, row), target[row], row_of(reference_log_probs, row));
      float* columns = scores.as<float>() + row * kNumRowScores;
      columns[kRowLogSumExp] = score.log_sum_exp;
      columns[kRowTargetLogit] = score.target_logit;
      columns[kRowKlDivergence] = static_cast<float>(score.kl_divergence);
      ids.as<int32_t>()[row] = score.argmax;
    }
  });
}

}  // namespace epic::cpu
