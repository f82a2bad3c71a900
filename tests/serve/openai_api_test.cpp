// The OpenAI-compatible request checks (coordinator/openai_api.h): what real clients send reads into the
// request (the openai npm client's completions and chat bodies, curl's), every bad field is a 4xx in
// OpenAI's error shape naming the field, the context check, Qwen's chat format, and the response bodies
// have the fields clients read (object, choices, delta, finish_reason, usage).
#include "coordinator/openai_api.h"

#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

namespace epic {
namespace {

using nlohmann::json;

ApiLimits limits() {
  ApiLimits limits;
  limits.model_name = "qwen3-moe-python-small";
  limits.max_context = 512;
  limits.default_max_tokens = 64;
  limits.max_tokens_limit = 256;
  limits.vocab_size = 1000;
  return limits;
}

// The status, param and words of the refusal of `body`.
void expect_refused(const std::string& body, bool chat, int status, const std::string& param,
                    const std::string& words) {
  SCOPED_TRACE(body);
  try {
    parse_completion_request(body, chat, limits());
    ADD_FAILURE() << "accepted";
  } catch (const ApiError& error) {
    EXPECT_EQ(error.status(), status);
    EXPECT_EQ(error.param(), param);
    EXPECT_NE(std::string(error.what()).find(words), std::string::npos) << error.what();
    const json shape = error.to_json();
    EXPECT_EQ(shape["error"]["message"], error.what());
    EXPECT_EQ(shape["error"]["type"], "invalid_request_error");
    EXPECT_EQ(shape["error"]["param"], param.empty() ? json(nullptr) : json(param));
  }
}

TEST(OpenAiApi, ReadsACompletionsBodyAsTheOpenAiClientSendsIt) {
  const CompletionRequest request = parse_completion_request(
      R"({"model":"qwen3-moe-python-small","prompt":"def main():","max_tokens":16,"temperature":0.7,)"
      R"("top_p":0.9,"seed":42,"stop":["\n\n","```"],"stream":true,"stream_options":{"include_usage":true},)"
      R"("n":1,"logprobs":null,"echo":false,"frequency_penalty":0,"user":"someone"})",
      false, limits());
  EXPECT_FALSE(request.chat);
  EXPECT_EQ(request.prompt, "def main():");
  EXPECT_FALSE(request.prompt_ids);
  EXPECT_EQ(request.max_tokens, 16);
  EXPECT_TRUE(request.max_tokens_given);
  EXPECT_DOUBLE_EQ(request.temperature, 0.7);
  EXPECT_DOUBLE_EQ(request.top_p, 0.9);
  EXPECT_EQ(request.seed, 42u);
  EXPECT_EQ(request.stop, (std::vector<std::string>{"\n\n", "```"}));
  EXPECT_TRUE(request.stream);
  EXPECT_TRUE(request.include_usage);
}

TEST(OpenAiApi, DefaultsAndPromptSpellings) {
  CompletionRequest request =
      parse_completion_request(R"({"model":"qwen3-moe-python-small","prompt":["x"]})", false, limits());
  EXPECT_EQ(request.prompt, "x");
  EXPECT_EQ(request.max_tokens, 64);
  EXPECT_FALSE(request.max_tokens_given);
  EXPECT_DOUBLE_EQ(request.temperature, 1.0);
  EXPECT_FALSE(request.seed);
  EXPECT_FALSE(request.stream);
  request = parse_completion_request(R"({"model":"qwen3-moe-python-small","prompt":[1,2,999],"stop":"END",)"
                                     R"("temperature":null,"seed":18446744073709551615})",
                                     false, limits());
  EXPECT_EQ(request.prompt_ids, (std::vector<int32_t>{1, 2, 999}));
  EXPECT_EQ(request.stop, std::vector<std::string>{"END"});
  EXPECT_EQ(request.seed, 18446744073709551615u);
  request = parse_completion_request(R"({"model":"qwen3-moe-python-small","prompt":[[5,6]],"seed":-3})",
                                     false, limits());
  EXPECT_EQ(request.prompt_ids, (std::vector<int32_t>{5, 6}));
  EXPECT_EQ(request.seed, static_cast<uint64_t>(int64_t{-3}));
}

TEST(OpenAiApi, ReadsAChatBodyAndRendersQwensFormat) {
  const CompletionRequest request = parse_completion_request(
      R"({"model":"qwen3-moe-python-small","messages":[{"role":"system","content":"Be brief."},)"
      R"({"role":"user","content":[{"type":"text","text":"Hello "},{"type":"text","text":"there"}]},)"
      R"({"role":"assistant","content":"Hi."},{"role":"developer","content":"Go on."}],)"
      R"("max_completion_tokens":8,"max_tokens":100})",
      true, limits());
  EXPECT_TRUE(request.chat);
  ASSERT_EQ(request.messages.size(), 4u);
  EXPECT_EQ(request.messages[1].content, "Hello there");
  EXPECT_EQ(request.messages[3].role, "system");
  EXPECT_EQ(request.max_tokens, 8);  // max_completion_tokens wins over the older name
  EXPECT_EQ(request.prompt,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
            "<|im_start|>assistant\nHi.<|im_end|>\n<|im_start|>system\nGo on.<|im_end|>\n"
            "<|im_start|>assistant\n");
}

TEST(OpenAiApi, EveryBadFieldIsRefusedByName) {
  const std::string m = R"("model":"qwen3-moe-python-small",)";
  expect_refused("{not json", false, 400, "", "not valid JSON");
  expect_refused("[1,2]", false, 400, "", "must be a JSON object");
  expect_refused(std::string("{") + m + "\"prompt\":\"\xff\xfe\"}", false, 400, "", "not valid UTF-8");
  expect_refused(R"({"prompt":"x"})", false, 400, "model", "'model' is required");
  expect_refused(R"({"model":"gpt-4","prompt":"x"})", false, 404, "model", "does not exist");
  expect_refused("{" + m + "\"prompt\":\"\"}", false, 400, "prompt", "empty");
  expect_refused("{" + m + "\"prompt\":[]}", false, 400, "prompt", "empty array");
  expect_refused("{" + m + "\"prompt\":[\"a\",\"b\"]}", false, 400, "prompt", "one prompt per request");
  expect_refused("{" + m + "\"prompt\":[1,1000]}", false, 400, "prompt", "outside the vocabulary");
  expect_refused("{" + m + "\"prompt\":[1,-1]}", false, 400, "prompt", "outside the vocabulary");
  expect_refused("{" + m + "\"prompt\":[1,2.5]}", false, 400, "prompt", "only integers");
  expect_refused("{" + m + "\"prompt\":7}", false, 400, "prompt", "must be a string");
  expect_refused(R"({"model":"qwen3-moe-python-small"})", false, 400, "prompt", "'prompt' is required");
  expect_refused("{" + m + "\"prompt\":\"x\",\"max_tokens\":0}", false, 400, "max_tokens", "give 1 to 256");
  expect_refused("{" + m + "\"prompt\":\"x\",\"max_tokens\":257}", false, 400, "max_tokens", "give 1 to 256");
  expect_refused("{" + m + "\"prompt\":\"x\",\"max_tokens\":\"5\"}", false, 400, "max_tokens", "an integer");
  expect_refused("{" + m + "\"prompt\":\"x\",\"max_tokens\":5.5}", false, 400, "max_tokens", "an integer");
  expect_refused("{" + m + "\"prompt\":\"x\",\"temperature\":2.5}", false, 400, "temperature",
                 "0 (greedy) to 2");
  expect_refused("{" + m + "\"prompt\":\"x\",\"temperature\":-0.1}", false, 400, "temperature", "to 2");
  expect_refused("{" + m + "\"prompt\":\"x\",\"temperature\":\"hot\"}", false, 400, "temperature",
                 "a number");
  expect_refused("{" + m + "\"prompt\":\"x\",\"top_p\":0}", false, 400, "top_p", "above 0");
  expect_refused("{" + m + "\"prompt\":\"x\",\"top_p\":1.5}", false, 400, "top_p", "at most 1");
  expect_refused("{" + m + "\"prompt\":\"x\",\"seed\":1.5}", false, 400, "seed", "an integer");
  expect_refused("{" + m + "\"prompt\":\"x\",\"n\":2}", false, 400, "n", "n = 1");
  expect_refused("{" + m + "\"prompt\":\"x\",\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}", false, 400, "stop",
                 "at most 4");
  expect_refused("{" + m + "\"prompt\":\"x\",\"stop\":\"\"}", false, 400, "stop", "empty string");
  expect_refused("{" + m + "\"prompt\":\"x\",\"stop\":[1]}", false, 400, "stop", "only strings");
  expect_refused("{" + m + "\"prompt\":\"x\",\"stream\":\"yes\"}", false, 400, "stream", "a boolean");
  expect_refused("{" + m + "\"prompt\":\"x\",\"stream_options\":{\"include_usage\":true}}", false, 400,
                 "stream_options", "only allowed when 'stream' is true");
  expect_refused("{" + m + "\"prompt\":\"x\",\"best_of\":3}", false, 400, "best_of", "not served");
  expect_refused("{" + m + "\"prompt\":\"x\",\"echo\":true}", false, 400, "echo", "not served");
  expect_refused("{" + m + "\"prompt\":\"x\",\"logprobs\":5}", false, 400, "logprobs", "not served");
  expect_refused("{" + m + "\"prompt\":\"x\",\"suffix\":\"end\"}", false, 400, "suffix", "not served");
  expect_refused("{" + m + "\"prompt\":\"x\",\"logit_bias\":{\"5\":10}}", false, 400, "logit_bias",
                 "not served");
  // Chat.
  expect_refused(R"({"model":"qwen3-moe-python-small"})", true, 400, "messages", "'messages' is required");
  expect_refused("{" + m + "\"messages\":[]}", true, 400, "messages", "empty");
  expect_refused("{" + m + "\"messages\":{}}", true, 400, "messages", "must be an array");
  expect_refused("{" + m + "\"messages\":[\"hi\"]}", true, 400, "messages[0]", "must be an object");
  expect_refused("{" + m + "\"messages\":[{\"role\":\"tool\",\"content\":\"x\"}]}", true, 400,
                 "messages[0].role", "not served");
  expect_refused("{" + m + "\"messages\":[{\"role\":\"user\"}]}", true, 400, "messages[0].content",
                 "must be a string");
  expect_refused("{" + m + "\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\"}]}]}", true,
                 400, "messages[0].content", "images");
  expect_refused("{" + m + "\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tools\":[{}]}", true, 400,
                 "tools", "text only");
  expect_refused(
      "{" + m + "\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"max_completion_tokens\":0}", true,
      400, "max_completion_tokens", "give 1 to 256");
  expect_refused("{" + m +
                     "\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                     "\"response_format\":{\"type\":\"json_object\"}}",
                 true, 400, "response_format", "only");
}

TEST(OpenAiApi, FitsTheContext) {
  CompletionRequest request =
      parse_completion_request(R"({"model":"qwen3-moe-python-small","prompt":"x"})", false, limits());
  EXPECT_EQ(fit_to_context(request, 10, limits()), 64);   // the default
  EXPECT_EQ(fit_to_context(request, 500, limits()), 12);  // what the context leaves
  try {
    fit_to_context(request, 512, limits());
    ADD_FAILURE() << "a prompt that fills the context was accepted";
  } catch (const ApiError& error) {
    EXPECT_EQ(error.status(), 400);
    EXPECT_EQ(error.api_code(), "context_length_exceeded");
  }
  request = parse_completion_request(R"({"model":"qwen3-moe-python-small","prompt":"x","max_tokens":100})",
                                     false, limits());
  EXPECT_EQ(fit_to_context(request, 412, limits()), 100);
  EXPECT_THROW(fit_to_context(request, 413, limits()), ApiError);
  EXPECT_THROW(fit_to_context(request, 0, limits()), ApiError);
}

TEST(OpenAiApi, ResponseBodiesHaveTheFieldsClientsRead) {
  const CompletionRequest text =
      parse_completion_request(R"({"model":"qwen3-moe-python-small","prompt":"x"})", false, limits());
  const CompletionRequest chat = parse_completion_request(
      R"({"model":"qwen3-moe-python-small","messages":[{"role":"user","content":"x"}]})", true, limits());
  const Usage usage{3, 4};
  json body = completion_response(text, "cmpl-1", 1700000000, "hello", "length", usage);
  EXPECT_EQ(body["object"], "text_completion");
  EXPECT_EQ(body["choices"][0]["text"], "hello");
  EXPECT_EQ(body["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(body["usage"]["total_tokens"], 7);
  body = completion_response(chat, "chatcmpl-1", 1700000000, "hi", "stop", usage);
  EXPECT_EQ(body["object"], "chat.completion");
  EXPECT_EQ(body["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(body["choices"][0]["message"]["content"], "hi");
  json chunk = completion_chunk(chat, "chatcmpl-1", 1, "he", std::nullopt, true);
  EXPECT_EQ(chunk["object"], "chat.completion.chunk");
  EXPECT_EQ(chunk["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(chunk["choices"][0]["delta"]["content"], "he");
  EXPECT_TRUE(chunk["choices"][0]["finish_reason"].is_null());
  chunk = completion_chunk(chat, "chatcmpl-1", 1, "", std::string("stop"), false);
  EXPECT_FALSE(chunk["choices"][0]["delta"].contains("role"));
  EXPECT_EQ(chunk["choices"][0]["finish_reason"], "stop");
  chunk = completion_chunk(text, "cmpl-1", 1, "lo", std::nullopt, false);
  EXPECT_EQ(chunk["choices"][0]["text"], "lo");
  EXPECT_TRUE(usage_chunk(chat, "c", 1, usage)["choices"].empty());
  EXPECT_EQ(sse_event(json{{"a", 1}}), "data: {\"a\":1}\n\n");
  EXPECT_EQ(sse_done(), "data: [DONE]\n\n");
  EXPECT_EQ(models_response("m", 5)["data"][0]["id"], "m");
}

// The pre-rendered stream chunks (the hot path of a stream) are the chunks completion_chunk builds, as
// JSON, for texts of every kind of character: quotes, backslashes, control bytes, multi-byte UTF-8.
TEST(OpenAiApi, PreRenderedStreamChunksEqualTheBuiltOnes) {
  std::mt19937_64 rng(std::random_device{}());
  const std::vector<std::string> pieces = {"a", "\"", "\\", "\n", "\t", std::string(1, '\x01'), "\x1f", "\xc3\xa9",
                                           "\xe2\x82\xac", "\xf0\x9f\x98\x80", " ", "</script>", "{}", "\u007f"};
  for (const bool chat : {false, true}) {
    CompletionRequest request;
    request.chat = chat;
    request.model = "model \"quoted\" \xc3\xa9";
    const StreamChunkFormat format(request, "cmpl-\"7", 1795829890);
    for (int round = 0; round < 200; ++round) {
      std::string text;
      for (int p = static_cast<int>(rng() % 6) + 1; p > 0; --p) text += pieces[rng() % pieces.size()];
      const bool first = rng() % 2 == 0;
      const std::string event = format.event(text, first);
      ASSERT_EQ(event.rfind("data: ", 0), 0u);
      ASSERT_EQ(event.substr(event.size() - 2), "\n\n");
      const nlohmann::json parsed = nlohmann::json::parse(event.substr(6, event.size() - 8));
      EXPECT_EQ(parsed, completion_chunk(request, "cmpl-\"7", 1795829890, text, std::nullopt, first))
          << "text " << nlohmann::json(text).dump() << (chat ? " chat" : " completion") << (first ? " first" : "");
    }
  }
}

}  // namespace
}  // namespace epic
