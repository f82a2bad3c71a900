// Matching is on UTF-8 bytes: patterns are valid UTF-8, so a match always starts and ends on
// character boundaries; the options then look at whole characters around the match.
#include "coordinator/added_token_matcher.h"

#include <algorithm>

#include "coordinator/unicode_text.h"

namespace epic {
namespace {

// single_word: no \w character right before or right after the match.
bool is_single_word(std::string_view text, size_t start, size_t stop) {
  if (start > 0) {
    size_t previous = start;
    if (unicode::is_word_character(unicode::previous_code_point(text, previous))) return false;
  }
  if (stop < text.size()) {
    size_t next = stop;
    if (unicode::is_word_character(unicode::next_code_point(text, next))) return false;
  }
  return true;
}

}  // namespace

void AddedTokenMatcher::add(const AddedToken* token) {
  auto& bucket = tokens_by_first_byte_[static_cast<unsigned char>(token->pattern[0])];
  bucket.push_back(token);
  std::stable_sort(bucket.begin(), bucket.end(), [](const AddedToken* a, const AddedToken* b) {
    return a->pattern.size() > b->pattern.size();
  });
  ++num_tokens_;
}

const AddedToken* AddedTokenMatcher::longest_match_at(std::string_view text, size_t pos) const {
  for (const AddedToken* token : tokens_by_first_byte_[static_cast<unsigned char>(text[pos])]) {
    if (text.substr(pos, token->pattern.size()) == token->pattern) return token;
  }
  return nullptr;
}

void AddedTokenMatcher::split(std::string_view text, std::vector<TextSegment>& out) const {
  size_t segment_start = 0;  // start of the text not yet emitted
  size_t pos = 0;
  while (pos < text.size()) {
    const AddedToken* token = longest_match_at(text, pos);
    if (token == nullptr) {
      ++pos;
      continue;
    }
    size_t start = pos;
    size_t stop = pos + token->pattern.size();
    pos = stop;  // like the Aho-Corasick iterator, the search goes on after the raw match
    if (token->single_word && !is_single_word(text, start, stop)) continue;
    if (token->lstrip) {  // the token takes the whitespace before it, down to the last segment
      while (start > segment_start) {
        size_t previous = start;
        if (!unicode::is_whitespace(unicode::previous_code_point(text, previous))) break;
        start = previous;
      }
    }
    if (token->rstrip) {  // and/or the whitespace after it
      while (stop < text.size()) {
        size_t next = stop;
        if (!unicode::is_whitespace(unicode::next_code_point(text, next))) break;
        stop = next;
      }
      // Hugging Face searches on from the raw match end and could then overlap the stripped
      // whitespace (only with added tokens that begin with whitespace); epic keeps segments disjoint.
      pos = stop;
    }
    if (segment_start < start)
      out.push_back({std::string(text.substr(segment_start, start - segment_start)), {}});
    out.push_back({std::string(text.substr(start, stop - start)), token->id});
    segment_start = stop;
  }
  if (segment_start < text.size()) out.push_back({std::string(text.substr(segment_start)), {}});
}

}  // namespace epic
