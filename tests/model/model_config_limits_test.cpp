// config.json from a hostile or broken writer: absurd sizes fail fast with a message (no int64
// overflow, no long loop), long strings and lists do not crash the literal check, and a FIFO or a
// directory named config.json is refused at once instead of blocking.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>

#include "kernels/error.h"
#include "temp_dir.h"
#include "worker/model_config.h"

namespace epic {
namespace {

using nlohmann::json;

json valid_config() {
  return json::parse(R"({
    "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 32, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 160,
    "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 24, "intermediate_size": 48,
    "mlp_only_layers": [1], "rope_theta": 10000.0})");
}

// The error for `text`, which must be refused with `code` and name every one of `words`.
void expect_refused(const std::string& text, ErrorCode code, const std::vector<std::string>& words) {
  try {
    ModelConfig::from_json_text(text, "model/config.json");
    FAIL() << "accepted: " << text.substr(0, 300);
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    for (const std::string& word : words)
      EXPECT_NE(std::string(e.what()).find(word), std::string::npos) << e.what();
    EXPECT_LT(std::string(e.what()).size(), 2000u) << "messages must not echo huge values";
  }
}

std::string with_raw(const std::string& key, const std::string& raw_value) {
  json config = valid_config();
  config[key] = 0;  // placeholder, replaced in the text so any literal can be written
  std::string text = config.dump();
  const std::string needle = "\"" + key + "\":0";
  return text.replace(text.find(needle), needle.size(), "\"" + key + "\":" + raw_value);
}

TEST(ModelConfigLimits, AbsurdSizesFailFastNamingTheField) {
  const auto start = std::chrono::steady_clock::now();
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"num_hidden_layers", "1000000000000"},          // 10^12: a loop over layers would never end
      {"head_dim", "4611686018427387904"},             // 2^62
      {"vocab_size", "18446744073709551615"},          // 2^64-1: nlohmann keeps it unsigned
      {"decoder_sparse_step", "9223372036854775807"},  // 2^63-1
      {"num_experts", "9223372036854775807"},
      {"num_experts", "18446744073709551615"},
      {"hidden_size", "4611686018427387904"},
      {"num_attention_heads", "1000000000"},
      {"num_key_value_heads", "8"},  // more than num_attention_heads (4)
      {"moe_intermediate_size", "9223372036854775807"},
      {"intermediate_size", "9223372036854775807"},
      {"num_experts_per_tok", "9223372036854775807"},
      {"max_position_embeddings", "9223372036854775807"},
  };
  for (const auto& [key, value] : cases) {
    SCOPED_TRACE(key + " = " + value);
    expect_refused(with_raw(key, value), ErrorCode::kInvalidConfig, {key});
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

TEST(ModelConfigLimits, ProductsOfInRangeSizesAreChecked) {
  // Each size within its bound, their product beyond int64: an error naming the product's fields.
  json config = valid_config();
  config["num_experts"] = config_limits::kMaxExperts;
  config["moe_intermediate_size"] = config_limits::kMaxIntermediateSize;
  config["hidden_size"] = config_limits::kMaxHiddenSize;
  config["num_hidden_layers"] = config_limits::kMaxLayers;
  config["head_dim"] = 16;
  expect_refused(config.dump(), ErrorCode::kInvalidConfig,
                 {"num_experts", "moe_intermediate_size", "64-bit"});

  json kv = valid_config();  // the KV cache of one full-length sequence
  kv["max_position_embeddings"] = config_limits::kMaxPositionEmbeddings;
  kv["num_hidden_layers"] = config_limits::kMaxLayers;
  kv["num_attention_heads"] = 4096;
  kv["num_key_value_heads"] = 4096;
  kv["head_dim"] = config_limits::kMaxHeadDim;
  expect_refused(kv.dump(), ErrorCode::kInvalidConfig, {"max_position_embeddings", "64-bit"});
}

TEST(ModelConfigLimits, HugeMlpOnlyLayersListIsOneEntryPerLayer) {
  json config = valid_config();
  config["mlp_only_layers"] = json(std::vector<int>(200000, 1));
  const ModelConfig c = ModelConfig::from_json_text(config.dump(), "c");
  EXPECT_EQ(c.mlp_only_layers, std::vector<int64_t>{1});
  config["mlp_only_layers"] = json::array({1, 18446744073709551615ull});
  expect_refused(config.dump(), ErrorCode::kInvalidConfig, {"mlp_only_layers"});
}

TEST(ModelConfigLimits, LongStringsAndListsDoNotCrash) {
  // The std::regex this replaces overflowed the stack on a 30 KB string.
  for (const size_t length : {size_t{30} << 10, size_t{1} << 20}) {
    json config = valid_config();
    config["_name_or_path"] = std::string(length, 'a');
    config["comment"] = std::string(length / 2, '"') + "NaN";  // escaped quotes, and a NaN inside a string
    EXPECT_NO_THROW(ModelConfig::from_json_text(config.dump(), "c")) << length;
  }
  json list = valid_config();
  list["bad_words_ids"] = json(std::vector<int>(30 << 10, 7));
  EXPECT_NO_THROW(ModelConfig::from_json_text(list.dump(), "c"));
  // Numbers: a long run of digits and a NaN after a long string are still found and named.
  expect_refused(with_raw("rope_theta", "1" + std::string(400, '0')), ErrorCode::kInvalidConfig,
                 {"rope_theta", "overflows a double"});
  json late = valid_config();
  late["_name_or_path"] = std::string(1 << 20, 'b');
  std::string text = late.dump();
  text.insert(text.size() - 1, ", \"rms_norm_eps\": NaN");
  expect_refused(text, ErrorCode::kInvalidConfig, {"rms_norm_eps", "NaN"});
  expect_refused(R"({"a": {"b": [1, -Infinity]}})", ErrorCode::kInvalidConfig, {"a.b", "-Infinity"});
}

TEST(ModelConfigLimits, DeepNestingIsRefused) {
  const std::string deep = "{\"x\": " + std::string(100000, '[') + std::string(100000, ']') + "}";
  expect_refused(deep, ErrorCode::kInvalidConfig, {"levels deep"});
}

TEST(ModelConfigLimits, ConfigMustBeARegularFile) {
  testing::TempDir dir;
  // A FIFO: opening it for reading would block until a writer came.
  ASSERT_EQ(::mkfifo((dir.path() / "config.json").c_str(), 0600), 0);
  const auto start = std::chrono::steady_clock::now();
  try {
    ModelConfig::load(dir.path());
    FAIL() << "a FIFO was read as config.json";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("FIFO"), std::string::npos) << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));

  testing::TempDir other;
  std::filesystem::create_directory(other.path() / "config.json");
  try {
    ModelConfig::load(other.path());
    FAIL() << "a directory was read as config.json";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("directory"), std::string::npos) << e.what();
  }

  testing::TempDir missing;
  try {
    ModelConfig::load(missing.path());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--model"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace epic
