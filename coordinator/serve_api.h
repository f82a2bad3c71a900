// The routes of epic serve's HTTP API (issue 11): /health (ready once the model is loaded and the engine is
// up), /v1/models, /metrics, and the completions routes, which check the body (openai_api.h), tokenize the
// prompt, fit it to the context and hand it to the scheduler. Every refusal is a 4xx/5xx in OpenAI's error
// shape. The handler runs on the HTTP server's I/O thread; the scheduler and engine are set once they exist.
#pragma once

#include <atomic>
#include <cstdint>

#include "coordinator/http_server.h"
#include "coordinator/openai_api.h"
#include "coordinator/serve_scheduler.h"
#include "coordinator/step_engine.h"
#include "coordinator/tokenizer.h"

namespace epic {

struct ServeApi {
  ApiLimits limits;
  const Tokenizer* tokenizer = nullptr;
  int64_t created = 0;  // /v1/models' "created"
  std::atomic<bool> ready{false};
  std::atomic<ServeScheduler*> scheduler{nullptr};
  std::atomic<StepEngine*> engine{nullptr};
};

// The handler over `api` (which must outlive the server).
HttpHandler serve_api_handler(ServeApi& api);

}  // namespace epic
