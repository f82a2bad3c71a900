// The window loop of epic eval (eval_runner.h).
#include "launch/eval_runner.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <exception>
#include <mutex>
#include <thread>

#include "worker/sampler.h"

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
    // The reference's log-probabilities of the scored rows (float: KL to ~1e-7) and its argmax.
    std::vector<std::vector<float>> reference_log_probs(mine.size());
    std::vector<std::vector<int64_t>> reference_argmax(mine.size());
    for (size_t v = 0; v < variants.size(); ++v) {
      ModelRunner& runner = variants[v]->offload ? *variants[v]->offload->runner : runner_;
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
        StepOutput output = runner.forward_batch(chunks, want_quality, &agreement);
        totals[v].seconds += std::chrono::duration<double>(clock_type::now() - start).count();
        record_reads(before, expert_bytes, rows, totals[v]);
        if (!want_quality) continue;
        for (size_t c = 0; c < mine.size(); ++c)
          score(mine[c], tokens, output.logits.of_chunk(c), mine[c].first_target - 1 - mine[c].begin, v == 0,
                reference_log_probs[c], reference_argmax[c], totals[v]);
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
      std::vector<std::vector<float>> scored_logits(mine.size());
      for (size_t c = 0; c < mine.size(); ++c)
        chunks[c].tokens =
            std::span<const int32_t>(tokens.data() + mine[c].begin, mine[c].first_target - mine[c].begin);
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
        StepOutput output = runner.forward_batch(active, want_quality, &agreement);
        record_reads(step_before, expert_bytes, 0, totals[v]);  // the experts each step read
        if (!want_quality) continue;
        for (size_t a = 0; a < which.size(); ++a) {
          const std::span<const float> row = output.logits.last_row(a);
          scored_logits[which[a]].insert(scored_logits[which[a]].end(), row.begin(), row.end());
        }
      }
      totals[v].seconds += std::chrono::duration<double>(clock_type::now() - start).count();
      totals[v].tokens_run += rows;
      if (!want_quality) continue;
      for (size_t c = 0; c < mine.size(); ++c)
        score(mine[c], tokens, scored_logits[c], 0, v == 0, reference_log_probs[c], reference_argmax[c],
              totals[v]);
    }
  }
  return totals;
}

void Evaluator::score(const EvalWindow& window, const std::vector<int32_t>& tokens,
                      std::span<const float> logits, int64_t first_row, bool reference,
                      std::vector<float>& reference_log_probs, std::vector<int64_t>& reference_argmax,
                      VariantTotals& totals) const {
  const int64_t vocab = config_.vocab_size;
  const int64_t scored = window.end - window.first_target;
  if (reference) {
    reference_log_probs.resize(static_cast<size_t>(scored * vocab));
    reference_argmax.resize(static_cast<size_t>(scored));
  }
  constexpr int64_t kRowsPerChunk = 4;
  const int64_t chunks = (scored + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<TokenQuality> partial(static_cast<size_t>(chunks));
  std::atomic<int64_t> next{0};
  std::exception_ptr failure;
  std::mutex failure_mutex;
  const auto work = [&] {
    try {
      for (int64_t chunk = next++; chunk < chunks; chunk = next++) {
        for (int64_t i = chunk * kRowsPerChunk; i < std::min(scored, (chunk + 1) * kRowsPerChunk); ++i) {
          const std::span<const float> row =
              logits.subspan(static_cast<size_t>((first_row + i) * vocab), static_cast<size_t>(vocab));
          float* kept = reference_log_probs.data() + i * vocab;
          if (reference) {
            const std::vector<float> log_probs = log_softmax(row);
            std::copy(log_probs.begin(), log_probs.end(), kept);
            reference_argmax[i] = argmax(row);
          }
          add_token_quality(std::span<const float>(kept, static_cast<size_t>(vocab)), reference_argmax[i],
                            row, tokens[window.first_target + i], partial[chunk]);
        }
      }
    } catch (...) {
      const std::lock_guard<std::mutex> lock(failure_mutex);
      if (!failure) failure = std::current_exception();
    }
  };
  const int64_t helpers = std::min<int64_t>(threads_, chunks) - 1;
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < helpers; ++t) pool.emplace_back(work);
  work();
  for (std::thread& thread : pool) thread.join();
  if (failure) std::rethrow_exception(failure);
  for (const TokenQuality& quality : partial) {
    totals.nll_sum += quality.nll_sum;
    totals.kl_sum += quality.kl_sum;
    totals.agreements += quality.agreements;
    totals.scored += quality.tokens;
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
