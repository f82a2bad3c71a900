// Loads a Hugging Face tokenizer.json of the Qwen2/Qwen3 kind and runs its pipeline:
// added tokens -> NFC -> Qwen2 split -> GPT-2 byte-level alphabet -> BPE merges by rank.
// Every setting the file carries is either honoured or rejected with kInvalidConfig.
#include "coordinator/tokenizer.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "coordinator/added_token_matcher.h"
#include "coordinator/byte_level_bpe.h"
#include "coordinator/qwen2_pretokenizer.h"
#include "coordinator/unicode_text.h"
#include "kernels/error.h"
#include "kernels/file_io.h"

namespace epic {
namespace {

using nlohmann::json;

std::string describe(const json& value) {
  std::string text = value.dump();
  if (text.size() > 200) text = text.substr(0, 200) + "...";
  return text;
}

// Everything load() reads.
struct TokenizerState {
  std::string source;  // the tokenizer.json path, for error messages
  bool normalize_nfc = false;
  std::unique_ptr<ByteLevelBpe> bpe;

  std::vector<std::unique_ptr<AddedToken>> added_tokens;
  std::unordered_map<std::string, int32_t> added_token_ids;  // content -> id
  AddedTokenMatcher raw_matcher;                             // added tokens with normalized == false
  AddedTokenMatcher normalized_matcher;  // added tokens with normalized == true (matched after NFC)

  // Per id: the token string and the bytes it decodes to; ids missing from both the vocabulary
  // and the added tokens (gaps in the numbering) have has_token false.
  std::vector<std::string> id_to_token;
  std::vector<std::string> id_to_bytes;
  std::vector<bool> has_token;
};

[[noreturn]] void fail_config(const std::string& source, const std::string& what) {
  throw Error(ErrorCode::kInvalidConfig,
              "tokenizer.json '" + source + "': " + what +
                  ". epic reads the byte-level BPE tokenizer.json of Qwen2/Qwen3 models; pass the "
                  "tokenizer.json that ships with the model");
}

const json& require_field(const json& object, const char* key, const std::string& where,
                          const std::string& source) {
  if (!object.is_object() || !object.contains(key)) fail_config(source, "missing field " + where + "." + key);
  return object.at(key);
}

bool optional_bool(const json& object, const char* key, bool fallback, const std::string& where,
                   const std::string& source) {
  if (!object.contains(key) || object.at(key).is_null()) return fallback;
  if (!object.at(key).is_boolean()) {
    fail_config(source, where + "." + key + " must be true or false, not " + describe(object.at(key)));
  }
  return object.at(key).get<bool>();
}

void check_empty_or_null_string(const json& model, const char* key, const std::string& source) {
  if (!model.contains(key) || model.at(key).is_null()) return;
  if (!model.at(key).is_string() || !model.at(key).get<std::string>().empty()) {
    fail_config(source, std::string("model.") + key + " is " + describe(model.at(key)) +
                            ", but only an empty or null value is supported");
  }
}

void check_normalizer(const json& root, TokenizerState& impl) {
  const json& normalizer = require_field(root, "normalizer", "<root>", impl.source);
  if (normalizer.is_null()) return;
  const json& type = require_field(normalizer, "type", "normalizer", impl.source);
  if (type != "NFC") {
    fail_config(impl.source, "normalizer " + describe(normalizer) + " is not supported (only null or NFC)");
  }
  impl.normalize_nfc = true;
}

void check_pre_tokenizer(const json& root, const std::string& source) {
  const json& pre_tokenizer = require_field(root, "pre_tokenizer", "<root>", source);
  const std::string expected =
      "a Sequence of Split(Qwen2 regex, behavior Isolated, invert false) and ByteLevel(add_prefix_space "
      "false, use_regex false)";
  const json& type = require_field(pre_tokenizer, "type", "pre_tokenizer", source);
  if (type != "Sequence")
    fail_config(source, "pre_tokenizer.type is " + describe(type) + ", expected " + expected);
  const json& steps = require_field(pre_tokenizer, "pretokenizers", "pre_tokenizer", source);
  if (!steps.is_array() || steps.size() != 2) {
    fail_config(source, "pre_tokenizer.pretokenizers is " + describe(steps) + ", expected " + expected);
  }
  const json& split = steps[0];
  const json& pattern = require_field(split, "pattern", "pre_tokenizer.pretokenizers[0]", source);
  if (require_field(split, "type", "pre_tokenizer.pretokenizers[0]", source) != "Split" ||
      !pattern.is_object() || !pattern.contains("Regex") ||
      pattern.at("Regex") != std::string(kQwen2SplitPattern) || split.value("behavior", "") != "Isolated" ||
      split.value("invert", false)) {
    fail_config(source, "pre_tokenizer.pretokenizers[0] is " + describe(split) + ", expected " + expected);
  }
  const json& byte_level = steps[1];
  if (require_field(byte_level, "type", "pre_tokenizer.pretokenizers[1]", source) != "ByteLevel" ||
      optional_bool(byte_level, "add_prefix_space", true, "pre_tokenizer.pretokenizers[1]", source) ||
      optional_bool(byte_level, "use_regex", true, "pre_tokenizer.pretokenizers[1]", source)) {
    fail_config(source,
                "pre_tokenizer.pretokenizers[1] is " + describe(byte_level) + ", expected " + expected);
  }
}

void check_decoder(const json& root, const std::string& source) {
  const json& decoder = require_field(root, "decoder", "<root>", source);
  if (decoder.is_null() || decoder.value("type", "") != "ByteLevel") {
    fail_config(source, "decoder " + describe(decoder) + " is not supported (only ByteLevel)");
  }
}

void load_model(const json& root, TokenizerState& impl) {
  const std::string& source = impl.source;
  const json& model = require_field(root, "model", "<root>", source);
  const json& type = require_field(model, "type", "model", source);
  if (type != "BPE") {
    fail_config(source, "model.type is " + describe(type) + ", but only \"BPE\" is supported");
  }
  if (model.contains("dropout") && !model.at("dropout").is_null() &&
      model.at("dropout").get<double>() != 0.0) {
    fail_config(source, "model.dropout is " + describe(model.at("dropout")) +
                            " (random merges are for training); set it to null");
  }
  check_empty_or_null_string(model, "continuing_subword_prefix", source);
  check_empty_or_null_string(model, "end_of_word_suffix", source);
  const bool ignore_merges = optional_bool(model, "ignore_merges", false, "model", source);
  // byte_fallback only acts on characters missing from the vocabulary; the check below that all
  // 256 byte tokens exist means none are, so the setting needs no code of its own.
  optional_bool(model, "byte_fallback", false, "model", source);

  const json& vocab_json = require_field(model, "vocab", "model", source);
  if (!vocab_json.is_object() || vocab_json.empty())
    fail_config(source, "model.vocab must be a non-empty object");
  std::unordered_map<std::string, int32_t> vocab;
  vocab.reserve(vocab_json.size());
  int32_t max_id = -1;
  for (const auto& [token, id_value] : vocab_json.items()) {
    if (!id_value.is_number_integer() || id_value.get<int64_t>() < 0 ||
        id_value.get<int64_t>() >= INT32_MAX) {
      fail_config(source, "model.vocab[\"" + token + "\"] is " + describe(id_value) + ", not a token id");
    }
    const auto id = id_value.get<int32_t>();
    vocab.emplace(token, id);
    max_id = std::max(max_id, id);
  }
  impl.id_to_token.resize(static_cast<size_t>(max_id) + 1);
  impl.has_token.assign(static_cast<size_t>(max_id) + 1, false);
  for (const auto& [token, id] : vocab) {
    impl.id_to_token[id] = token;
    impl.has_token[id] = true;
  }

  for (int byte = 0; byte < 256; ++byte) {
    const std::string& character = byte_level_character(static_cast<uint8_t>(byte));
    if (!vocab.contains(character)) {
      fail_config(source, "model.vocab has no token for byte " + std::to_string(byte) + " (\"" + character +
                              "\"), so it is not a byte-level vocabulary");
    }
  }

  const json& merges = require_field(model, "merges", "model", source);
  if (!merges.is_array()) fail_config(source, "model.merges must be an array");
  std::unordered_map<uint64_t, BpeMerge> merge_ranks;
  merge_ranks.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const json& merge = merges[rank];
    std::string left, right;
    if (merge.is_string()) {  // older files: "left right"
      const std::string text = merge.get<std::string>();
      const size_t space = text.find(' ');
      if (space == std::string::npos)
        fail_config(source, "model.merges[" + std::to_string(rank) + "] is " + describe(merge) +
                                ", not \"left right\"");
      left = text.substr(0, space);
      right = text.substr(space + 1);
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() && merge[1].is_string()) {
      left = merge[0].get<std::string>();
      right = merge[1].get<std::string>();
    } else {
      fail_config(source, "model.merges[" + std::to_string(rank) + "] is " + describe(merge) +
                              ", not a pair of tokens");
    }
    const auto left_it = vocab.find(left);
    const auto right_it = vocab.find(right);
    const auto merged_it = vocab.find(left + right);
    if (left_it == vocab.end() || right_it == vocab.end() || merged_it == vocab.end()) {
      fail_config(source, "model.merges[" + std::to_string(rank) + "] " + describe(merge) +
                              " uses a token that is not in model.vocab");
    }
    // A repeated pair keeps its last rank, as both Hugging Face and transformers.js build the map.
    merge_ranks.insert_or_assign(ByteLevelBpe::pair_key(left_it->second, right_it->second),
                                 BpeMerge{static_cast<int32_t>(rank), merged_it->second});
  }
  impl.bpe = std::make_unique<ByteLevelBpe>(std::move(vocab), std::move(merge_ranks), ignore_merges);
}

void load_added_tokens(const json& root, TokenizerState& impl) {
  const std::string& source = impl.source;
  if (!root.contains("added_tokens") || root.at("added_tokens").is_null()) return;
  const json& added_tokens = root.at("added_tokens");
  if (!added_tokens.is_array()) fail_config(source, "added_tokens must be an array");
  for (size_t i = 0; i < added_tokens.size(); ++i) {
    const std::string where = "added_tokens[" + std::to_string(i) + "]";
    const json& entry = added_tokens[i];
    const json& id = require_field(entry, "id", where, source);
    const json& content = require_field(entry, "content", where, source);
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= INT32_MAX) {
      fail_config(source, where + ".id is " + describe(id) + ", not a token id");
    }
    if (!content.is_string() || content.get<std::string>().empty()) {
      fail_config(source, where + ".content must be a non-empty string");
    }
    auto token = std::make_unique<AddedToken>();
    token->id = id.get<int32_t>();
    token->content = content.get<std::string>();
    token->special = optional_bool(entry, "special", false, where, source);
    token->single_word = optional_bool(entry, "single_word", false, where, source);
    token->lstrip = optional_bool(entry, "lstrip", false, where, source);
    token->rstrip = optional_bool(entry, "rstrip", false, where, source);
    token->normalized = optional_bool(entry, "normalized", !token->special, where, source);
    token->pattern =
        token->normalized && impl.normalize_nfc ? unicode::to_nfc(token->content) : token->content;
    // Hugging Face gives an added token that is also a vocabulary token the vocabulary's id,
    // whatever added_tokens says; a file where the two differ would encode differently there.
    if (const auto it = impl.bpe->vocab().find(token->content);
        it != impl.bpe->vocab().end() && it->second != token->id) {
      fail_config(source, where + " (\"" + token->content + "\") has id " + std::to_string(token->id) +
                              " but is token " + std::to_string(it->second) + " of model.vocab");
    }
    impl.added_token_ids[token->content] = token->id;
    impl.added_tokens.push_back(std::move(token));
  }
  for (const auto& token : impl.added_tokens) {
    (token->normalized ? impl.normalized_matcher : impl.raw_matcher).add(token.get());
    const auto id = static_cast<size_t>(token->id);
    if (id >= impl.id_to_token.size()) {
      impl.id_to_token.resize(id + 1);
      impl.has_token.resize(id + 1, false);
    }
    impl.id_to_token[id] = token->content;  // an added token takes precedence over the vocabulary
    impl.has_token[id] = true;
  }
}

}  // namespace

struct Tokenizer::Impl : TokenizerState {};

Tokenizer Tokenizer::load(const std::filesystem::path& tokenizer_json) {
  auto impl = std::make_unique<Impl>();
  impl->source = tokenizer_json.string();
  // Through epic::files: a FIFO, directory or device is refused at once, never read or waited on.
  // Qwen3's tokenizer.json is 11 MB; 1 GiB bounds a wrong path to a huge file.
  const std::string contents = files::read_file(tokenizer_json, "tokenizer.json", uint64_t{1} << 30);
  json root;
  try {
    root = json::parse(contents);
  } catch (const json::exception& error) {
    throw Error(ErrorCode::kInvalidConfig, "tokenizer.json '" + impl->source + "' is not valid JSON (" +
                                               error.what() +
                                               "); pass the model's tokenizer.json, not a "
                                               "download error page or a truncated copy");
  }
  if (!root.is_object()) fail_config(impl->source, "the top level is " + describe(root) + ", not an object");
  try {
    check_normalizer(root, *impl);
    check_pre_tokenizer(root, impl->source);
    check_decoder(root, impl->source);
    load_model(root, *impl);
    load_added_tokens(root, *impl);
  } catch (const json::exception& error) {  // a field of an unexpected JSON type
    fail_config(impl->source, std::string("a field has an unexpected type (") + error.what() + ")");
  }
  impl->id_to_bytes.resize(impl->id_to_token.size());
  for (size_t id = 0; id < impl->id_to_token.size(); ++id) {
    if (impl->has_token[id]) impl->id_to_bytes[id] = byte_level_token_bytes(impl->id_to_token[id]);
  }
  return Tokenizer(std::move(impl));
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  if (const auto bad = unicode::find_invalid_utf8(text)) {
    throw Error(ErrorCode::kInvalidArgument,
                "tokenizer: the text to encode is not valid UTF-8 at byte offset " + std::to_string(*bad) +
                    " (of " + std::to_string(text.size()) + "); decode it to UTF-8 before tokenizing");
  }
  std::vector<TextSegment> raw_segments;
  impl_->raw_matcher.split(text, raw_segments);
  std::vector<TextSegment> segments;
  for (TextSegment& segment : raw_segments) {
    if (segment.added_token_id) {
      segments.push_back(std::move(segment));
      continue;
    }
    if (impl_->normalize_nfc) segment.text = unicode::to_nfc(segment.text);
    if (impl_->normalized_matcher.empty()) {
      segments.push_back(std::move(segment));
    } else {
      impl_->normalized_matcher.split(segment.text, segments);
    }
  }
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 1);
  for (const TextSegment& segment : segments) {
    if (segment.added_token_id) {
      ids.push_back(*segment.added_token_id);
      continue;
    }
    for (std::string_view word : split_qwen2_pretokens(segment.text)) impl_->bpe->encode_word(word, ids);
  }
  return ids;
}

std::string Tokenizer::decode(std::span<const int32_t> ids) const {
  return unicode::utf8_lossy(decode_bytes(ids));
}

std::string Tokenizer::decode_bytes(std::span<const int32_t> ids) const {
  std::string bytes;
  for (size_t i = 0; i < ids.size(); ++i) {
    const int32_t id = ids[i];
    if (id < 0) {
      throw Error(ErrorCode::kInvalidArgument, "tokenizer: cannot decode token id " + std::to_string(id) +
                                                   " (position " + std::to_string(i) +
                                                   "): token ids are non-negative");
    }
    // An id with no text (past the tokenizer's last id, as Qwen3's padded vocabulary rows 151669..
    // 151935 are, or a gap) decodes to nothing, as Hugging Face tokenizers' decode skips ids
    // id_to_token does not know. Whether an id fits the model is the caller's check.
    if (static_cast<size_t>(id) >= impl_->has_token.size() || !impl_->has_token[id]) continue;
    bytes += impl_->id_to_bytes[id];
  }
  return bytes;
}

int64_t Tokenizer::vocab_size() const { return static_cast<int64_t>(impl_->has_token.size()); }

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  const std::string key(token);
  if (const auto it = impl_->added_token_ids.find(key); it != impl_->added_token_ids.end()) return it->second;
  if (const auto it = impl_->bpe->vocab().find(key); it != impl_->bpe->vocab().end()) return it->second;
  return std::nullopt;
}

}  // namespace epic
