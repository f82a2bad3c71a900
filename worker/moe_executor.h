// Who computes a MoE block: LocalMoeExecutor runs route -> group -> grouped expert FFN -> combine
// on this process's backend (every step a device op, no host synchronisation, capturable in a
// graph); ExpertParallelMoeExecutor (expert_parallel_moe.h) puts an all-to-all between them.
// Every worker calls forward() for every MoE layer of every step, with zero rows if it has none,
// because the expert-parallel executor's collectives need every rank.
#pragma once

#include <cstdint>
#include <memory>

#include "kernels/backend.h"
#include "worker/expert_load_counter.h"
#include "worker/model_config.h"
#include "worker/model_weights.h"
#include "worker/routing_policy.h"
#include "worker/workspace.h"

namespace epic {

class MoeExecutor {
 public:
  virtual ~MoeExecutor() = default;
  // out[rows, hidden] = the MoE block of `layer` applied to hidden[rows, hidden] (activation
  // type), work buffers from `workspace`. router_input [rows, hidden] F32 holds the same rows before
  // rounding to the activation type (the same tensor in fp32 mode): the router's softmax and top-k
  // are the most rounding-sensitive step of the model, so the expert choice is made from fp32 rows.
  virtual void forward(int64_t layer, const Tensor& hidden, const Tensor& router_input, const Tensor& out,
                       Workspace& workspace) = 0;
  // Whether forward() only enqueues backend ops (no host copies or communication), so a decode
  // step that calls it can be captured as a graph.
  virtual bool capturable() const = 0;
  // Around one step's forward calls, on every rank of an expert-parallel job with the same value (the
  // most token rows any rank runs in the step, before padding), so an executor whose exchange depends on
  // the step's size picks the same one on every rank; capturable() may change with it. finish_step comes
  // after the step's forward calls (outside any graph), before the host reads the step's results.
  // Defaults: nothing (the local executor and the host exchange do not depend on the step).
  virtual void begin_step(int64_t /*max_rows_on_any_rank*/) {}
  virtual void finish_step() {}

  // The routing of the coming steps (routing_policy.h): set between steps, never inside one; null
  // restores the model as trained. Every rank of an expert-parallel job sets the same policy.
  void set_routing(std::shared_ptr<const RoutingPolicy> policy) { routing_ = std::move(policy); }
  const RoutingPolicy* routing() const { return routing_.get(); }

  // The experts per token of the coming step, for a step whose rows are in other residency states than
  // the policy's (a state per request; set by the runner before begin_step, never inside a step):
  // top_k for every row (0: the policy's), and with row_top_k (I32 [rows] on the backend, each in
  // [1, top_k]) each row its own k (Backend::route_top_k: past a row's k its slots are padding that
  // adds exactly zero). Every rank of an expert-parallel job sets the same top_k for a step.
  void set_step_top_k(int64_t top_k, const Tensor& row_top_k) {
    step_top_k_ = top_k;
    step_row_top_k_ = row_top_k;
  }
  const Tensor& step_row_top_k() const { return step_row_top_k_; }
  // The step's real tokens (I32 [1] on the backend: the rows before a graph bucket's padding rows), set by
  // the runner beside set_step_top_k; absent outside a runner's step (every row is real).
  void set_step_tokens(const Tensor& real_tokens) { step_real_tokens_ = real_tokens; }

  // Per-expert load (/metrics): from here on every forward tallies its routed slots on `backend`
  // (expert_load_counter.h: one small op per layer, no host wait, capturable). Before the first step.
  void count_expert_load(Backend& backend, const ModelWeights& weights) {
    load_counter_ = std::make_unique<ExpertLoadCounter>(backend, weights, load_destination_ranks());
  }
  // Rows routed per (layer, expert) since count_expert_load, on this rank's tokens (a host wait; empty
  // before). The host exchange answers with the rows its own experts computed, which it always counts.
  virtual ExpertLoad read_expert_load() { return load_counter_ ? load_counter_->read() : ExpertLoad{}; }

 protected:
  // With count_expert_load: tallies one layer's routing (expert_ids I32 [tokens, top_k]); an exchange passes
  // each slot's destination rank (the same shape) and answers load_destination_ranks() with the job's size.
  void count_routed(int64_t layer, const Tensor& expert_ids, const Tensor& destinations = {}) {
    if (load_counter_ && expert_ids.dim(0) > 0)
      load_counter_->count(layer, expert_ids, step_real_tokens_, destinations);
  }
  virtual int load_destination_ranks() const { return 0; }

  // Experts per token (the step's slots per row) and the routable experts of a layer under the current
  // policy.
  int64_t routed_top_k(const ModelConfig& config) const {
    if (step_top_k_ > 0) return step_top_k_;
    return routing_ ? routing_->top_k() : config.num_experts_per_tok;
  }
  const Tensor& routable_mask(int64_t layer, const MoeLayerWeights& moe) const {
    return routing_ ? routing_->routable_mask(layer, moe) : moe.present_mask.view();
  }

 private:
  std::shared_ptr<const RoutingPolicy> routing_;
  int64_t step_top_k_ = 0;
  Tensor step_row_top_k_;
  Tensor step_real_tokens_;
  std::unique_ptr<ExpertLoadCounter> load_counter_;
};

class LocalMoeExecutor final : public MoeExecutor {
 public:
  LocalMoeExecutor(const ModelConfig& config, const ModelWeights& weights, Backend& backend)
      : config_(config), weights_(weights), backend_(backend) {}
  void forward(int64_t layer, const Tensor& hidden, const Tensor& router_input, const Tensor& out,
               Workspace& workspace) override;
  bool capturable() const override { return true; }

 private:
  const ModelConfig& config_;
  const ModelWeights& weights_;
  Backend& backend_;
};

}  // namespace epic
