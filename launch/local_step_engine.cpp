// GenerationEngine behind StepEngine (local_step_engine.h).
#include "launch/local_step_engine.h"

#include "coordinator/prometheus_text.h"

namespace epic::cli {

SequenceRequest to_sequence_request(const EngineSequence& sequence) {
  SequenceRequest request;
  request.sequence_id = sequence.id;
  request.seed_id = 0;
  request.prompt = sequence.prompt;
  request.resumed_ids = sequence.resumed;
  request.max_new_tokens = sequence.max_new_tokens;
  request.sampling = {sequence.temperature, sequence.top_p, sequence.seed};
  return request;
}

LocalStepEngine::LocalStepEngine(GenerationEngine& engine, int64_t kv_capacity_tokens,
                                 MoeExecutor* expert_load)
    : engine_(engine), kv_capacity_tokens_(kv_capacity_tokens), expert_load_(expert_load) {
  load_read_at_ = std::chrono::steady_clock::now();
  load_window_.reset(1, load_read_at_);
}

std::vector<EngineEvent> LocalStepEngine::step() {
  std::vector<EngineEvent> events;
  for (const SequenceStepEvent& event : engine_.step())
    events.push_back({event.sequence_id, event.token, event.finished.has_value()});
  kv_tokens_ = engine_.kv_positions();
  // About once a second, and when the step leaves the engine idle (a burst shorter than a second shows too).
  const auto now = std::chrono::steady_clock::now();
  if (expert_load_ != nullptr && (now - load_read_at_ >= std::chrono::seconds(1) || engine_.idle())) {
    load_read_at_ = now;
    const ExpertLoad load = expert_load_->read_expert_load();  // waits for the device: between steps only
    load_window_.note(0, load.rows_per_expert, load.rows_per_rank, now);
  }
  return events;
}

std::string LocalStepEngine::metrics_text() const {
  PrometheusText out;
  append_kv_cache_metrics(out, {kv_tokens_.load()}, {kv_capacity_tokens_});
  load_window_.append_metrics(out);
  return out.take();
}

}  // namespace epic::cli
