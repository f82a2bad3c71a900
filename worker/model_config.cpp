// config.json -> ModelConfig, with every field checked before any weight is read.
#include "worker/model_config.h"

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>

#include "kernels/error.h"

namespace epic {
namespace {

using nlohmann::json;

[[noreturn]] void fail(const std::string& source, const std::string& what) {
  throw Error(ErrorCode::kInvalidConfig, source + ": " + what);
}

// Python's json module writes NaN / Infinity, which are not JSON; name the field they sit in.
void reject_non_finite_literals(const std::string& text, const std::string& source) {
  static const std::regex literal(R"re("([^"]+)"\s*:\s*(-?(NaN|Infinity)))re");
  std::smatch match;
  if (std::regex_search(text, match, literal)) {
    fail(source, "field \"" + match[1].str() + "\" is " + match[2].str() +
                     "; every number in config.json must be finite. Fix the value in config.json.");
  }
  // Numbers too large for a double (1e999) overflow to infinity.
  static const std::regex huge(R"re("([^"]+)"\s*:\s*(-?[0-9.]+[eE][+]?[0-9]{3,}))re");
  for (auto it = std::sregex_iterator(text.begin(), text.end(), huge); it != std::sregex_iterator(); ++it) {
    if (!std::isfinite(std::strtod((*it)[2].str().c_str(), nullptr)))
      fail(source, "field \"" + (*it)[1].str() + "\" is " + (*it)[2].str() +
                       ", which overflows a double; every number in config.json must be finite");
  }
}

class FieldReader {
 public:
  FieldReader(const json& object, std::string source, std::string path)
      : object_(object), source_(std::move(source)), path_(std::move(path)) {}

  bool has(const std::string& key) const { return object_.contains(key) && !object_[key].is_null(); }

  int64_t positive_int(const std::string& key) const {
    int64_t value = integer(key);
    if (value <= 0) fail(source_, where(key) + " must be > 0, got " + std::to_string(value));
    return value;
  }
  int64_t positive_int_or(const std::string& key, int64_t fallback) const {
    return has(key) ? positive_int(key) : fallback;
  }
  int64_t integer(const std::string& key) const {
    require(key);
    const json& value = object_[key];
    if (!value.is_number_integer()) fail(source_, where(key) + " must be an integer, got " + value.dump());
    return value.get<int64_t>();
  }
  double finite_number(const std::string& key) const {
    require(key);
    const json& value = object_[key];
    if (!value.is_number()) fail(source_, where(key) + " must be a number, got " + value.dump());
    double number = value.get<double>();
    if (!std::isfinite(number))
      fail(source_, where(key) + " is " + value.dump() + "; it must be a finite number");
    return number;
  }
  bool boolean_or(const std::string& key, bool fallback) const {
    if (!has(key)) return fallback;
    if (!object_[key].is_boolean())
      fail(source_, where(key) + " must be true or false, got " + object_[key].dump());
    return object_[key].get<bool>();
  }
  std::string where(const std::string& key) const { return "field " + path_ + key; }

 private:
  void require(const std::string& key) const {
    if (!has(key)) fail(source_, "missing required " + where(key) + "; add it to config.json");
  }
  const json& object_;
  std::string source_;
  std::string path_;
};

}  // namespace

bool ModelConfig::is_moe_layer(int64_t layer) const {
  for (int64_t dense : mlp_only_layers)
    if (dense == layer) return false;
  return num_experts > 0 && (layer + 1) % decoder_sparse_step == 0;
}

std::string ModelConfig::layer_prefix(int64_t layer) const {
  return tensor_prefix + "layers." + std::to_string(layer) + ".";
}

ModelConfig ModelConfig::from_json_text(const std::string& text, const std::string& source) {
  reject_non_finite_literals(text, source);
  json root;
  try {
    root = json::parse(text);
  } catch (const json::exception& e) {
    fail(source, std::string("is not valid JSON (") + e.what() + ")");
  }
  if (!root.is_object()) fail(source, "must hold a JSON object");

  ModelConfig config;
  std::string architecture;
  if (root.contains("architectures") && root["architectures"].is_array() && !root["architectures"].empty() &&
      root["architectures"][0].is_string()) {
    architecture = root["architectures"][0].get<std::string>();
  } else if (root.contains("thinker_config")) {
    architecture = "Qwen3OmniMoeForConditionalGeneration";
  } else {
    fail(source,
         "has no \"architectures\" list naming the model class; supported: Qwen3MoeForCausalLM, "
         "Qwen3OmniMoeForConditionalGeneration");
  }
  config.architecture_name = architecture;

  const json* text_config = &root;
  std::string path;
  if (architecture == "Qwen3MoeForCausalLM") {
    config.architecture = Architecture::kQwen3Moe;
    config.tensor_prefix = "model.";
    config.lm_head_name = "lm_head.weight";
  } else if (architecture == "Qwen3OmniMoeForConditionalGeneration" ||
             architecture == "Qwen3OmniMoeThinkerForConditionalGeneration") {
    config.architecture = Architecture::kQwen3OmniThinker;
    config.tensor_prefix = "thinker.model.";
    config.lm_head_name = "thinker.lm_head.weight";
    if (!root.contains("thinker_config") || !root["thinker_config"].is_object() ||
        !root["thinker_config"].contains("text_config") || !root["thinker_config"]["text_config"].is_object())
      fail(source, "architecture " + architecture + " needs a thinker_config.text_config object");
    text_config = &root["thinker_config"]["text_config"];
    path = "thinker_config.text_config.";
  } else {
    fail(source, "unknown architecture \"" + architecture +
                     "\"; epic supports Qwen3MoeForCausalLM and Qwen3OmniMoeForConditionalGeneration "
                     "(the thinker's text model)");
  }

  FieldReader field(*text_config, source, path);
  config.hidden_size = field.positive_int("hidden_size");
  config.num_hidden_layers = field.positive_int("num_hidden_layers");
  config.num_attention_heads = field.positive_int("num_attention_heads");
  config.num_key_value_heads = field.positive_int_or("num_key_value_heads", config.num_attention_heads);
  config.head_dim = field.positive_int_or("head_dim", config.hidden_size / config.num_attention_heads);
  config.vocab_size = field.positive_int("vocab_size");
  config.num_experts = field.has("num_experts") ? field.integer("num_experts") : 0;
  if (config.num_experts < 0) fail(source, field.where("num_experts") + " must be >= 0");
  config.decoder_sparse_step = field.positive_int_or("decoder_sparse_step", 1);
  config.norm_topk_prob = field.boolean_or("norm_topk_prob", false);
  config.rms_norm_eps = field.has("rms_norm_eps") ? field.finite_number("rms_norm_eps") : 1e-6;
  if (config.rms_norm_eps <= 0) fail(source, field.where("rms_norm_eps") + " must be > 0");

  // tie_word_embeddings may sit on the text config or on an outer level.
  bool tie = false;
  if (field.has("tie_word_embeddings")) {
    tie = field.boolean_or("tie_word_embeddings", false);
  } else if (config.architecture == Architecture::kQwen3OmniThinker &&
             root["thinker_config"].contains("tie_word_embeddings")) {
    tie = FieldReader(root["thinker_config"], source, "thinker_config.")
              .boolean_or("tie_word_embeddings", false);
  } else if (root.contains("tie_word_embeddings")) {
    tie = FieldReader(root, source, "").boolean_or("tie_word_embeddings", false);
  }
  config.tie_word_embeddings = tie;

  if (field.has("mlp_only_layers")) {
    const json& layers = (*text_config)["mlp_only_layers"];
    if (!layers.is_array()) fail(source, field.where("mlp_only_layers") + " must be a list of layer indices");
    for (const json& layer : layers) {
      if (!layer.is_number_integer() || layer.get<int64_t>() < 0 ||
          layer.get<int64_t>() >= config.num_hidden_layers)
        fail(source, field.where("mlp_only_layers") + " holds " + layer.dump() +
                         ", which is not a layer index in [0, " + std::to_string(config.num_hidden_layers) +
                         ")");
      config.mlp_only_layers.push_back(layer.get<int64_t>());
    }
  }

  // rope_theta, or rope_parameters.rope_theta (transformers 5 / Qwen3-Omni). Only the default
  // rope type is supported; the Omni thinker's multimodal rope equals it for text-only positions.
  if (field.has("rope_parameters") || field.has("rope_scaling")) {
    const std::string key = field.has("rope_parameters") ? "rope_parameters" : "rope_scaling";
    const json& rope = (*text_config)[key];
    if (!rope.is_object()) fail(source, field.where(key) + " must be an object");
    FieldReader rope_field(rope, source, path + key + ".");
    std::string type = "default";
    for (const char* type_key : {"rope_type", "type"})
      if (rope.contains(type_key) && rope[type_key].is_string()) type = rope[type_key].get<std::string>();
    if (type != "default" && type != "mrope")
      throw Error(ErrorCode::kUnsupported, source + ": " + field.where(key) + " asks for rope type \"" +
                                               type + "\"; epic implements the default rope only");
    if (rope_field.has("rope_theta")) config.rope_theta = rope_field.finite_number("rope_theta");
  }
  if (field.has("rope_theta")) config.rope_theta = field.finite_number("rope_theta");
  if (config.rope_theta <= 0) fail(source, field.where("rope_theta") + " must be > 0");
  if (field.boolean_or("use_sliding_window", false))
    throw Error(ErrorCode::kUnsupported, source + ": " + field.where("use_sliding_window") +
                                             " is true; epic implements full causal attention only");
  if (field.boolean_or("attention_bias", false))
    throw Error(ErrorCode::kUnsupported,
                source + ": " + field.where("attention_bias") +
                    " is true; Qwen3-MoE attention has no bias and epic does not load one");

  if (config.num_attention_heads % config.num_key_value_heads != 0)
    fail(source, "num_attention_heads (" + std::to_string(config.num_attention_heads) +
                     ") must be a multiple of num_key_value_heads (" +
                     std::to_string(config.num_key_value_heads) + ")");
  if (config.head_dim % 2 != 0) fail(source, field.where("head_dim") + " must be even for rotary embeddings");

  bool any_moe = false, any_dense = false;
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer)
    (config.is_moe_layer(layer) ? any_moe : any_dense) = true;
  if (any_moe) {
    config.moe_intermediate_size = field.positive_int("moe_intermediate_size");
    config.num_experts_per_tok = field.positive_int("num_experts_per_tok");
    if (config.num_experts_per_tok > config.num_experts)
      fail(source, field.where("num_experts_per_tok") + " (" + std::to_string(config.num_experts_per_tok) +
                       ") exceeds num_experts (" + std::to_string(config.num_experts) + ")");
  }
  if (any_dense) config.intermediate_size = field.positive_int("intermediate_size");

  // eos_token_id: an int or a list, on the text config or the top level.
  for (const json* level : std::initializer_list<const json*>{text_config, &root}) {
    if (!level->contains("eos_token_id") || (*level)["eos_token_id"].is_null()) continue;
    const json& eos = (*level)["eos_token_id"];
    if (eos.is_number_integer()) config.eos_token_ids.push_back(eos.get<int64_t>());
    if (eos.is_array())
      for (const json& id : eos)
        if (id.is_number_integer()) config.eos_token_ids.push_back(id.get<int64_t>());
    break;
  }
  return config;
}

ModelConfig ModelConfig::load(const std::filesystem::path& model_dir) {
  const std::filesystem::path path = model_dir / "config.json";
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    throw Error(ErrorCode::kIo, path.string() +
                                    ": cannot open; --model must name a Hugging Face model "
                                    "directory holding config.json and the safetensors weights");
  }
  std::stringstream buffer;
  buffer << file.rdbuf();
  return from_json_text(buffer.str(), path.string());
}

std::string ModelConfig::to_json_text() const {
  json text;
  text["hidden_size"] = hidden_size;
  text["num_hidden_layers"] = num_hidden_layers;
  text["num_attention_heads"] = num_attention_heads;
  text["num_key_value_heads"] = num_key_value_heads;
  text["head_dim"] = head_dim;
  text["vocab_size"] = vocab_size;
  text["num_experts"] = num_experts;
  text["num_experts_per_tok"] = num_experts_per_tok;
  text["moe_intermediate_size"] = moe_intermediate_size;
  text["intermediate_size"] = intermediate_size;
  text["decoder_sparse_step"] = decoder_sparse_step;
  text["mlp_only_layers"] = mlp_only_layers;
  text["norm_topk_prob"] = norm_topk_prob;
  text["rms_norm_eps"] = rms_norm_eps;
  text["tie_word_embeddings"] = tie_word_embeddings;
  text["hidden_act"] = "silu";
  text["attention_bias"] = false;
  if (!eos_token_ids.empty())
    text["eos_token_id"] = eos_token_ids.size() == 1 ? json(eos_token_ids[0]) : json(eos_token_ids);
  json root;
  if (architecture == Architecture::kQwen3Moe) {
    root = text;
    root["rope_theta"] = rope_theta;
    root["architectures"] = {"Qwen3MoeForCausalLM"};
    root["model_type"] = "qwen3_moe";
    root["torch_dtype"] = "bfloat16";
  } else {
    text["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", rope_theta}};
    text["model_type"] = "qwen3_omni_moe_text";
    root["architectures"] = {"Qwen3OmniMoeForConditionalGeneration"};
    root["model_type"] = "qwen3_omni_moe";
    root["thinker_config"] = {{"model_type", "qwen3_omni_moe_thinker"}, {"text_config", text}};
  }
  return root.dump(2) + "\n";
}

}  // namespace epic
