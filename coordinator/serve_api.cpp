// epic serve's routes (serve_api.h).
#include "coordinator/serve_api.h"

#include <string>
#include <vector>

namespace epic {
namespace {

std::string json_error(const ApiError& error) { return error.to_json().dump(); }

}  // namespace

HttpHandler serve_api_handler(ServeApi& api) {
  return [&api](const HttpRequest& request, std::shared_ptr<HttpExchange> exchange) {
    const std::string path = request.target.substr(0, request.target.find('?'));
    const bool completions = path == "/v1/completions", chat = path == "/v1/chat/completions";
    if (path == "/health") {
      StepEngine* engine = api.engine;
      if (api.ready && engine != nullptr && engine->ready())
        exchange->respond(200, "application/json", R"({"status":"ready"})");
      else
        exchange->respond(503, "application/json",
                          api.ready ? R"({"status":"restarting workers"})" : R"({"status":"loading"})",
                          {{"Retry-After", "5"}});
      return;
    }
    if (path == "/v1/models" && request.method == "GET") {
      exchange->respond(200, "application/json", models_response(api.limits.model_name, api.created).dump());
      return;
    }
    if (path == "/metrics" && request.method == "GET") {
      ServeScheduler* scheduler = api.scheduler;
      exchange->respond(200, "text/plain; version=0.0.4", scheduler != nullptr ? scheduler->metrics_text() : "");
      return;
    }
    if (!completions && !chat) {
      exchange->respond(404, "application/json",
                        json_error(ApiError(404, "", "not_found",
                                            "no route " + request.method + " " + path +
                                                "; epic serves /v1/completions, /v1/chat/completions, /v1/models, "
                                                "/health and /metrics")));
      return;
    }
    if (request.method != "POST") {
      exchange->respond(405, "application/json",
                        json_error(ApiError(405, "", "method_not_allowed", path + " takes POST")));
      return;
    }
    ServeScheduler* scheduler = api.scheduler;
    if (!api.ready || scheduler == nullptr) {
      exchange->respond(503, "application/json",
                        json_error(ApiError(503, "", "loading", "the model is still loading; retry shortly",
                                            "server_error")),
                        {{"Retry-After", "5"}});
      return;
    }
    try {
      CompletionRequest parsed = parse_completion_request(request.body, chat, api.limits);
      std::vector<int32_t> prompt = parsed.prompt_ids ? *parsed.prompt_ids : api.tokenizer->encode(parsed.prompt);
      const int64_t max_tokens = fit_to_context(parsed, static_cast<int64_t>(prompt.size()), api.limits);
      scheduler->submit(std::move(parsed), std::move(prompt), max_tokens, exchange);
    } catch (const ApiError& error) {
      exchange->respond(error.status(), "application/json", json_error(error));
    }
  };
}

}  // namespace epic
