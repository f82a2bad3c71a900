// The window loop of `epic eval` (launch/eval_command.cpp): every window of a text runs once as the
// reference (the model as trained) and once per variant in the same step loop, every rank together
// (attention is data parallel, the experts are spread over the workers), and each variant's logits are
// scored against the reference's of the same window on the backend (Backend::score_rows, the arithmetic of
// worker/quality_metrics.h) without storing a run.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "launch/bench_decode_cluster.h"
#include "launch/expert_budget.h"
#include "worker/expert_store.h"
#include "worker/model_config.h"
#include "worker/model_runner.h"
#include "worker/offloading_moe_executor.h"
#include "worker/quality_metrics.h"
#include "worker/routing_policy.h"

namespace epic::cli {

// One way of running the model that the table compares with the reference.
struct Variant {
  std::string name;
  int64_t top_k = 0;
  double prune_percent = 0;                         // of each pruned layer's present experts
  std::map<int64_t, std::vector<int64_t>> removed;  // per layer, by least use on the calibration text
  std::shared_ptr<const RoutingPolicy> policy;
  // A budget of resident experts (--expert-budget): the variant runs on its own runner over an
  // OffloadingMoeExecutor (one process) or, under mpirun, the host exchange over each worker's store of
  // its shard (ExpertParallelMoeExecutor::set_expert_store); null for the others (the main runner, every
  // expert loaded).
  struct Offload {
    std::string budget, on_miss;
    std::unique_ptr<ExpertStore> store;
    std::unique_ptr<OffloadingMoeExecutor> executor;      // one process
    std::unique_ptr<ExpertParallelMoeExecutor> exchange;  // under mpirun
    std::unique_ptr<ModelRunner> runner;
    // This rank's figures (the exchange's per-row hits and misses under mpirun).
    OffloadStats stats() const {
      return executor ? executor->stats() : exchange_store_stats(exchange->store_demand(), *store);
    }
  };
  std::shared_ptr<Offload> offload;
};

// A variant's figures on one rank, summed over its windows (trivially copyable: gathered as bytes).
struct VariantTotals {
  double nll_sum = 0, kl_sum = 0;
  int64_t agreements = 0, scored = 0;
  int64_t tokens_run = 0;            // window tokens computed (context included)
  double seconds = 0;                // forward steps of this variant
  double expert_bytes_read = 0;      // distinct experts computed per step x their bytes
  int64_t expert_rows_computed = 0;  // (token, slot) rows this rank's experts computed
};

// Rows each (layer, expert) computed on this rank so far (the host exchange's counts; empty without it).
std::map<int64_t, std::vector<int64_t>> rows_so_far(const DecodeCluster& cluster);

// One rank's side of the loop: its share of each round's windows (windows_per_step of them), every
// variant in turn on the same windows, decode-style (--decode) or each window in one step. The logits are
// scored where the backend computed them (Backend::log_softmax and score_rows: the reference's
// log-probabilities stay there for the variants), so only a few numbers per scored row reach the host.
class Evaluator {
 public:
  Evaluator(Communicator& comm, DecodeCluster& cluster, ModelRunner& runner, const ModelConfig& config,
            int64_t windows_per_step, bool decode)
      : comm_(comm),
        cluster_(cluster),
        runner_(runner),
        backend_(runner.backend()),
        config_(config),
        windows_per_step_(windows_per_step),
        decode_(decode) {}

  // Runs every window of `tokens` under the reference and each variant (index 0: the reference; only it for
  // the calibration pass, want_quality false). Returns per variant this rank's totals. Every rank calls it
  // with the same windows and variants (the steps are collectives). Every variant's runner computes on the
  // main runner's backend.
  std::vector<VariantTotals> run(const std::vector<int32_t>& tokens, const std::vector<EvalWindow>& windows,
                                 const std::vector<const Variant*>& variants, bool want_quality,
                                 uint64_t expert_bytes);

 private:
  // Where a round's scored rows sit on the backend: row i of window c (the prediction of token
  // first_target + i) at rows[c][i] of the round's buffers, `count` in all.
  struct ScoredRows {
    std::vector<std::vector<int64_t>> rows;
    int64_t count = 0;
  };
  // Window after window, as a step per window computes them; or (decode) step after step, the windows
  // with a target left at that step in order, so that each decode step's rows are one run.
  static ScoredRows lay_out(const std::vector<EvalWindow>& windows, bool decode);
  // Sizes the buffers for `count` rows and uploads the round's targets.
  void begin_round(const std::vector<int32_t>& tokens, const std::vector<EvalWindow>& windows,
                   const ScoredRows& layout);
  // Enqueues the scoring of `logits` (one step's rows) into the round's rows [first, first + rows); the
  // reference keeps its log-probabilities there for the variants.
  void score(const Tensor& logits, int64_t first, bool reference);
  // Reads a pass's figures back and adds them to totals (the reference's argmax kept in reference_ids).
  void add_figures(const ScoredRows& layout, bool reference, std::vector<int32_t>& reference_ids,
                   VariantTotals& totals) const;
  // Adds the experts computed since `before` (their bytes) and `rows` window tokens to totals.
  void record_reads(const std::map<int64_t, std::vector<int64_t>>& before, uint64_t expert_bytes,
                    int64_t rows, VariantTotals& totals) const;

  Communicator& comm_;
  DecodeCluster& cluster_;
  ModelRunner& runner_;
  Backend& backend_;
  const ModelConfig& config_;
  int64_t windows_per_step_;
  bool decode_;  // token by token after the context (eval --decode), else each window in one step
  // The round's rows on the backend, grown to the largest round: targets I32 [rows], the reference's
  // log-probabilities F32 [rows, vocab], a pass's scores F32 [rows, kNumRowScores] and argmax ids I32 [rows].
  OwnedTensor targets_, reference_log_probs_, scores_, ids_;
  std::vector<int32_t> round_targets_;  // the host side of targets_' upload, alive until it has run
};

}  // namespace epic::cli
