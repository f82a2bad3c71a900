// config.json validation: each bad input gets an Error whose message names the field and the fix.
#include "worker/model_config.h"

#include <gtest/gtest.h>

#include "kernels/error.h"

namespace epic {
namespace {

const char* kValid = R"({
  "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 32, "num_hidden_layers": 4,
  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 160,
  "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 24, "intermediate_size": 48,
  "mlp_only_layers": [1], "decoder_sparse_step": 1, "norm_topk_prob": true, "rms_norm_eps": 1e-6,
  "rope_theta": 10000.0, "tie_word_embeddings": false})";

std::string with(const std::string& key, const std::string& value) {
  std::string text = kValid;
  const std::string needle = "\"" + key + "\": ";
  const size_t at = text.find(needle);
  if (at == std::string::npos) return text.substr(0, text.size() - 1) + ", " + needle + value + "}";
  const size_t end = text.find_first_of(",}", at + needle.size());
  size_t bracket = text.find('[', at);
  size_t value_end = (bracket != std::string::npos && bracket < end) ? text.find(']', bracket) + 1 : end;
  return text.substr(0, at + needle.size()) + value + text.substr(value_end);
}

void expect_error(const std::string& text, ErrorCode code, const std::vector<std::string>& words) {
  try {
    ModelConfig::from_json_text(text, "model/config.json");
    FAIL() << "accepted: " << text;
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    EXPECT_NE(std::string(e.what()).find("model/config.json"), std::string::npos) << e.what();
    for (const std::string& word : words)
      EXPECT_NE(std::string(e.what()).find(word), std::string::npos) << e.what();
  }
}

TEST(ModelConfig, ParsesEveryHonouredField) {
  const ModelConfig c = ModelConfig::from_json_text(kValid, "config.json");
  EXPECT_EQ(c.architecture, Architecture::kQwen3Moe);
  EXPECT_EQ(c.hidden_size, 32);
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.num_experts_per_tok, 2);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_FALSE(c.is_moe_layer(1));
  EXPECT_TRUE(c.is_moe_layer(0));
  EXPECT_EQ(c.tensor_prefix, "model.");
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
}

TEST(ModelConfig, DecoderSparseStepFollowsTransformers) {
  const ModelConfig c = ModelConfig::from_json_text(with("decoder_sparse_step", "2"), "config.json");
  // transformers: MoE when (layer + 1) % step == 0 and not in mlp_only_layers.
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_FALSE(c.is_moe_layer(1));  // in mlp_only_layers
  EXPECT_FALSE(c.is_moe_layer(2));
  EXPECT_TRUE(c.is_moe_layer(3));
}

TEST(ModelConfig, OmniThinkerLayoutAndRopeParameters) {
  // The Omni thinker nests its text config and names rope theta in rope_parameters.
  std::string inner = kValid;
  inner.replace(inner.find("\"rope_theta\": 10000.0,"), 22, "");
  inner =
      inner.substr(0, inner.size() - 1) +
      R"(, "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0, "mrope_section": [2, 3, 3]}})";
  const ModelConfig c = ModelConfig::from_json_text(
      R"({"architectures": ["Qwen3OmniMoeForConditionalGeneration"], "thinker_config": {"text_config": )" +
          inner + "}}",
      "config.json");
  EXPECT_EQ(c.architecture, Architecture::kQwen3OmniThinker);
  EXPECT_EQ(c.tensor_prefix, "thinker.model.");
  EXPECT_EQ(c.lm_head_name, "thinker.lm_head.weight");
  EXPECT_DOUBLE_EQ(c.rope_theta, 5000.0);
}

TEST(ModelConfig, RoundTripsThroughToJson) {
  const ModelConfig c = ModelConfig::from_json_text(kValid, "config.json");
  const ModelConfig again = ModelConfig::from_json_text(c.to_json_text(), "again.json");
  EXPECT_EQ(again.hidden_size, c.hidden_size);
  EXPECT_EQ(again.mlp_only_layers, c.mlp_only_layers);
  EXPECT_EQ(again.norm_topk_prob, c.norm_topk_prob);
  EXPECT_DOUBLE_EQ(again.rope_theta, c.rope_theta);
}

TEST(ModelConfig, RejectsNaNAndInfinityNamingTheField) {
  expect_error(with("rms_norm_eps", "NaN"), ErrorCode::kInvalidConfig, {"rms_norm_eps", "NaN", "finite"});
  expect_error(with("rope_theta", "Infinity"), ErrorCode::kInvalidConfig, {"rope_theta", "Infinity"});
  expect_error(with("rope_theta", "-Infinity"), ErrorCode::kInvalidConfig, {"rope_theta"});
  expect_error(with("rope_theta", "1e999"), ErrorCode::kInvalidConfig, {"rope_theta", "finite"});
}

TEST(ModelConfig, RejectsUnknownArchitecture) {
  expect_error(with("architectures", R"(["LlamaForCausalLM"])"), ErrorCode::kInvalidConfig,
               {"LlamaForCausalLM", "Qwen3MoeForCausalLM"});
}

TEST(ModelConfig, RejectsMissingAndMistypedFields) {
  std::string text = kValid;
  text.replace(text.find("\"hidden_size\": 32,"), 18, "");
  expect_error(text, ErrorCode::kInvalidConfig, {"hidden_size", "missing"});
  expect_error(with("num_hidden_layers", "\"four\""), ErrorCode::kInvalidConfig,
               {"num_hidden_layers", "integer"});
  expect_error(with("num_attention_heads", "0"), ErrorCode::kInvalidConfig, {"num_attention_heads", "> 0"});
  expect_error(with("norm_topk_prob", "1"), ErrorCode::kInvalidConfig, {"norm_topk_prob", "true or false"});
  expect_error("{not json", ErrorCode::kInvalidConfig, {"not valid JSON"});
}

TEST(ModelConfig, RejectsInconsistentShapes) {
  expect_error(with("num_key_value_heads", "3"), ErrorCode::kInvalidConfig,
               {"num_key_value_heads", "multiple"});
  expect_error(with("num_experts_per_tok", "9"), ErrorCode::kInvalidConfig,
               {"num_experts_per_tok", "exceeds"});
  expect_error(with("mlp_only_layers", "[7]"), ErrorCode::kInvalidConfig, {"mlp_only_layers", "7"});
  expect_error(with("head_dim", "15"), ErrorCode::kInvalidConfig, {"head_dim", "even"});
}

TEST(ModelConfig, RejectsUnsupportedFeatures) {
  expect_error(with("rope_scaling", R"({"rope_type": "yarn", "factor": 4.0})"), ErrorCode::kUnsupported,
               {"yarn"});
  expect_error(with("use_sliding_window", "true"), ErrorCode::kUnsupported, {"use_sliding_window"});
}

}  // namespace
}  // namespace epic
