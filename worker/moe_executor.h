// Who computes a MoE block: LocalMoeExecutor runs all four steps in this process;
// ExpertParallelMoeExecutor (expert_parallel_moe.h) puts an all-to-all between them.
// Every worker calls forward() for every MoE layer of every step, with zero rows if it has none,
// because the expert-parallel executor's collectives need every rank.
#pragma once

#include <cstdint>

#include "kernels/backend.h"
#include "worker/model_config.h"
#include "worker/model_weights.h"

namespace epic {

class MoeExecutor {
 public:
  virtual ~MoeExecutor() = default;
  // out[num_tokens, hidden] = the MoE block of `layer` applied to hidden[num_tokens, hidden].
  virtual void forward(int64_t layer, const float* hidden, int64_t num_tokens, float* out) = 0;
};

class LocalMoeExecutor final : public MoeExecutor {
 public:
  LocalMoeExecutor(const ModelConfig& config, const ModelWeights& weights, Backend& backend)
      : config_(config), weights_(weights), backend_(backend) {}
  void forward(int64_t layer, const float* hidden, int64_t num_tokens, float* out) override;

 private:
  const ModelConfig& config_;
  const ModelWeights& weights_;
  Backend& backend_;
};

}  // namespace epic
