// config.json validation: each bad input gets an Error whose message names the field and the fix.
#include "worker/model_config.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

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
  expect_error(with("use_sliding_window", "true, \"sliding_window\": 4096"), ErrorCode::kUnsupported,
               {"use_sliding_window"});
}

// --- Spellings of transformers 4 and 5 -------------------------------------------------------

std::string without(const std::string& key) {
  std::string text = kValid;
  const size_t at = text.find("\"" + key + "\": ");
  const size_t end = text.find_first_of(",}", at);
  return text.substr(0, at) + text.substr(end + (text[end] == ',' ? 2 : 0));
}

TEST(ModelConfig, ReadsTransformers5NumLocalExperts) {
  // transformers 5's Qwen3MoeConfig maps num_experts to num_local_experts and writes that; read
  // as all-dense before, the model then failed on a missing dense MLP tensor.
  const ModelConfig c = ModelConfig::from_json_text(
      without("num_experts").substr(0, without("num_experts").size() - 1) + ", \"num_local_experts\": 8}",
      "c.json");
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.expert_count_field, "num_local_experts");
  EXPECT_TRUE(c.is_moe_layer(0));
  EXPECT_EQ(ModelConfig::from_json_text(kValid, "c.json").expert_count_field, "num_experts");
}

TEST(ModelConfig, BothExpertSpellingsMustAgree) {
  EXPECT_EQ(ModelConfig::from_json_text(with("num_local_experts", "8"), "c.json").num_experts, 8);
  expect_error(with("num_local_experts", "16"), ErrorCode::kInvalidConfig,
               {"num_experts", "num_local_experts", "8", "16"});
}

TEST(ModelConfig, NoExpertCountIsVisible) {
  // All layers read as dense; the weight loader refuses a checkpoint with routers on this mark.
  const ModelConfig c = ModelConfig::from_json_text(without("num_experts"), "c.json");
  EXPECT_EQ(c.num_experts, 0);
  EXPECT_EQ(c.expert_count_field, "");
  EXPECT_FALSE(c.is_moe_layer(0));
}

TEST(ModelConfig, ReadsRopeParametersOnQwen3Moe) {
  const std::string text = without("rope_theta");
  const ModelConfig c = ModelConfig::from_json_text(
      text.substr(0, text.size() - 1) +
          R"(, "rope_parameters": {"rope_theta": 10000000, "rope_type": "default"}})",
      "c.json");
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e7);
}

TEST(ModelConfig, AcceptsHarmlessRealWorldValues) {
  std::string text = kValid;
  text =
      text.substr(0, text.size() - 1) +
      R"(, "rope_scaling": null, "sliding_window": 4096, "use_sliding_window": false, "attention_dropout": 0.0,
             "max_window_layers": 28, "hidden_act": "silu", "attention_bias": false, "layer_types": ["full_attention"],
             "eos_token_id": [151645, 151643]})";
  const ModelConfig c = ModelConfig::from_json_text(text, "c.json");
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{151645, 151643}));
  // Qwen2-VL style rope_scaling {"type": "mrope"} and a theta agreeing with rope_theta.
  EXPECT_NO_THROW(ModelConfig::from_json_text(
      with("rope_scaling", R"({"type": "mrope", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})"),
      "c.json"));
}

TEST(ModelConfig, RopeSpellingsMustNotContradict) {
  expect_error(with("rope_parameters", R"({"rope_type": "default", "rope_theta": 5000.0})"),
               ErrorCode::kInvalidConfig, {"rope_parameters.rope_theta", "rope_theta"});
  expect_error(with("rope_scaling", R"({"rope_type": "default", "rope_theta": 1.0})"),
               ErrorCode::kInvalidConfig, {"rope_scaling.rope_theta"});
  expect_error(with("rope_scaling", R"({"rope_type": "default", "type": "yarn"})"), ErrorCode::kInvalidConfig,
               {"rope_type", "type"});
}

TEST(ModelConfig, RefusesEveryRopeScaling) {
  for (const char* type : {"linear", "dynamic", "yarn", "longrope", "llama3", "ntk"})
    expect_error(with("rope_scaling", std::string(R"({"rope_type": ")") + type + R"(", "factor": 2.0})"),
                 ErrorCode::kUnsupported, {"rope_scaling", type});
  // transformers 4 spelling "type", and transformers 5's rope_parameters.
  expect_error(with("rope_scaling", R"({"type": "linear", "factor": 2.0})"), ErrorCode::kUnsupported,
               {"linear"});
  expect_error(with("rope_parameters", R"({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})"),
               ErrorCode::kUnsupported, {"rope_parameters", "yarn"});
  // A scaling dict that names no type: which scaling it means is unknown.
  expect_error(with("rope_scaling", R"({"factor": 4.0})"), ErrorCode::kUnsupported,
               {"rope_scaling", "factor"});
  expect_error(with("rope_scaling", "4"), ErrorCode::kInvalidConfig, {"rope_scaling", "object"});
  expect_error(with("partial_rotary_factor", "0.5"), ErrorCode::kUnsupported, {"partial_rotary_factor"});
}

TEST(ModelConfig, RefusesFeaturesTheForwardPassIgnores) {
  for (const char* act : {"\"gelu\"", "\"relu\"", "\"gelu_pytorch_tanh\""})
    expect_error(with("hidden_act", act), ErrorCode::kUnsupported, {"hidden_act", "silu"});
  expect_error(with("hidden_act", "7"), ErrorCode::kInvalidConfig, {"hidden_act", "string"});
  expect_error(with("attention_bias", "true"), ErrorCode::kUnsupported, {"attention_bias"});
  expect_error(with("mlp_bias", "true"), ErrorCode::kUnsupported, {"mlp_bias"});
  expect_error(
      with("layer_types", R"(["full_attention", "sliding_attention", "full_attention", "full_attention"])"),
      ErrorCode::kUnsupported, {"layer_types", "sliding_attention"});
  expect_error(with("quantization_config", R"({"quant_method": "fp8", "weight_block_size": [128, 128]})"),
               ErrorCode::kUnsupported, {"quantization_config", "fp8"});
  // use_sliding_window true without a window is no sliding window in transformers.
  EXPECT_NO_THROW(
      ModelConfig::from_json_text(with("use_sliding_window", "true, \"sliding_window\": null"), "c"));
}

TEST(ModelConfig, EosTokenIdMustBeTokenIds) {
  for (const char* bad : {"\"151645\"", "151645.0", "true", "-1", "[151645, \"x\"]", "[1.5]", "[false]",
                          "[-3]", "{\"id\": 1}", "18446744073709551615"})
    expect_error(with("eos_token_id", bad), ErrorCode::kInvalidConfig, {"eos_token_id"});
  EXPECT_EQ(ModelConfig::from_json_text(with("eos_token_id", "7"), "c").eos_token_ids,
            std::vector<int64_t>{7});
  EXPECT_TRUE(ModelConfig::from_json_text(with("eos_token_id", "null"), "c").eos_token_ids.empty());
}

TEST(ModelConfig, ReadsMaxPositionEmbeddings) {
  EXPECT_EQ(
      ModelConfig::from_json_text(with("max_position_embeddings", "40960"), "c").max_position_embeddings,
      40960);
  // Absent: transformers' Qwen3MoeConfig default.
  EXPECT_EQ(ModelConfig::from_json_text(kValid, "c").max_position_embeddings, 32768);
  expect_error(with("max_position_embeddings", "0"), ErrorCode::kInvalidConfig, {"max_position_embeddings"});
  expect_error(with("max_position_embeddings", "-5"), ErrorCode::kInvalidConfig, {"max_position_embeddings"});
  expect_error(with("max_position_embeddings", "4096.5"), ErrorCode::kInvalidConfig,
               {"max_position_embeddings"});
  const ModelConfig c = ModelConfig::from_json_text(with("max_position_embeddings", "40960"), "c");
  EXPECT_EQ(ModelConfig::from_json_text(c.to_json_text(), "again").max_position_embeddings, 40960);
}

TEST(ModelConfig, OmniTextConfigDefaultsFollowItsClass) {
  // Qwen3OmniMoeTextConfig: norm_topk_prob defaults to true and rope theta to 1e6, unlike
  // Qwen3MoeConfig; a missing field must not silently take the other class's default.
  std::string inner = without("rope_theta");
  inner.replace(inner.find("\"norm_topk_prob\": true, "), 24, "");
  const ModelConfig c = ModelConfig::from_json_text(
      R"({"architectures": ["Qwen3OmniMoeForConditionalGeneration"], "thinker_config": {"text_config": )" +
          inner + "}}",
      "c");
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
  // The Omni text config has no use_sliding_window switch: a window is used as it stands.
  inner = inner.substr(0, inner.size() - 1) + R"(, "sliding_window": 4096})";
  expect_error(
      R"({"architectures": ["Qwen3OmniMoeForConditionalGeneration"], "thinker_config": {"text_config": )" +
          inner + "}}",
      ErrorCode::kUnsupported, {"thinker_config.text_config.sliding_window"});
}

}  // namespace
}  // namespace epic

namespace epic {
namespace {

// A model folder with config.json (eos 7) and optionally generation_config.json.
class GenerationConfigEos : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() / ("epic-gencfg-" + std::to_string(::getpid()) + "-" +
                                                      ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
    std::ofstream(dir_ / "config.json") << with("eos_token_id", "7");
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  void write_generation_config(const std::string& text) { std::ofstream(dir_ / "generation_config.json") << text; }
  std::filesystem::path dir_;
};

TEST_F(GenerationConfigEos, ConfigJsonAloneGivesItsEos) {
  EXPECT_EQ(ModelConfig::load(dir_).eos_token_ids, std::vector<int64_t>{7});
}

TEST_F(GenerationConfigEos, GenerationConfigListWinsAsInTransformersGenerate) {
  write_generation_config(R"({"bos_token_id": 1, "eos_token_id": [151645, 151643], "do_sample": true})");
  EXPECT_EQ(ModelConfig::load(dir_).eos_token_ids, (std::vector<int64_t>{151645, 151643}));
}

TEST_F(GenerationConfigEos, GenerationConfigWithoutEosKeepsConfigJsons) {
  // What transformers 5 save_pretrained writes beside a config without eos ids.
  write_generation_config(R"({"_from_model_config": true, "transformers_version": "5.17.0", "use_cache": true})");
  EXPECT_EQ(ModelConfig::load(dir_).eos_token_ids, std::vector<int64_t>{7});
}

TEST_F(GenerationConfigEos, BadGenerationConfigIsNamed) {
  write_generation_config(R"({"eos_token_id": "</s>"})");
  try {
    ModelConfig::load(dir_);
    FAIL() << "a string eos_token_id in generation_config.json was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("generation_config.json"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("eos_token_id"), std::string::npos) << e.what();
  }
  write_generation_config("{not json");
  EXPECT_THROW(ModelConfig::load(dir_), Error);
}

}  // namespace
}  // namespace epic
