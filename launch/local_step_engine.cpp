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

std::vector<EngineEvent> LocalStepEngine::step() {
  std::vector<EngineEvent> events;
  for (const SequenceStepEvent& event : engine_.step())
    events.push_back({event.sequence_id, event.token, event.finished.has_value()});
  kv_tokens_ = engine_.kv_positions();
  return events;
}

std::string LocalStepEngine::metrics_text() const {
  PrometheusText out;
  append_kv_cache_metrics(out, {kv_tokens_.load()}, {kv_capacity_tokens_});
  return out.take();
}

}  // namespace epic::cli
