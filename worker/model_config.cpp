// config.json -> ModelConfig, with every field checked before any weight is read: every spelling
// transformers 4/5 and the published hub configs use, bounds on sizes and their products, and a
// refusal for every value the forward pass would otherwise silently ignore.
#include "worker/model_config.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <nlohmann/json.hpp>

#include "kernels/error.h"
#include "kernels/file_io.h"

namespace epic {
namespace {

using nlohmann::json;
namespace limits = config_limits;

[[noreturn]] void fail(const std::string& source, const std::string& what) {
  throw Error(ErrorCode::kInvalidConfig, source + ": " + what);
}

[[noreturn]] void unsupported(const std::string& source, const std::string& what) {
  throw Error(ErrorCode::kUnsupported, source + ": " + what);
}

// A value for a message: long strings and arrays (a 1 MB string is valid JSON) are cut short.
std::string shown(const json& value) {
  std::string text = value.dump();
  if (text.size() > 80) text = text.substr(0, 60) + "... (" + std::to_string(text.size()) + " characters)";
  return text;
}

// One linear pass over the raw text, before the JSON parser sees it:
// - Python's json module writes NaN / Infinity, which are not JSON; name the field they sit in.
// - A number too large for a double (1e999) parses to infinity; name its field too.
// - Nesting deeper than any config keeps the parser and the tree's destructor from recursing.
// The scan knows when it is inside a string (with escapes), so a string holding "NaN" or a
// million characters is neither flagged nor a cost beyond one step per byte. No regex: the
// std::regex it replaces recursed once per character and overflowed the stack on a 30 KB string.
class LiteralScanner {
 public:
  LiteralScanner(const std::string& text, const std::string& source) : text_(text), source_(source) {}

  void run() {
    size_t at = 0;
    while (at < text_.size()) {
      const char c = text_[at];
      if (c == '"') {
        at = scan_string(at);
      } else if (c == '{' || c == '[') {
        if (static_cast<int>(frames_.size()) >= limits::kMaxNestingDepth)
          fail(source_, "nests objects and lists more than " + std::to_string(limits::kMaxNestingDepth) +
                            " levels deep (at " + field_name() + "); a config.json nests 3 or 4");
        frames_.push_back({frames_.empty() ? "" : member_, c == '{'});
        member_.clear();
        ++at;
      } else if (c == '}' || c == ']') {
        if (!frames_.empty()) {
          member_ = frames_.back().key;
          frames_.pop_back();
        }
        ++at;
      } else if (c == '-' || c == '+' || std::isalnum(static_cast<unsigned char>(c))) {
        at = scan_bare_token(at);
      } else {
        ++at;
      }
    }
  }

 private:
  struct Frame {
    std::string key;  // the member of the enclosing object that holds this container
    bool is_object;
  };

  size_t scan_string(size_t open) {
    size_t at = open + 1;
    while (at < text_.size() && text_[at] != '"') at += text_[at] == '\\' ? 2 : 1;
    const size_t close = std::min(at, text_.size());
    // A string followed by ':' inside an object is a member name.
    size_t next = close + 1;
    while (next < text_.size() && std::isspace(static_cast<unsigned char>(text_[next]))) ++next;
    if (next < text_.size() && text_[next] == ':' && !frames_.empty() && frames_.back().is_object)
      member_ = text_.substr(open + 1, std::min<size_t>(close - open - 1, 200));
    return close + 1;
  }

  size_t scan_bare_token(size_t start) {
    size_t end = start;
    while (end < text_.size() && (std::isalnum(static_cast<unsigned char>(text_[end])) || text_[end] == '-' ||
                                  text_[end] == '+' || text_[end] == '.'))
      ++end;
    const std::string token = text_.substr(start, end - start);
    std::string word = token;
    if (!word.empty() && (word[0] == '-' || word[0] == '+')) word.erase(0, 1);
    if (word == "NaN" || word == "Infinity" || word == "inf" || word == "nan")
      fail(source_, "field \"" + field_name() + "\" is " + token +
                        "; every number in config.json must be finite. Fix the value in config.json.");
    if (!word.empty() && std::isdigit(static_cast<unsigned char>(word[0]))) {
      const double value = std::strtod(token.c_str(), nullptr);
      if (!std::isfinite(value))
        fail(source_, "field \"" + field_name() + "\" is " + shown(json(token)) +
                          ", which overflows a double; every number in config.json must be finite");
    }
    return end;
  }

  // "thinker_config.text_config.rope_theta"; a list's elements are named by the list's field.
  std::string field_name() const {
    std::string name;
    for (size_t i = 0; i < frames_.size(); ++i) {
      const std::string& key = frames_[i].key;
      if (key.empty()) continue;
      name += (name.empty() ? "" : ".") + key;
    }
    if (!frames_.empty() && frames_.back().is_object && !member_.empty())
      name += (name.empty() ? "" : ".") + member_;
    return name.empty() ? "(top level)" : name;
  }

  const std::string& text_;
  const std::string& source_;
  std::vector<Frame> frames_;
  std::string member_;  // the member being read in the innermost object
};

class FieldReader {
 public:
  FieldReader(const json& object, std::string source, std::string path)
      : object_(object), source_(std::move(source)), path_(std::move(path)) {}

  bool has(const std::string& key) const { return object_.contains(key) && !object_[key].is_null(); }
  const json& at(const std::string& key) const { return object_[key]; }

  // An integer in [1, max]; `bound_reason` says why larger values are refused.
  int64_t positive_int(const std::string& key, int64_t max, const std::string& bound_reason) const {
    const int64_t value = integer(key);
    if (value <= 0) fail(source_, where(key) + " must be > 0, got " + std::to_string(value));
    if (value > max)
      fail(source_, where(key) + " is " + std::to_string(value) + ", more than the " + std::to_string(max) +
                        " epic accepts (" + bound_reason + "); fix the value in config.json");
    return value;
  }
  int64_t positive_int_or(const std::string& key, int64_t fallback, int64_t max,
                          const std::string& bound_reason) const {
    return has(key) ? positive_int(key, max, bound_reason) : fallback;
  }
  // Any JSON integer that fits int64; nlohmann keeps 2^63..2^64-1 as unsigned, where get<int64_t>
  // would wrap to a negative number.
  int64_t integer(const std::string& key) const {
    require(key);
    return integer_value(object_[key], where(key));
  }
  int64_t integer_value(const json& value, const std::string& name) const {
    if (!value.is_number_integer()) fail(source_, name + " must be an integer, got " + shown(value));
    if (value.is_number_unsigned() && value.get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max()))
      fail(source_, name + " is " + shown(value) + ", which does not fit a 64-bit signed integer");
    return value.get<int64_t>();
  }
  double finite_number(const std::string& key) const {
    require(key);
    const json& value = object_[key];
    if (!value.is_number() || value.is_boolean())
      fail(source_, where(key) + " must be a number, got " + shown(value));
    const double number = value.get<double>();
    if (!std::isfinite(number))
      fail(source_, where(key) + " is " + shown(value) + "; it must be a finite number");
    return number;
  }
  bool boolean_or(const std::string& key, bool fallback) const {
    if (!has(key)) return fallback;
    if (!object_[key].is_boolean())
      fail(source_, where(key) + " must be true or false, got " + shown(object_[key]));
    return object_[key].get<bool>();
  }
  std::string string_or(const std::string& key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    if (!object_[key].is_string())
      fail(source_, where(key) + " must be a string, got " + shown(object_[key]));
    return object_[key].get<std::string>();
  }
  std::string where(const std::string& key) const { return "field " + path_ + key; }
  const std::string& path() const { return path_; }
  const std::string& source() const { return source_; }

 private:
  void require(const std::string& key) const {
    if (!has(key)) fail(source_, "missing required " + where(key) + "; add it to config.json");
  }
  const json& object_;
  std::string source_;
  std::string path_;
};

// One value that config.json may spell several ways (transformers 4 vs 5). Returns the spelling
// present; two present spellings must agree, else the error names both.
std::string single_spelling(const FieldReader& field, const std::vector<std::string>& spellings) {
  std::string found;
  for (const std::string& key : spellings) {
    if (!field.has(key)) continue;
    if (found.empty()) {
      found = key;
    } else if (field.at(key) != field.at(found)) {
      fail(field.source(), field.where(found) + " is " + shown(field.at(found)) + " but " + field.where(key) +
                               " is " + shown(field.at(key)) +
                               "; both name the same value (transformers 4 and 5 spell it differently). "
                               "Keep one of them, or make them equal.");
    }
  }
  return found;
}

// Rope: the theta and the type, from rope_theta, rope_scaling (transformers 4) and
// rope_parameters (transformers 5, Qwen3-Omni), which must not contradict each other.
struct RopeSetting {
  std::string type;  // "default" once a dict was read (every accepted type rotates text alike)
  std::optional<double> theta;
  std::string theta_field;  // where theta came from, for messages
};

// Keys a rope dict may hold when its type is the default rope. The multimodal (mrope) keys only
// rearrange the three position streams of images and video; for text all three are the token
// index, so the rotation equals the default rope.
bool is_default_rope_key(const std::string& key) {
  return key == "rope_type" || key == "type" || key == "rope_theta" || key == "mrope_section" ||
         key == "interleaved" || key == "mrope_interleaved" || key == "partial_rotary_factor";
}

void read_rope_dict(const FieldReader& field, const std::string& key, RopeSetting& rope) {
  const json& dict = field.at(key);
  if (!dict.is_object())
    fail(field.source(), field.where(key) + " must be an object (or null), got " + shown(dict));
  FieldReader inner(dict, field.source(), field.path() + key + ".");
  const std::string spelled = single_spelling(inner, {"rope_type", "type"});
  std::string type;
  if (!spelled.empty()) type = inner.string_or(spelled, "");
  if (type.empty()) {
    for (const auto& [name, value] : dict.items())
      if (!is_default_rope_key(name))
        unsupported(field.source(),
                    field.where(key) + " holds \"" + name +
                        "\" but names no rope_type; a scaling dict must say which rope scaling "
                        "it means. epic implements the default rope only.");
    type = "default";  // only theta / multimodal sections: the plain rope
  }
  if (type != "default" && type != "mrope")
    unsupported(field.source(), field.where(key) + " asks for rope type \"" + type +
                                    "\"; epic implements the default rope only (no yarn, linear, dynamic, "
                                    "longrope or llama3 scaling). Use a config without rope scaling.");
  if (inner.has("partial_rotary_factor") && inner.finite_number("partial_rotary_factor") != 1.0)
    unsupported(field.source(),
                inner.where("partial_rotary_factor") + " is not 1; epic rotates the whole head dimension");
  // "mrope" (Qwen2-VL's transformers-4 spelling) and "default" rotate text positions alike.
  type = "default";
  rope.type = type;
  if (inner.has("rope_theta")) {
    const double theta = inner.finite_number("rope_theta");
    if (rope.theta && *rope.theta != theta)
      fail(field.source(), inner.where("rope_theta") + " is " + shown(inner.at("rope_theta")) + " but " +
                               rope.theta_field + " is " + std::to_string(*rope.theta) +
                               "; they name the same rope base. Keep one, or make them equal.");
    rope.theta = theta;
    rope.theta_field = inner.where("rope_theta");
  }
}

double read_rope_theta(const FieldReader& field, double class_default) {
  RopeSetting rope;
  if (field.has("rope_theta")) {
    rope.theta = field.finite_number("rope_theta");
    rope.theta_field = field.where("rope_theta");
  }
  for (const char* key : {"rope_parameters", "rope_scaling"})
    if (field.has(key)) read_rope_dict(field, key, rope);
  if (field.has("partial_rotary_factor") && field.finite_number("partial_rotary_factor") != 1.0)
    unsupported(field.source(),
                field.where("partial_rotary_factor") + " is not 1; epic rotates the whole head dimension");
  const double theta = rope.theta.value_or(class_default);
  if (!(theta > 0))
    fail(field.source(), (rope.theta ? rope.theta_field : field.where("rope_theta")) + " must be > 0");
  return theta;
}

// The member `key` of `object`, or nullptr when it is absent or null (a const json's operator[]
// must not be used on an absent key).
const json* member(const json& object, const char* key) {
  if (!object.is_object()) return nullptr;
  const auto found = object.find(key);
  return found == object.end() || found->is_null() ? nullptr : &*found;
}
const json* text_config_member(const FieldReader& field, const char* key) {
  return field.has(key) ? &field.at(key) : nullptr;
}

// Values the forward pass does not implement: refused, so a model never runs as something else.
void refuse_unimplemented_features(const FieldReader& field, Architecture architecture, const json& root,
                                   const std::string& source) {
  const std::string act = field.string_or("hidden_act", "silu");
  if (act != "silu" && act != "swish")  // transformers' ACT2FN maps both to SiLU
    unsupported(source, field.where("hidden_act") + " is \"" + act +
                            "\"; Qwen3-MoE experts use silu (SwiGLU) and epic implements only that");

  // Sliding window: Qwen3MoeConfig honours sliding_window only when use_sliding_window is true
  // (its __init__ sets sliding_window = None otherwise). Qwen3OmniMoeTextConfig has no switch:
  // a sliding_window that is not null is used as it stands.
  const bool window_named = field.has("sliding_window");
  if (architecture == Architecture::kQwen3Moe) {
    if (field.boolean_or("use_sliding_window", false) && window_named)
      unsupported(source,
                  field.where("use_sliding_window") + " is true with sliding_window " +
                      shown(field.at("sliding_window")) +
                      "; epic implements full causal attention only. Set use_sliding_window to false.");
  } else if (window_named) {
    unsupported(source, field.where("sliding_window") + " is " + shown(field.at("sliding_window")) +
                            "; the Omni text model then uses sliding-window attention, and epic implements "
                            "full causal attention only. Set it to null.");
  }
  if (field.has("layer_types")) {
    const json& types = field.at("layer_types");
    if (!types.is_array()) fail(source, field.where("layer_types") + " must be a list, got " + shown(types));
    for (const json& type : types)
      if (!type.is_string() || type.get<std::string>() != "full_attention")
        unsupported(source, field.where("layer_types") + " holds " + shown(type) +
                                "; epic implements full causal attention (\"full_attention\") only");
  }

  // Bias flags: Qwen3-MoE's projections have no bias; a flag asking for one means the checkpoint
  // holds bias tensors that would be ignored.
  // (Qwen3MoeAttention reads attention_bias; its MLP hard-codes bias=False, so mlp_bias true
  // can only describe some other model's checkpoint.)
  for (const char* flag : {"attention_bias", "mlp_bias"})
    if (field.boolean_or(flag, false))
      unsupported(source, field.where(flag) +
                              " is true; Qwen3-MoE projections have no bias and epic does not "
                              "load one. Set it to false, or use a checkpoint without biases.");
  if (field.has("shared_expert_intermediate_size") && field.integer("shared_expert_intermediate_size") != 0)
    unsupported(source, field.where("shared_expert_intermediate_size") +
                            " is set; Qwen3-MoE has no shared expert and epic does not implement one");

  // Quantised checkpoints hold packed integer or fp8 weights plus scales epic does not read.
  for (const json* level :
       {text_config_member(field, "quantization_config"), member(root, "quantization_config")}) {
    if (level == nullptr) continue;
    const std::string method = level->is_object() && level->contains("quant_method")
                                   ? shown((*level)["quant_method"])
                                   : std::string("unnamed");
    unsupported(source, "config.json has a quantization_config (quant_method " + method +
                            "); epic reads bf16, f16 or f32 weights only. Use the unquantised checkpoint.");
  }
}

// int64 arithmetic that reports overflow instead of wrapping (UBSan-clean by construction).
class CheckedSize {
 public:
  CheckedSize(const std::string& source, const std::string& what) : source_(source), what_(what) {}
  CheckedSize& times(int64_t factor, const std::string& name) {
    if (__builtin_mul_overflow(value_, factor, &value_)) overflow(name);
    formula_ += (formula_.empty() ? "" : " x ") + name;
    return *this;
  }
  CheckedSize& plus(int64_t addend, const std::string& name) {
    if (__builtin_add_overflow(value_, addend, &value_)) overflow(name);
    formula_ += " + " + name;
    return *this;
  }
  int64_t value() const { return value_; }

 private:
  [[noreturn]] void overflow(const std::string& name) const {
    fail(source_,
         "the sizes in config.json make " + what_ + " (" + formula_ + (formula_.empty() ? "" : " x ") + name +
             ") larger than a 64-bit count can hold; no such model can be stored. Check these fields.");
  }
  std::string source_, what_, formula_;
  int64_t value_ = 1;
};

// The bytes of every weight group (as f32, the widest storage and compute type), of the whole
// model and of one full-length sequence's KV cache must fit int64: the loader, the placement
// planner and the KV cache multiply these sizes. A group that fits implies each of its tensors'
// element and byte counts fit.
void check_size_products(const ModelConfig& c, int64_t num_moe_layers, int64_t num_dense_layers,
                         const std::string& source) {
  constexpr int64_t kF32Bytes = 4;
  const int64_t embeddings = CheckedSize(source, "the embedding and lm_head bytes")
                                 .times(2, "2 matrices")
                                 .times(c.vocab_size, "vocab_size")
                                 .times(c.hidden_size, "hidden_size")
                                 .times(kF32Bytes, "4 bytes")
                                 .value();
  const int64_t attention = CheckedSize(source, "the attention bytes")
                                .times(c.num_attention_heads + 2 * c.num_key_value_heads,
                                       "(num_attention_heads + 2 num_key_value_heads)")
                                .times(2, "2 (in and out projections)")
                                .times(c.head_dim, "head_dim")
                                .times(c.hidden_size, "hidden_size")
                                .times(c.num_hidden_layers, "num_hidden_layers")
                                .times(kF32Bytes, "4 bytes")
                                .value();
  const int64_t experts = CheckedSize(source, "the expert bytes")
                              .times(c.num_experts, "num_experts")
                              .times(3, "3 matrices")
                              .times(c.moe_intermediate_size, "moe_intermediate_size")
                              .times(c.hidden_size, "hidden_size")
                              .times(num_moe_layers, "MoE layers")
                              .times(kF32Bytes, "4 bytes")
                              .value();
  const int64_t dense = CheckedSize(source, "the dense MLP bytes")
                            .times(3, "3 matrices")
                            .times(c.intermediate_size, "intermediate_size")
                            .times(c.hidden_size, "hidden_size")
                            .times(num_dense_layers, "dense layers")
                            .times(kF32Bytes, "4 bytes")
                            .value();
  CheckedSize(source, "the whole model's bytes")
      .times(embeddings, "embedding and lm_head bytes")
      .plus(attention, "attention bytes")
      .plus(experts, "expert bytes")
      .plus(dense, "dense MLP bytes");
  CheckedSize(source, "one full-length sequence's KV cache bytes")
      .times(c.max_position_embeddings, "max_position_embeddings")
      .times(c.num_hidden_layers, "num_hidden_layers")
      .times(2, "2 (keys and values)")
      .times(c.num_key_value_heads, "num_key_value_heads")
      .times(c.head_dim, "head_dim")
      .times(kF32Bytes, "4 bytes");
}

std::vector<int64_t> read_eos_token_ids(const json& text_config, const json& root, const std::string& path,
                                        const std::string& source) {
  std::vector<int64_t> ids;
  for (const auto& [level, prefix] : {std::pair<const json*, std::string>{&text_config, path}, {&root, ""}}) {
    if (!level->contains("eos_token_id") || (*level)["eos_token_id"].is_null()) continue;
    const FieldReader field(*level, source, prefix);
    const json& eos = (*level)["eos_token_id"];
    const std::string name = field.where("eos_token_id");
    const std::string fix = "; it must be a token id (an integer >= 0) or a list of them";
    auto one_id = [&](const json& id, const std::string& what) {
      if (!id.is_number_integer()) fail(source, what + " is " + shown(id) + fix);
      const int64_t value = field.integer_value(id, what);
      if (value < 0) fail(source, what + " is " + std::to_string(value) + fix);
      return value;
    };
    if (eos.is_array()) {
      for (size_t i = 0; i < eos.size(); ++i)
        ids.push_back(one_id(eos[i], name + "[" + std::to_string(i) + "]"));
    } else {
      ids.push_back(one_id(eos, name));
    }
    break;  // the text config's own value wins over the top level's
  }
  return ids;
}

}  // namespace

bool ModelConfig::is_moe_layer(int64_t layer) const {
  if (std::binary_search(mlp_only_layers.begin(), mlp_only_layers.end(), layer)) return false;
  return num_experts > 0 && (layer + 1) % decoder_sparse_step == 0;
}

std::string ModelConfig::layer_prefix(int64_t layer) const {
  return tensor_prefix + "layers." + std::to_string(layer) + ".";
}

ModelConfig ModelConfig::from_json_text(const std::string& text, const std::string& source) {
  LiteralScanner(text, source).run();
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
  config.architecture_name = architecture.size() > 200 ? architecture.substr(0, 200) : architecture;

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
    fail(source, "unknown architecture " + shown(json(architecture)) +
                     "; epic supports Qwen3MoeForCausalLM and Qwen3OmniMoeForConditionalGeneration "
                     "(the thinker's text model)");
  }
  const bool omni = config.architecture == Architecture::kQwen3OmniThinker;

  FieldReader field(*text_config, source, path);
  const std::string beyond = "far beyond any published model";
  config.hidden_size = field.positive_int("hidden_size", limits::kMaxHiddenSize, beyond);
  config.num_hidden_layers = field.positive_int("num_hidden_layers", limits::kMaxLayers, beyond);
  config.num_attention_heads = field.positive_int("num_attention_heads", limits::kMaxAttentionHeads, beyond);
  config.num_key_value_heads =
      field.positive_int_or("num_key_value_heads", config.num_attention_heads, config.num_attention_heads,
                            "it cannot exceed num_attention_heads");
  config.head_dim = field.positive_int_or("head_dim", config.hidden_size / config.num_attention_heads,
                                          limits::kMaxHeadDim, beyond);
  if (config.head_dim <= 0)
    fail(source, field.where("hidden_size") + " (" + std::to_string(config.hidden_size) +
                     ") is smaller than num_attention_heads, so the default head_dim is 0; add head_dim");
  config.vocab_size = field.positive_int("vocab_size", limits::kMaxVocabSize, beyond);
  // transformers' class default, 32768, for Qwen3MoeConfig and Qwen3OmniMoeTextConfig alike.
  config.max_position_embeddings =
      field.positive_int_or("max_position_embeddings", 32768, limits::kMaxPositionEmbeddings, beyond);

  // Expert count: transformers 4 and the Omni text config write num_experts; transformers 5's
  // Qwen3MoeConfig maps num_experts to num_local_experts (attribute_map) and writes that.
  config.expert_count_field = single_spelling(field, {"num_experts", "num_local_experts"});
  if (!config.expert_count_field.empty()) {
    config.num_experts = field.integer(config.expert_count_field);
    if (config.num_experts < 0) fail(source, field.where(config.expert_count_field) + " must be >= 0");
    if (config.num_experts > limits::kMaxExperts)
      fail(source, field.where(config.expert_count_field) + " is " + std::to_string(config.num_experts) +
                       ", more than the " + std::to_string(limits::kMaxExperts) + " epic accepts (" + beyond +
                       ")");
  }
  config.decoder_sparse_step = field.positive_int_or(
      "decoder_sparse_step", 1, limits::kMaxDecoderSparseStep,
      "a step beyond the largest layer count makes every layer dense; list dense layers in mlp_only_layers");
  // transformers' class defaults differ: Qwen3MoeConfig false, Qwen3OmniMoeTextConfig true.
  config.norm_topk_prob = field.boolean_or("norm_topk_prob", omni);
  config.rms_norm_eps = field.has("rms_norm_eps") ? field.finite_number("rms_norm_eps") : 1e-6;
  if (config.rms_norm_eps <= 0) fail(source, field.where("rms_norm_eps") + " must be > 0");

  // tie_word_embeddings may sit on the text config or on an outer level.
  bool tie = false;
  if (field.has("tie_word_embeddings")) {
    tie = field.boolean_or("tie_word_embeddings", false);
  } else if (omni && root["thinker_config"].contains("tie_word_embeddings")) {
    tie = FieldReader(root["thinker_config"], source, "thinker_config.")
              .boolean_or("tie_word_embeddings", false);
  } else if (root.contains("tie_word_embeddings")) {
    tie = FieldReader(root, source, "").boolean_or("tie_word_embeddings", false);
  }
  config.tie_word_embeddings = tie;

  if (field.has("mlp_only_layers")) {
    const json& layers = field.at("mlp_only_layers");
    if (!layers.is_array()) fail(source, field.where("mlp_only_layers") + " must be a list of layer indices");
    for (const json& layer : layers) {
      const bool in_range =
          layer.is_number_integer() && !layer.is_number_unsigned()
              ? layer.get<int64_t>() >= 0 && layer.get<int64_t>() < config.num_hidden_layers
              : layer.is_number_unsigned() && layer.get<uint64_t>() < uint64_t(config.num_hidden_layers);
      if (!in_range)
        fail(source, field.where("mlp_only_layers") + " holds " + shown(layer) +
                         ", which is not a layer index in [0, " + std::to_string(config.num_hidden_layers) +
                         ")");
      config.mlp_only_layers.push_back(layer.get<int64_t>());
    }
    // Sorted and unique: is_moe_layer is a binary search, and a list of a million repeats of 0
    // is one dense layer, not a million.
    std::sort(config.mlp_only_layers.begin(), config.mlp_only_layers.end());
    config.mlp_only_layers.erase(std::unique(config.mlp_only_layers.begin(), config.mlp_only_layers.end()),
                                 config.mlp_only_layers.end());
  }

  // transformers' class default theta: 10000 for Qwen3MoeConfig (transformers 4 and 5),
  // 1000000 for Qwen3OmniMoeTextConfig (its default_theta).
  config.rope_theta = read_rope_theta(field, omni ? 1000000.0 : 10000.0);
  refuse_unimplemented_features(field, config.architecture, root, source);

  if (config.num_attention_heads % config.num_key_value_heads != 0)
    fail(source, "num_attention_heads (" + std::to_string(config.num_attention_heads) +
                     ") must be a multiple of num_key_value_heads (" +
                     std::to_string(config.num_key_value_heads) + ")");
  if (config.head_dim % 2 != 0) fail(source, field.where("head_dim") + " must be even for rotary embeddings");

  int64_t num_moe_layers = 0;
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer)
    num_moe_layers += config.is_moe_layer(layer);
  const int64_t num_dense_layers = config.num_hidden_layers - num_moe_layers;
  if (num_moe_layers > 0) {
    config.moe_intermediate_size =
        field.positive_int("moe_intermediate_size", limits::kMaxIntermediateSize, beyond);
    config.num_experts_per_tok = field.positive_int("num_experts_per_tok", limits::kMaxExperts, beyond);
    if (config.num_experts_per_tok > config.num_experts)
      fail(source, field.where("num_experts_per_tok") + " (" + std::to_string(config.num_experts_per_tok) +
                       ") exceeds " + config.expert_count_field + " (" + std::to_string(config.num_experts) +
                       ")");
  }
  if (num_dense_layers > 0)
    config.intermediate_size = field.positive_int("intermediate_size", limits::kMaxIntermediateSize, beyond);
  check_size_products(config, num_moe_layers, num_dense_layers, source);

  config.eos_token_ids = read_eos_token_ids(*text_config, root, path, source);
  return config;
}

ModelConfig ModelConfig::load(const std::filesystem::path& model_dir) {
  const std::filesystem::path path = model_dir / "config.json";
  std::error_code error;
  if (!std::filesystem::exists(std::filesystem::symlink_status(path, error)))
    throw Error(ErrorCode::kInvalidArgument, path.string() +
                                                 ": no such file; --model must name a Hugging Face model "
                                                 "directory holding config.json and the safetensors weights");
  ModelConfig config =
      from_json_text(files::read_file(path, "config.json", limits::kMaxConfigFileBytes), path.string());
  // transformers' generate() stops at generation_config.json's eos_token_id when the file has one
  // (published Qwen3 models list both <|im_end|> and <|endoftext|> there, config.json only one).
  const std::filesystem::path generation_path = model_dir / "generation_config.json";
  if (std::filesystem::exists(std::filesystem::symlink_status(generation_path, error))) {
    const std::string text =
        files::read_file(generation_path, "generation_config.json", limits::kMaxConfigFileBytes);
    const std::string source = generation_path.string();
    LiteralScanner(text, source).run();
    json generation;
    try {
      generation = json::parse(text);
    } catch (const json::exception& e) {
      fail(source, std::string("is not valid JSON (") + e.what() + "); fix or remove the file");
    }
    if (!generation.is_object()) fail(source, "must hold a JSON object");
    std::vector<int64_t> eos = read_eos_token_ids(generation, generation, "", source);
    if (!eos.empty()) config.eos_token_ids = std::move(eos);
  }
  return config;
}

std::string ModelConfig::to_json_text() const {
  json text;
  text["hidden_size"] = hidden_size;
  text["num_hidden_layers"] = num_hidden_layers;
  text["num_attention_heads"] = num_attention_heads;
  text["num_key_value_heads"] = num_key_value_heads;
  text["head_dim"] = head_dim;
  text["vocab_size"] = vocab_size;
  text["max_position_embeddings"] = max_position_embeddings;
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
