// The window loop of epic eval (eval_runner.h).
#include "launch/eval_runner.h"

#include <algorithm>
#include <chrono>
#include <string>

#include "kernels/error.h"

namespace epic::cli {
namespace {

using clock_type = std::chrono::steady_clock;

// Distinct experts that computed rows between two snapshots, and the rows.
std::pair<int64_t, int64_t> experts_and_rows_between(const std::map<int64_t, std::vector<int64_t>>& before,
                                                     const std::map<int64_t, std::vector<int64_t>>& after) {
  int64_t experts = 0, rows = 0;
  for (const auto& [layer, counts] : after) {
    const auto earlier = before.find(layer);
    for (size_t e = 0; e < counts.size(); ++e) {
      const int64_t was = earlier != before.end() && e < earlier->second.size() ? earlier->second[e] : 0;
      experts += counts[e] > was ? 1 : 0;
      rows += counts[e] - was;
    }
  }
  return {experts, rows};
}

}  // namespace

// Rows each (layer, expert) computed on this rank so far (the host exchange's counts).
std::map<int64_t, std::vector<int64_t>> rows_so_far(const DecodeCluster& cluster) {
  const ExpertParallelMoeExecutor* executor = cluster.host_executor();
  return executor != nullptr ? executor->expert_rows() : std::map<int64_t, std::vector<int64_t>>{};
}

std::vector<VariantTotals> Evaluator::run(const std::vector<int32_t>& tokens,
                                          const std::vector<EvalWindow>& windows,
                                          const std::vector<const Variant*>& variants, bool want_quality,
                                          uint64_t expert_bytes) {
  std::vector<VariantTotals> totals(variants.size());
  const int64_t per_round = windows_per_step_ * comm_.size();
  const int64_t rounds = (static_cast<int64_t>(windows.size()) + per_round - 1) / per_round;
  for (int64_t round = 0; round < rounds; ++round) {
    std::vector<EvalWindow> mine;
    for (int64_t i = 0; i < windows_per_step_; ++i) {
      const int64_t w = round * per_round + i * comm_.size() + comm_.rank();
      if (w < static_cast<int64_t>(windows.size())) mine.push_back(windows[w]);
    }
    const ScoredRows layout = lay_out(mine, decode_);
    if (want_quality) begin_round(tokens, mine, layout);
    std::vector<int32_t> reference_ids;  // the reference's argmax of every scored row
    for (size_t v = 0; v < variants.size(); ++v) {
      ModelRunner& runner = variants[v]->offload ? *variants[v]->offload->runner : runner_;
      EPIC_CHECK(&runner.backend() == &backend_, ErrorCode::kInternal,
                 "eval: variant " + variants[v]->name + " runs on another backend than the reference");
      runner.set_routing(variants[v]->policy);
      std::vector<KvSequence> sequences;
      std::vector<SequenceChunk> chunks;
      int64_t rows = 0;
      sequences.reserve(mine.size());
      for (const EvalWindow& window : mine) {
        sequences.push_back(runner.new_sequence());
        chunks.push_back({&sequences.back(),
                          std::span<const int32_t>(tokens.data() + window.begin, window.end - window.begin),
                          true});
        rows += window.end - window.begin;
      }
      const auto before = rows_so_far(cluster_);
      const auto start = clock_type::now();
      if (!decode_) {
        const StepAgreement agreement = cluster_.agree(runner, rows, false);
        runner.forward_batch(chunks, false, &agreement);
        totals[v].seconds += std::chrono::duration<double>(clock_type::now() - start).count();
        record_reads(before, expert_bytes, rows, totals[v]);
        if (!want_quality) continue;
        // Chunk c's rows are its window's positions; the scored ones predict first_target on.
        int64_t chunk_row = 0;
        for (size_t c = 0; c < mine.size(); ++c) {
          const int64_t scored = mine[c].end - mine[c].first_target;
          if (scored > 0)
            score(
                runner.step_logits().rows_view(chunk_row + mine[c].first_target - 1 - mine[c].begin, scored),
                layout.rows[c][0], v == 0);
          chunk_row += mine[c].end - mine[c].begin;
        }
        add_figures(layout, v == 0, reference_ids, totals[v]);
        continue;
      }
      // Decode: the context before each window's first target in one step, then one token per step as
      // generation feeds them; every rank runs the round's longest window's steps (collectives).
      int64_t longest = 0;
      for (int64_t i = 0; i < per_round; ++i) {
        const int64_t w = round * per_round + i;
        if (w < static_cast<int64_t>(windows.size()))
          longest = std::max(longest, windows[w].end - windows[w].first_target);
      }
      for (size_t c = 0; c < mine.size(); ++c)
        chunks[c].tokens =
            std::span<const int32_t>(tokens.data() + mine[c].begin, mine[c].first_target - mine[c].begin);
      clock_type::duration scoring{};
      for (int64_t step = 0; step < longest; ++step) {
        std::vector<SequenceChunk> active;
        std::vector<size_t> which;
        int64_t step_rows = 0;
        for (size_t c = 0; c < mine.size(); ++c) {
          if (step >= mine[c].end - mine[c].first_target) continue;
          if (step > 0)
            chunks[c].tokens = std::span<const int32_t>(tokens.data() + mine[c].first_target + step - 1, 1);
          chunks[c].all_positions = false;
          active.push_back(chunks[c]);
          which.push_back(c);
          step_rows += static_cast<int64_t>(chunks[c].tokens.size());
        }
        const auto step_before = rows_so_far(cluster_);
        const StepAgreement agreement = cluster_.agree(runner, step_rows, step > 0);
        runner.forward_batch(active, false, &agreement);
        record_reads(step_before, expert_bytes, 0, totals[v]);  // the experts each step read
        // One row per active window, in window order: one run of the layout (lay_out). Not counted as the
        // variant's time (a backend that enqueues it adds its device time to the next step's wait).
        if (want_quality && !which.empty()) {
          const auto scoring_start = clock_type::now();
          score(runner.step_logits(), layout.rows[which[0]][step], v == 0);
          scoring += clock_type::now() - scoring_start;
        }
      }
      totals[v].seconds += std::chrono::duration<double>(clock_type::now() - start - scoring).count();
      totals[v].tokens_run += rows;
      if (want_quality) add_figures(layout, v == 0, reference_ids, totals[v]);
    }
  }
  return totals;
}

Evaluator::ScoredRows Evaluator::lay_out(const std::vector<EvalWindow>& windows, bool decode) {
  ScoredRows layout;
  layout.rows.resize(windows.size());
  int64_t longest = 0;
  for (size_t c = 0; c < windows.size(); ++c) {
    const int64_t scored = windows[c].end - windows[c].first_target;
    layout.rows[c].resize(static_cast<size_t>(scored));
    longest = std::max(longest, scored);
    if (decode) continue;
    for (int64_t i = 0; i < scored; ++i) layout.rows[c][i] = layout.count++;
  }
  if (!decode) return layout;
  for (int64_t step = 0; step < longest; ++step) {
    for (size_t c = 0; c < windows.size(); ++c)
      if (step < static_cast<int64_t>(layout.rows[c].size())) layout.rows[c][step] = layout.count++;
  }
  return layout;
}

void Evaluator::begin_round(const std::vector<int32_t>& tokens, const std::vector<EvalWindow>& windows,
                            const ScoredRows& layout) {
  const int64_t vocab = config_.vocab_size;
  if (targets_.empty() || targets_.view().dim(0) < layout.count) {
    // Freed first: the old reference buffer and the new one need not fit side by side.
    reference_log_probs_ = OwnedTensor();
    const int64_t capacity = std::max<int64_t>(layout.count, 1);
    try {
      reference_log_probs_ = backend_.new_tensor(ScalarType::kF32, {capacity, vocab});
    } catch (const Error& error) {
      throw Error(error.code(), "eval: the reference's log-probabilities of " + std::to_string(capacity) +
                                    " scored rows (a round's windows) x " + std::to_string(vocab) +
                                    " logits do not fit beside the model: " + error.what() +
                                    "; or lower --windows-per-step or --window");
    }
    targets_ = backend_.new_tensor(ScalarType::kI32, {capacity});
    scores_ = backend_.new_tensor(ScalarType::kF32, {capacity, kNumRowScores});
    ids_ = backend_.new_tensor(ScalarType::kI32, {capacity});
  }
  round_targets_.assign(static_cast<size_t>(layout.count), 0);
  for (size_t c = 0; c < windows.size(); ++c)
    for (size_t i = 0; i < layout.rows[c].size(); ++i)
      round_targets_[static_cast<size_t>(layout.rows[c][i])] = tokens[windows[c].first_target + i];
  backend_.copy_from_host(targets_, 0, round_targets_.data(), round_targets_.size() * sizeof(int32_t));
}

void Evaluator::score(const Tensor& logits, int64_t first, bool reference) {
  const int64_t rows = logits.rows();
  const Tensor reference_log_probs = reference_log_probs_.view().rows_view(first, rows);
  if (reference) backend_.log_softmax(logits, reference_log_probs);
  backend_.score_rows(logits, targets_.view().rows_view(first, rows), reference_log_probs,
                      scores_.view().rows_view(first, rows), ids_.view().rows_view(first, rows));
}

void Evaluator::add_figures(const ScoredRows& layout, bool reference, std::vector<int32_t>& reference_ids,
                            VariantTotals& totals) const {
  std::vector<float> scores(static_cast<size_t>(layout.count * kNumRowScores));
  std::vector<int32_t> ids(static_cast<size_t>(layout.count));
  backend_.copy_to_host(scores_, 0, scores.data(), scores.size() * sizeof(float));
  backend_.copy_to_host(ids_, 0, ids.data(), ids.size() * sizeof(int32_t));
  if (reference) reference_ids = ids;
  // Window by window, each in target order (the order add_token_quality summed in before score_rows).
  for (const std::vector<int64_t>& window_rows : layout.rows) {
    for (const int64_t row : window_rows) {
      const float* figures = scores.data() + row * kNumRowScores;
      totals.nll_sum += double(figures[kRowLogSumExp]) - double(figures[kRowTargetLogit]);
      totals.kl_sum += figures[kRowKlDivergence];
      totals.agreements += ids[static_cast<size_t>(row)] == reference_ids[static_cast<size_t>(row)] ? 1 : 0;
      totals.scored += 1;
    }
  }
}

void Evaluator::record_reads(const std::map<int64_t, std::vector<int64_t>>& before, uint64_t expert_bytes,
                             int64_t rows, VariantTotals& totals) const {
  const auto [experts, expert_rows] = experts_and_rows_between(before, rows_so_far(cluster_));
  totals.expert_bytes_read += static_cast<double>(experts) * static_cast<double>(expert_bytes);
  totals.expert_rows_computed += expert_rows;
  totals.tokens_run += rows;
}

}  // namespace epic::cli
