// Each alternative of the split regex is tried in order at the current position, as a
// backtracking engine would; the comments give the end position each one settles on.
#include "coordinator/qwen2_pretokenizer.h"

#include <cstdint>

#include "coordinator/unicode_text.h"

namespace epic {
namespace {

enum CharClass : uint8_t {
  kLetter = 1 << 0,      // \p{L}
  kNumber = 1 << 1,      // \p{N}
  kWhitespace = 1 << 2,  // \s
  kLineBreak = 1 << 3,   // [\r\n]
};

struct DecodedText {
  std::vector<char32_t> code_points;
  std::vector<uint8_t> classes;
  std::vector<size_t> byte_offsets;  // one per code point, plus the end of the text
};

DecodedText decode(std::string_view text) {
  DecodedText decoded;
  decoded.code_points.reserve(text.size());
  decoded.classes.reserve(text.size());
  decoded.byte_offsets.reserve(text.size() + 1);
  size_t pos = 0;
  while (pos < text.size()) {
    decoded.byte_offsets.push_back(pos);
    const char32_t c = unicode::next_code_point(text, pos);
    uint8_t char_class = 0;
    if (unicode::is_letter(c)) char_class |= kLetter;
    if (unicode::is_number(c)) char_class |= kNumber;
    if (unicode::is_whitespace(c)) char_class |= kWhitespace;
    if (c == '\r' || c == '\n') char_class |= kLineBreak;
    decoded.code_points.push_back(c);
    decoded.classes.push_back(char_class);
  }
  decoded.byte_offsets.push_back(text.size());
  return decoded;
}

char32_t ascii_lower(char32_t c) { return (c >= 'A' && c <= 'Z') ? c + ('a' - 'A') : c; }

// End (exclusive, in code points) of the match starting at i; always > i.
size_t match_at(const DecodedText& text, size_t i) {
  const std::vector<char32_t>& cp = text.code_points;
  const std::vector<uint8_t>& cls = text.classes;
  const size_t n = cp.size();
  const auto is = [&](size_t k, uint8_t mask) { return k < n && (cls[k] & mask) != 0; };
  // [^\s\p{L}\p{N}]
  const auto is_symbol = [&](size_t k) { return k < n && (cls[k] & (kWhitespace | kLetter | kNumber)) == 0; };

  // (?i:'s|'t|'re|'ve|'m|'ll|'d): Oniguruma folds only ASCII here (U+017F does not match 's').
  if (cp[i] == '\'' && i + 1 < n) {
    const char32_t first = ascii_lower(cp[i + 1]);
    if (first == 's' || first == 't' || first == 'm' || first == 'd') return i + 2;
    if (i + 2 < n) {
      const char32_t second = ascii_lower(cp[i + 2]);
      if ((first == 'r' && second == 'e') || (first == 'v' && second == 'e') ||
          (first == 'l' && second == 'l')) {
        return i + 3;
      }
    }
  }
  // [^\r\n\p{L}\p{N}]?\p{L}+
  {
    size_t j = i;
    if (!is(i, kLetter | kNumber | kLineBreak) && is(i + 1, kLetter)) j = i + 1;
    if (is(j, kLetter)) {
      while (is(j, kLetter)) ++j;
      return j;
    }
  }
  // \p{N}
  if (is(i, kNumber)) return i + 1;
  // ' ?[^\s\p{L}\p{N}]+[\r\n]*' (without the space the first character, a space, is \s)
  {
    size_t j = cp[i] == ' ' ? i + 1 : i;
    if (is_symbol(j)) {
      while (is_symbol(j)) ++j;
      while (is(j, kLineBreak)) ++j;
      return j;
    }
  }
  if (is(i, kWhitespace)) {
    size_t run_end = i;
    while (is(run_end, kWhitespace)) ++run_end;
    // \s*[\r\n]+: \s* gives back characters until a line break follows it; that is the last
    // line break of the run, and [\r\n]+ cannot extend past it (only non-breaks follow).
    for (size_t k = run_end; k > i; --k) {
      if (cls[k - 1] & kLineBreak) return k;
    }
    // \s+(?!\S): the whole run at the end of the text, else the run minus its last character
    // (which is whitespace, so the lookahead holds there), if that leaves at least one.
    if (run_end == n) return run_end;
    if (run_end - i >= 2) return run_end - 1;
    // \s+
    return run_end;
  }
  return i + 1;  // unreachable: every character is a letter, number, symbol or whitespace
}

}  // namespace

std::vector<std::string_view> split_qwen2_pretokens(std::string_view text) {
  const DecodedText decoded = decode(text);
  std::vector<std::string_view> pieces;
  size_t i = 0;
  while (i < decoded.code_points.size()) {
    const size_t end = match_at(decoded, i);
    const size_t begin_byte = decoded.byte_offsets[i];
    pieces.push_back(text.substr(begin_byte, decoded.byte_offsets[end] - begin_byte));
    i = end;
  }
  return pieces;
}

}  // namespace epic
