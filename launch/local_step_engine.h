// The serve scheduler's engine when the model runs in the coordinator's own process (`epic serve` without
// --workers): a GenerationEngine behind the StepEngine interface. A request's seed is mixed with id 0, so
// it samples what `epic run` samples for one prompt with the same seed, wherever it lands in the batch.
#pragma once

#include <atomic>
#include <chrono>

#include "coordinator/expert_load_window.h"
#include "coordinator/step_engine.h"
#include "worker/generation_engine.h"
#include "worker/moe_executor.h"

namespace epic::cli {

// The request the worker's engine takes for one the scheduler hands over (shared with `epic worker`).
SequenceRequest to_sequence_request(const EngineSequence& sequence);

class LocalStepEngine final : public StepEngine {
 public:
  // kv_capacity_tokens: what the runner's KV cache holds (for /metrics). With `expert_load` (the runner's
  // MoE executor, counting: MoeExecutor::count_expert_load) the per-expert load of the last window too,
  // read between steps about once a second and when a step leaves the engine idle.
  LocalStepEngine(GenerationEngine& engine, int64_t kv_capacity_tokens, MoeExecutor* expert_load = nullptr);
  void admit(EngineSequence sequence) override { engine_.admit(to_sequence_request(sequence)); }
  bool cancel(int64_t id) override { return engine_.cancel(id); }
  bool idle() const override { return engine_.idle(); }
  std::vector<EngineEvent> step() override;
  int64_t live_sequences() const override { return engine_.live_sequences(); }
  int64_t waiting_sequences() const override { return engine_.waiting_sequences(); }
  std::string metrics_text() const override;  // KV cache usage, per-expert load

 private:
  GenerationEngine& engine_;
  int64_t kv_capacity_tokens_;
  std::atomic<int64_t> kv_tokens_{0};  // after the last step (read by the HTTP thread)
  MoeExecutor* expert_load_ = nullptr;
  std::chrono::steady_clock::time_point load_read_at_{};
  ExpertLoadWindow load_window_;
};

}  // namespace epic::cli
