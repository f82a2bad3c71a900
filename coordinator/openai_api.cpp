// OpenAI-compatible request checks and response bodies (openai_api.h).
#include "coordinator/openai_api.h"

#include <cmath>
#include <limits>
#include <utility>

namespace epic {
namespace {

using nlohmann::json;

[[noreturn]] void refuse(const std::string& param, const std::string& message, const std::string& code = "") {
  throw ApiError(400, param, code, message);
}

const char* type_name(const json& value) {
  switch (value.type()) {
    case json::value_t::null:
      return "null";
    case json::value_t::boolean:
      return "a boolean";
    case json::value_t::string:
      return "a string";
    case json::value_t::array:
      return "an array";
    case json::value_t::object:
      return "an object";
    case json::value_t::number_float:
      return "a fractional number";
    default:
      return "an integer";
  }
}

// Whether the bytes are UTF-8 (no overlong forms, no surrogates, nothing past U+10FFFF).
bool valid_utf8(std::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    const auto byte = static_cast<unsigned char>(text[i]);
    int length = 0;
    uint32_t code = 0;
    if (byte < 0x80) {
      ++i;
      continue;
    } else if ((byte & 0xE0) == 0xC0) {
      length = 2;
      code = byte & 0x1F;
    } else if ((byte & 0xF0) == 0xE0) {
      length = 3;
      code = byte & 0x0F;
    } else if ((byte & 0xF8) == 0xF0) {
      length = 4;
      code = byte & 0x07;
    } else {
      return false;
    }
    if (i + length > text.size()) return false;
    for (int k = 1; k < length; ++k) {
      const auto next = static_cast<unsigned char>(text[i + k]);
      if ((next & 0xC0) != 0x80) return false;
      code = (code << 6) | (next & 0x3F);
    }
    const uint32_t smallest[] = {0, 0, 0x80, 0x800, 0x10000};
    if (code < smallest[length] || code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF)) return false;
    i += length;
  }
  return true;
}

// The field, or null when absent (OpenAI treats an explicit null as absent).
const json& field(const json& body, const char* name) {
  static const json null_value;
  const auto found = body.find(name);
  return found == body.end() ? null_value : *found;
}

int64_t integer_field(const json& value, const std::string& name) {
  if (value.is_number_unsigned() && value.get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max()))
    refuse(name, "'" + name + "' is too large");
  if (!value.is_number_integer()) refuse(name, "'" + name + "' must be an integer, not " + type_name(value));
  return value.get<int64_t>();
}

double number_field(const json& value, const std::string& name) {
  if (!value.is_number()) refuse(name, "'" + name + "' must be a number, not " + type_name(value));
  const double number = value.get<double>();
  if (!std::isfinite(number)) refuse(name, "'" + name + "' must be finite");
  return number;
}

bool bool_field(const json& value, const std::string& name) {
  if (!value.is_boolean()) refuse(name, "'" + name + "' must be a boolean, not " + type_name(value));
  return value.get<bool>();
}

std::vector<int32_t> token_ids(const json& array, const ApiLimits& limits) {
  std::vector<int32_t> ids;
  for (const json& id : array) {
    if (!id.is_number_integer()) refuse("prompt", "a prompt of token ids holds only integers");
    const int64_t value = id.is_number_unsigned() && id.get<uint64_t>() > uint64_t(INT32_MAX)
                              ? int64_t{INT32_MAX} + 1
                              : id.get<int64_t>();
    if (value < 0 || value > INT32_MAX || (limits.vocab_size > 0 && value >= limits.vocab_size))
      refuse("prompt", "token id " + id.dump() + " is outside the vocabulary (0.." +
                           std::to_string(limits.vocab_size > 0 ? limits.vocab_size - 1 : INT32_MAX) + ")");
    ids.push_back(static_cast<int32_t>(value));
  }
  return ids;
}

void read_prompt(const json& prompt, const ApiLimits& limits, CompletionRequest& request) {
  if (prompt.is_null()) refuse("prompt", "'prompt' is required");
  if (prompt.is_string()) {
    request.prompt = prompt.get<std::string>();
  } else if (prompt.is_array()) {
    if (prompt.empty()) refuse("prompt", "'prompt' is an empty array; give the prompt text or its token ids");
    if (prompt[0].is_string()) {
      if (prompt.size() != 1)
        refuse("prompt", "epic serves one prompt per request; send the " + std::to_string(prompt.size()) +
                             " prompts as separate requests");
      request.prompt = prompt[0].get<std::string>();
    } else if (prompt[0].is_array()) {
      if (prompt.size() != 1)
        refuse("prompt", "epic serves one prompt per request; send the " + std::to_string(prompt.size()) +
                             " token-id prompts as separate requests");
      request.prompt_ids = token_ids(prompt[0], limits);
    } else {
      request.prompt_ids = token_ids(prompt, limits);
    }
  } else {
    refuse("prompt",
           std::string("'prompt' must be a string or an array of token ids, not ") + type_name(prompt));
  }
  if ((request.prompt_ids && request.prompt_ids->empty()) || (!request.prompt_ids && request.prompt.empty()))
    refuse("prompt", "the prompt is empty; give at least one token of text");
}

void read_messages(const json& messages, CompletionRequest& request) {
  if (messages.is_null()) refuse("messages", "'messages' is required");
  if (!messages.is_array())
    refuse("messages", std::string("'messages' must be an array, not ") + type_name(messages));
  if (messages.empty()) refuse("messages", "'messages' is empty; give at least one message");
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string where = "messages[" + std::to_string(i) + "]";
    const json& message = messages[i];
    if (!message.is_object()) refuse(where, where + " must be an object with a role and content");
    const json& role = field(message, "role");
    if (!role.is_string()) refuse(where + ".role", where + ".role must be a string");
    std::string role_name = role.get<std::string>();
    if (role_name == "developer") role_name = "system";  // OpenAI's newer name for the system role
    if (role_name != "system" && role_name != "user" && role_name != "assistant")
      refuse(where + ".role", where + ".role '" + role.get<std::string>() +
                                  "' is not served; use system, user or assistant (tool messages are not)");
    const json& content = field(message, "content");
    std::string text;
    if (content.is_string()) {
      text = content.get<std::string>();
    } else if (content.is_array()) {
      for (const json& part : content) {
        if (!part.is_object() || field(part, "type") != "text" || !field(part, "text").is_string())
          refuse(where + ".content", where +
                                         ".content parts must be {\"type\": \"text\", \"text\": ...}; "
                                         "images and audio are not served");
        text += field(part, "text").get<std::string>();
      }
    } else {
      refuse(where + ".content",
             where + ".content must be a string or an array of text parts, not " + type_name(content));
    }
    request.messages.push_back({role_name, text});
  }
  request.prompt = render_qwen_chat(request.messages);
}

}  // namespace

ApiError::ApiError(int status, std::string param, std::string code, const std::string& message,
                   std::string type)
    : Error(ErrorCode::kInvalidArgument, message),
      status_(status),
      type_(std::move(type)),
      param_(std::move(param)),
      code_(std::move(code)) {}

json ApiError::to_json() const {
  return {{"error",
           {{"message", what()},
            {"type", type_},
            {"param", param_.empty() ? json(nullptr) : json(param_)},
            {"code", code_.empty() ? json(nullptr) : json(code_)}}}};
}

CompletionRequest parse_completion_request(std::string_view body, bool chat, const ApiLimits& limits) {
  if (!valid_utf8(body)) refuse("", "the request body is not valid UTF-8");
  const json parsed = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded())
    refuse("", "the request body is not valid JSON; send a JSON object (Content-Type: application/json)");
  if (!parsed.is_object())
    refuse("", std::string("the request body must be a JSON object, not ") + type_name(parsed));
  CompletionRequest request;
  request.chat = chat;

  const json& model = field(parsed, "model");
  if (!model.is_string())
    refuse("model", "'model' is required and must be a string (GET /v1/models lists it)");
  request.model = model.get<std::string>();
  if (request.model != limits.model_name)
    throw ApiError(
        404, "model", "model_not_found",
        "The model '" + request.model + "' does not exist; this server serves '" + limits.model_name + "'");

  if (chat) {
    read_messages(field(parsed, "messages"), request);
  } else {
    read_prompt(field(parsed, "prompt"), limits, request);
  }

  // Chat's newer name first; both spellings mean the same.
  const char* max_name =
      chat && !field(parsed, "max_completion_tokens").is_null() ? "max_completion_tokens" : "max_tokens";
  const json& max_tokens = field(parsed, max_name);
  if (max_tokens.is_null()) {
    request.max_tokens = std::min(limits.default_max_tokens, limits.max_tokens_limit);
  } else {
    request.max_tokens = integer_field(max_tokens, max_name);
    request.max_tokens_given = true;
    if (request.max_tokens < 1 || request.max_tokens > limits.max_tokens_limit)
      refuse(max_name, std::string("'") + max_name + "' is " + std::to_string(request.max_tokens) +
                           "; give 1 to " + std::to_string(limits.max_tokens_limit));
  }
  if (const json& value = field(parsed, "temperature"); !value.is_null()) {
    request.temperature = number_field(value, "temperature");
    if (request.temperature < 0 || request.temperature > 2)
      refuse("temperature", "'temperature' is " + value.dump() + "; give 0 (greedy) to 2");
  }
  if (const json& value = field(parsed, "top_p"); !value.is_null()) {
    request.top_p = number_field(value, "top_p");
    if (!(request.top_p > 0) || request.top_p > 1)
      refuse("top_p", "'top_p' is " + value.dump() + "; give a number above 0 and at most 1");
  }
  if (const json& value = field(parsed, "seed"); !value.is_null()) {
    if (value.is_number_unsigned()) {
      request.seed = value.get<uint64_t>();
    } else {
      request.seed = static_cast<uint64_t>(integer_field(value, "seed"));
    }
  }
  if (const json& value = field(parsed, "n"); !value.is_null() && integer_field(value, "n") != 1)
    refuse("n", "'n' is " + value.dump() + "; epic serves one choice per request (n = 1)");
  if (const json& value = field(parsed, "stop"); value.is_string()) {
    request.stop = {value.get<std::string>()};
  } else if (value.is_array()) {
    for (const json& stop : value) {
      if (!stop.is_string()) refuse("stop", "'stop' holds only strings");
      request.stop.push_back(stop.get<std::string>());
    }
  } else if (!value.is_null()) {
    refuse("stop", std::string("'stop' must be a string or an array of strings, not ") + type_name(value));
  }
  if (request.stop.size() > 4)
    refuse("stop", "'stop' has " + std::to_string(request.stop.size()) + " strings; give at most 4");
  for (const std::string& stop : request.stop)
    if (stop.empty())
      refuse("stop", "'stop' holds an empty string, which would end every completion at once");
  if (const json& value = field(parsed, "stream"); !value.is_null())
    request.stream = bool_field(value, "stream");
  if (const json& options = field(parsed, "stream_options"); !options.is_null()) {
    if (!request.stream) refuse("stream_options", "'stream_options' is only allowed when 'stream' is true");
    if (!options.is_object()) refuse("stream_options", "'stream_options' must be an object");
    if (const json& usage = field(options, "include_usage"); !usage.is_null())
      request.include_usage = bool_field(usage, "stream_options.include_usage");
  }

  // What epic does not serve: refused by name rather than ignored, so a client never gets less than it asked.
  if (const json& value = field(parsed, "best_of"); !value.is_null() && integer_field(value, "best_of") != 1)
    refuse("best_of", "'best_of' above 1 is not served");
  if (const json& value = field(parsed, "echo"); !value.is_null() && bool_field(value, "echo"))
    refuse("echo", "'echo' is not served");
  if (const json& value = field(parsed, "logprobs");
      !value.is_null() && !(value.is_boolean() && !value.get<bool>()))
    refuse("logprobs", "'logprobs' is not served");
  if (const json& value = field(parsed, "top_logprobs"); !value.is_null())
    refuse("top_logprobs", "'top_logprobs' is not served");
  if (const json& value = field(parsed, "suffix");
      !value.is_null() && !(value.is_string() && value.get<std::string>().empty()))
    refuse("suffix", "'suffix' is not served");
  for (const char* name : {"tools", "functions"})
    if (const json& value = field(parsed, name); !value.is_null() && !(value.is_array() && value.empty()))
      refuse(name, std::string("'") + name + "' is not served: epic generates text only");
  if (const json& value = field(parsed, "logit_bias");
      !value.is_null() && !(value.is_object() && value.empty()))
    refuse("logit_bias", "'logit_bias' is not served");
  if (const json& value = field(parsed, "response_format"); !value.is_null()) {
    if (!value.is_object() || field(value, "type") != "text")
      refuse("response_format", "only {\"type\": \"text\"} is served as 'response_format'");
  }
  return request;
}

int64_t fit_to_context(const CompletionRequest& request, int64_t prompt_tokens, const ApiLimits& limits) {
  if (prompt_tokens < 1) refuse(request.chat ? "messages" : "prompt", "the prompt is empty after tokenising");
  const int64_t room = limits.max_context - prompt_tokens;
  if (room < 1)
    refuse(request.chat ? "messages" : "prompt",
           "the prompt is " + std::to_string(prompt_tokens) + " tokens; this server's context is " +
               std::to_string(limits.max_context) + " tokens, which leaves no room for a reply",
           "context_length_exceeded");
  if (!request.max_tokens_given) return std::min(request.max_tokens, room);
  if (request.max_tokens > room)
    refuse(request.chat ? "max_completion_tokens" : "max_tokens",
           "the prompt (" + std::to_string(prompt_tokens) + " tokens) and max_tokens (" +
               std::to_string(request.max_tokens) + ") exceed this server's context of " +
               std::to_string(limits.max_context) + " tokens; ask for at most " + std::to_string(room),
           "context_length_exceeded");
  return request.max_tokens;
}

std::string render_qwen_chat(const std::vector<ChatMessage>& messages) {
  std::string text;
  for (const ChatMessage& message : messages)
    text += "<|im_start|>" + message.role + "\n" + message.content + "<|im_end|>\n";
  return text + "<|im_start|>assistant\n";
}

namespace {

json usage_json(const Usage& usage) {
  return {{"prompt_tokens", usage.prompt_tokens},
          {"completion_tokens", usage.completion_tokens},
          {"total_tokens", usage.prompt_tokens + usage.completion_tokens}};
}

}  // namespace

json completion_response(const CompletionRequest& request, const std::string& id, int64_t created,
                         const std::string& text, const std::string& finish_reason, const Usage& usage) {
  json choice = {{"index", 0}, {"logprobs", nullptr}, {"finish_reason", finish_reason}};
  if (request.chat) {
    choice["message"] = {{"role", "assistant"}, {"content", text}};
  } else {
    choice["text"] = text;
  }
  return {{"id", id},
          {"object", request.chat ? "chat.completion" : "text_completion"},
          {"created", created},
          {"model", request.model},
          {"choices", json::array({choice})},
          {"usage", usage_json(usage)}};
}

json completion_chunk(const CompletionRequest& request, const std::string& id, int64_t created,
                      const std::string& text, const std::optional<std::string>& finish_reason, bool first) {
  json choice = {{"index", 0},
                 {"logprobs", nullptr},
                 {"finish_reason", finish_reason ? json(*finish_reason) : json(nullptr)}};
  if (request.chat) {
    json delta = json::object();
    if (first) delta["role"] = "assistant";
    if (!text.empty() || !finish_reason) delta["content"] = text;
    choice["delta"] = delta;
  } else {
    choice["text"] = text;
  }
  return {{"id", id},
          {"object", request.chat ? "chat.completion.chunk" : "text_completion"},
          {"created", created},
          {"model", request.model},
          {"choices", json::array({choice})}};
}

json usage_chunk(const CompletionRequest& request, const std::string& id, int64_t created,
                 const Usage& usage) {
  return {{"id", id},
          {"object", request.chat ? "chat.completion.chunk" : "text_completion"},
          {"created", created},
          {"model", request.model},
          {"choices", json::array()},
          {"usage", usage_json(usage)}};
}

void append_json_escaped(std::string& out, std::string_view text) {
  static constexpr char kHex[] = "0123456789abcdef";
  for (const char c : text) {
    const auto byte = static_cast<unsigned char>(c);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (byte < 0x20) {
          out += "\\u00";
          out += kHex[byte >> 4];
          out += kHex[byte & 15];
        } else {
          out += c;
        }
    }
  }
}

StreamChunkFormat::StreamChunkFormat(const CompletionRequest& request, const std::string& id, int64_t created) {
  const std::string head = "data: {\"id\":" + json(id).dump() + ",\"object\":\"" +
                           (request.chat ? "chat.completion.chunk" : "text_completion") +
                           "\",\"created\":" + std::to_string(created) + ",\"model\":" + json(request.model).dump() +
                           ",\"choices\":[{\"index\":0,\"logprobs\":null,\"finish_reason\":null,";
  if (request.chat) {
    prefix_ = head + "\"delta\":{\"content\":\"";
    first_prefix_ = head + "\"delta\":{\"role\":\"assistant\",\"content\":\"";
    suffix_ = "\"}}]}\n\n";
  } else {
    prefix_ = first_prefix_ = head + "\"text\":\"";
    suffix_ = "\"}]}\n\n";
  }
}

std::string StreamChunkFormat::event(std::string_view text, bool first) const {
  const std::string& prefix = first ? first_prefix_ : prefix_;
  std::string out;
  out.reserve(prefix.size() + text.size() + 8 + suffix_.size());
  out += prefix;
  append_json_escaped(out, text);
  out += suffix_;
  return out;
}

std::string sse_event(const json& data) { return "data: " + data.dump() + "\n\n"; }
std::string sse_done() { return "data: [DONE]\n\n"; }

json models_response(const std::string& model_name, int64_t created) {
  return {
      {"object", "list"},
      {"data",
       json::array({{{"id", model_name}, {"object", "model"}, {"created", created}, {"owned_by", "epic"}}})}};
}

}  // namespace epic
