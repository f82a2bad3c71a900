// Real config.json files as publishers and transformers wrote them (tests/model/published_configs,
// see its README for where each came from) load to the values they state.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "kernels/error.h"
#include "worker/model_config.h"

namespace epic {
namespace {

namespace fs = std::filesystem;

std::string read_text(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

const fs::path kPublished = fs::path(EPIC_MODEL_TESTS_DIR) / "published_configs";

// The values of Qwen3-30B-A3B (all its 2507 variants share the shapes).
void expect_qwen3_30b_a3b_shapes(const ModelConfig& c) {
  EXPECT_EQ(c.architecture, Architecture::kQwen3Moe);
  EXPECT_EQ(c.num_hidden_layers, 48);
  EXPECT_EQ(c.hidden_size, 2048);
  EXPECT_EQ(c.num_attention_heads, 32);
  EXPECT_EQ(c.num_key_value_heads, 4);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.num_experts, 128);
  EXPECT_EQ(c.num_experts_per_tok, 8);
  EXPECT_EQ(c.moe_intermediate_size, 768);
  EXPECT_EQ(c.vocab_size, 151936);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{151645});
  for (int64_t layer = 0; layer < 48; ++layer) EXPECT_TRUE(c.is_moe_layer(layer)) << layer;
}

TEST(PublishedConfigs, Qwen3ThinkingAsTransformers5WritesIt) {
  // num_local_experts and rope_parameters: read as all-dense before (num_experts was missing).
  const fs::path path = kPublished / "qwen3-30b-a3b-thinking-2507.transformers-5.7.0.json";
  const ModelConfig c = ModelConfig::from_json_text(read_text(path), path.string());
  expect_qwen3_30b_a3b_shapes(c);
  EXPECT_EQ(c.expert_count_field, "num_local_experts");
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e7);
  EXPECT_EQ(c.max_position_embeddings, 262144);
}

TEST(PublishedConfigs, Qwen3MlxConversionIsRefusedAsQuantised) {
  const fs::path path = kPublished / "lmstudio-community-qwen3-30b-a3b-mlx-4bit.json";
  try {
    ModelConfig::from_json_text(read_text(path), path.string());
    FAIL() << "a 4-bit checkpoint's config was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kUnsupported);
    EXPECT_NE(std::string(e.what()).find("quantization_config"), std::string::npos) << e.what();
  }
  // Without the converter's quantisation fields it is the published Qwen3-30B-A3B config.
  nlohmann::json json = nlohmann::json::parse(read_text(path));
  json.erase("quantization");
  json.erase("quantization_config");
  const ModelConfig c = ModelConfig::from_json_text(json.dump(), path.string());
  expect_qwen3_30b_a3b_shapes(c);
  EXPECT_EQ(c.expert_count_field, "num_experts");
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
  EXPECT_EQ(c.max_position_embeddings, 40960);
}

// config.json files written by transformers' own save_pretrained (tests/model/transformers_configs,
// see its README).
const fs::path kTransformersWritten = fs::path(EPIC_MODEL_TESTS_DIR) / "transformers_configs";

TEST(TransformersWrittenConfigs, Qwen3MoeSavePretrained) {
  const fs::path path = kTransformersWritten / "qwen3_moe_save_pretrained.json";
  if (!fs::exists(path)) GTEST_SKIP() << path << " is not there";
  const ModelConfig c = ModelConfig::from_json_text(read_text(path), path.string());
  EXPECT_EQ(c.num_experts, 4);  // written as num_local_experts
  EXPECT_EQ(c.expert_count_field, "num_local_experts");
  EXPECT_EQ(c.num_experts_per_tok, 2);
  EXPECT_EQ(c.num_hidden_layers, 2);
  EXPECT_TRUE(c.is_moe_layer(0));
  EXPECT_TRUE(c.is_moe_layer(1));
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.max_position_embeddings, 32768);
  EXPECT_FALSE(c.norm_topk_prob);
  EXPECT_TRUE(c.eos_token_ids.empty());  // "eos_token_id": null
}

TEST(TransformersWrittenConfigs, Qwen3OmniMoeClassDefaults) {
  const fs::path path = kTransformersWritten / "qwen3_omni_moe_default_save_pretrained.json";
  if (!fs::exists(path)) GTEST_SKIP() << path << " is not there";
  // The class defaults name no head_dim, and hidden_size / num_attention_heads = 2048 / 28 = 73
  // is odd: no rotary embedding can use it, so epic refuses it naming head_dim.
  try {
    ModelConfig::from_json_text(read_text(path), path.string());
    FAIL() << "an odd default head_dim was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("head_dim"), std::string::npos) << e.what();
  }
  nlohmann::json json = nlohmann::json::parse(read_text(path));
  json["thinker_config"]["text_config"]["head_dim"] = 64;
  const ModelConfig c = ModelConfig::from_json_text(json.dump(), path.string());
  EXPECT_EQ(c.architecture, Architecture::kQwen3OmniThinker);
  EXPECT_EQ(c.num_experts, 128);
  EXPECT_EQ(c.expert_count_field, "num_experts");
  EXPECT_EQ(c.num_experts_per_tok, 8);
  EXPECT_EQ(c.num_hidden_layers, 28);
  EXPECT_EQ(c.vocab_size, 3584);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
  EXPECT_EQ(c.max_position_embeddings, 32768);
}

// Any further file dropped in must load or be refused with an epic::Error, never crash.
TEST(TransformersWrittenConfigs, EveryFileLoadsOrIsRefusedCleanly) {
  if (!fs::is_directory(kTransformersWritten)) GTEST_SKIP() << kTransformersWritten << " does not exist yet";
  for (const auto& entry : fs::recursive_directory_iterator(kTransformersWritten)) {
    if (!entry.is_regular_file() || entry.path().extension() != ".json") continue;
    SCOPED_TRACE(entry.path().string());
    try {
      ModelConfig::from_json_text(read_text(entry.path()), entry.path().string());
    } catch (const Error&) {
      // refused with a message: fine for a file that is no model config (generation_config.json)
    }
  }
}

}  // namespace
}  // namespace epic
