// Extraction of added tokens (<|im_start|>, <think>, ...) from text before pre-tokenization:
// leftmost-longest matching with the single_word / lstrip / rstrip options of tokenizer.json.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace epic {

struct AddedToken {
  int32_t id = 0;
  std::string content;
  std::string pattern;  // what is matched: content, or its NFC when normalized under an NFC normalizer
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = false;
  bool special = false;
};

// One piece of text after extraction: an added token's id, or text still to be tokenized.
struct TextSegment {
  std::string text;
  std::optional<int32_t> added_token_id;
};

// Finds a set of added tokens the way Hugging Face's AddedVocabulary::find_matches does.
class AddedTokenMatcher {
 public:
  // The token must outlive the matcher and have a non-empty pattern.
  void add(const AddedToken* token);
  bool empty() const { return num_tokens_ == 0; }

  // Appends the segments of text to out, in order; no empty text segments.
  void split(std::string_view text, std::vector<TextSegment>& out) const;

 private:
  const AddedToken* longest_match_at(std::string_view text, size_t pos) const;

  std::array<std::vector<const AddedToken*>, 256> tokens_by_first_byte_;  // longest first
  size_t num_tokens_ = 0;
};

}  // namespace epic
