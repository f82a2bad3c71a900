// Fuzzes parse_completion_request (epic serve's POST /v1/completions and /v1/chat/completions bodies): the
// first byte picks the endpoint, the rest is the body. A refusal must be an ApiError whose OpenAI-shaped JSON
// prints; an accepted request must keep every documented bound, and the responses built from it must print
// (valid UTF-8 throughout).
#include <cstdint>
#include <nlohmann/json.hpp>

#include "coordinator/openai_api.h"
#include "tests/fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const bool chat = (data[0] & 1) != 0;
  const std::string body = epic::fuzz::as_text(data + 1, size - 1);
  epic::ApiLimits limits;
  limits.model_name = "m";
  limits.max_context = 512;
  limits.default_max_tokens = 16;
  limits.max_tokens_limit = 256;
  limits.vocab_size = 1000;
  try {
    const epic::CompletionRequest request = epic::parse_completion_request(body, chat, limits);
    EPIC_FUZZ_REQUIRE(request.chat == chat, "the endpoint changed");
    EPIC_FUZZ_REQUIRE(request.model == "m", "an unknown model was accepted");
    EPIC_FUZZ_REQUIRE(request.max_tokens >= 1 && request.max_tokens <= 256, "max_tokens out of bounds");
    EPIC_FUZZ_REQUIRE(request.temperature >= 0 && request.temperature <= 2, "temperature out of bounds");
    EPIC_FUZZ_REQUIRE(request.top_p > 0 && request.top_p <= 1, "top_p out of bounds");
    EPIC_FUZZ_REQUIRE(request.stop.size() <= 4, "more than 4 stops");
    for (const std::string& stop : request.stop) EPIC_FUZZ_REQUIRE(!stop.empty(), "an empty stop");
    EPIC_FUZZ_REQUIRE(!request.include_usage || request.stream, "include_usage without stream");
    if (request.prompt_ids) {
      EPIC_FUZZ_REQUIRE(!request.prompt_ids->empty(), "empty prompt ids");
      for (int32_t id : *request.prompt_ids)
        EPIC_FUZZ_REQUIRE(id >= 0 && id < 1000, "an id outside the vocab");
    } else {
      EPIC_FUZZ_REQUIRE(!request.prompt.empty(), "an empty prompt");
    }
    if (chat) EPIC_FUZZ_REQUIRE(!request.messages.empty(), "a chat without messages");
    // Everything accepted prints back out (a string that is not UTF-8 would throw here).
    epic::completion_response(request, "id", 0, request.prompt, "stop", {1, 2}).dump();
    epic::completion_chunk(request, "id", 0, request.prompt, std::nullopt, true).dump();
    try {
      epic::fit_to_context(request, static_cast<int64_t>(request.prompt.size()) % 600, limits);
    } catch (const epic::ApiError& error) {
      error.to_json().dump();
    }
  } catch (const epic::ApiError& error) {
    EPIC_FUZZ_REQUIRE(error.status() == 400 || error.status() == 404, "a refusal that is not 400 or 404");
    error.to_json().dump();
  }
  return 0;
}
