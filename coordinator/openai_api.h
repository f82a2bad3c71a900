// The OpenAI-compatible request and response bodies of `epic serve` (issue 11): POST /v1/completions and
// POST /v1/chat/completions read into one CompletionRequest, every bad field refused with an ApiError that
// carries the HTTP status and OpenAI's error shape ({"error": {"message", "type", "param", "code"}}), and
// the JSON the server answers with (whole responses, server-sent-event chunks, /v1/models). No I/O here:
// the HTTP server and the scheduler call these.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "kernels/error.h"

namespace epic {

// A refused request: an epic::Error (kInvalidArgument) with what the client is told. status: 400 for a bad
// body or field, 404 for an unknown model, 413 for a body over the limit; type: "invalid_request_error"
// (OpenAI's); param: the offending field ("" when none); code: a machine-readable reason or "".
class ApiError : public Error {
 public:
  ApiError(int status, std::string param, std::string code, const std::string& message,
           std::string type = "invalid_request_error");
  int status() const { return status_; }
  const std::string& type() const { return type_; }
  const std::string& param() const { return param_; }
  const std::string& api_code() const { return code_; }
  nlohmann::json to_json() const;  // {"error": {...}}, param and code null when empty

 private:
  int status_;
  std::string type_, param_, code_;
};

struct ChatMessage {
  std::string role;  // system, user, assistant
  std::string content;
};

// What one request asks for, checked. A chat request's messages are also rendered into `prompt` (Qwen's
// chat format, render_qwen_chat); a completion request gives the prompt as text or as token ids.
struct CompletionRequest {
  bool chat = false;
  std::string model;
  std::string prompt;                              // text (chat: rendered); empty when prompt_ids is set
  std::optional<std::vector<int32_t>> prompt_ids;  // completions: "prompt": [ids...]
  std::vector<ChatMessage> messages;               // chat
  int64_t max_tokens = 0;                          // the limit's default when the request has none
  bool max_tokens_given = false;                   // the request named max_tokens (or max_completion_tokens)
  double temperature = 1.0;                        // 0: greedy
  double top_p = 1.0;
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;  // at most 4, none empty
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage: a last chunk with the usage counts
};

struct ApiLimits {
  std::string model_name;            // the one model served ("model" must name it)
  int64_t max_context = 4096;        // prompt + max_tokens positions
  int64_t default_max_tokens = 256;  // when the request gives none (capped to what the context leaves)
  int64_t max_tokens_limit = 4096;   // the most a request may ask for
  int64_t vocab_size = 0;            // prompt ids must be below it (0: unchecked)
};

// Parses and checks a request body (chat: /v1/chat/completions). Throws ApiError naming the field: not a
// JSON object, invalid UTF-8, a wrong type, an unknown model, a missing or empty prompt or message list,
// max_tokens (or max_completion_tokens) below 1 or over the limit, temperature outside [0, 2], top_p outside
// (0, 1], a seed that is not an integer, n other than 1, more than 4 stops or an empty one, stream_options
// without stream, and the options epic does not serve (best_of > 1, echo, logprobs, suffix, tools, a
// non-empty logit_bias). Fields it does not know are ignored, as OpenAI's server does for most.
CompletionRequest parse_completion_request(std::string_view body, bool chat, const ApiLimits& limits);

// After tokenising: the prompt must leave room for at least one new token in the context, and max_tokens
// shrinks to what is left when the request gave none; an explicit max_tokens past the context is an
// ApiError (400, context_length_exceeded), as is an empty prompt. Returns the max_tokens to run with.
int64_t fit_to_context(const CompletionRequest& request, int64_t prompt_tokens, const ApiLimits& limits);

// Qwen's chat format (ChatML): "<|im_start|>{role}\n{content}<|im_end|>\n" per message, then
// "<|im_start|>assistant\n" for the reply. No default system message is added.
std::string render_qwen_chat(const std::vector<ChatMessage>& messages);

// Why a sequence ended, as OpenAI spells it: "stop" (an end-of-sequence token or a stop string) or "length".
struct Usage {
  int64_t prompt_tokens = 0, completion_tokens = 0;
};
// A whole response: text_completion or chat.completion with one choice and the usage counts.
nlohmann::json completion_response(const CompletionRequest& request, const std::string& id, int64_t created,
                                   const std::string& text, const std::string& finish_reason,
                                   const Usage& usage);
// One streamed chunk: text_completion or chat.completion.chunk; finish_reason null until the last; a chat
// stream's first chunk carries the role. usage: the final usage-only chunk (choices empty).
nlohmann::json completion_chunk(const CompletionRequest& request, const std::string& id, int64_t created,
                                const std::string& text, const std::optional<std::string>& finish_reason,
                                bool first);
nlohmann::json usage_chunk(const CompletionRequest& request, const std::string& id, int64_t created,
                           const Usage& usage);
// A streamed request's token chunks, rendered without building JSON objects: the JSON around the text is
// the same for every chunk of a request, so it is rendered once and only the text is escaped per token (the
// hot path of a stream). Each event equals completion_chunk(request, id, created, text, nullopt, first) as
// JSON (the keys in another order).
class StreamChunkFormat {
 public:
  StreamChunkFormat(const CompletionRequest& request, const std::string& id, int64_t created);
  // "data: {...}\n\n" of one chunk carrying `text` (valid UTF-8), finish_reason null.
  std::string event(std::string_view text, bool first) const;

 private:
  std::string prefix_, first_prefix_, suffix_;
};
// `text` as the inside of a JSON string: quote, backslash and control characters escaped; other bytes as
// they are (the text is valid UTF-8).
void append_json_escaped(std::string& out, std::string_view text);

// "data: {json}\n\n"; the end of a stream is sse_done() = "data: [DONE]\n\n".
std::string sse_event(const nlohmann::json& data);
std::string sse_done();
// GET /v1/models: the one model.
nlohmann::json models_response(const std::string& model_name, int64_t created);

}  // namespace epic
