// UTF-8 decoding/encoding by hand (the hot path of encode), NFC and character classes via ICU.
#include "coordinator/unicode_text.h"

#include <unicode/uchar.h>
#include <unicode/unorm2.h>
#include <unicode/ustring.h>

#include <algorithm>
#include <vector>

#include "kernels/error.h"

namespace epic::unicode {
namespace {

// Length of the well-formed prefix (1..4 bytes) of the sequence starting at bytes[pos], and
// whether it is a complete code point. Follows Table 3-7 of the Unicode standard: the second
// byte's range depends on the lead byte, which rules out overlongs, surrogates and > U+10FFFF.
struct SequenceCheck {
  size_t length;  // bytes that belong to this (possibly truncated) sequence, at least 1
  bool complete;
};

SequenceCheck check_sequence(std::string_view bytes, size_t pos) {
  const auto byte_at = [&](size_t i) { return static_cast<unsigned char>(bytes[i]); };
  const unsigned char lead = byte_at(pos);
  if (lead < 0x80) return {1, true};
  size_t num_continuation = 0;
  unsigned char second_low = 0x80, second_high = 0xBF;
  if (lead >= 0xC2 && lead <= 0xDF) {
    num_continuation = 1;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    num_continuation = 2;
    if (lead == 0xE0) second_low = 0xA0;
    if (lead == 0xED) second_high = 0x9F;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    num_continuation = 3;
    if (lead == 0xF0) second_low = 0x90;
    if (lead == 0xF4) second_high = 0x8F;
  } else {
    return {1, false};  // a continuation byte, C0, C1 or F5..FF cannot start a sequence
  }
  size_t length = 1;
  for (size_t k = 0; k < num_continuation; ++k) {
    if (pos + length >= bytes.size()) return {length, false};
    const unsigned char low = k == 0 ? second_low : 0x80;
    const unsigned char high = k == 0 ? second_high : 0xBF;
    const unsigned char next = byte_at(pos + length);
    if (next < low || next > high) return {length, false};
    ++length;
  }
  return {length, true};
}

bool has_category(char32_t code_point, uint32_t mask) {
  return (U_GET_GC_MASK(static_cast<UChar32>(code_point)) & mask) != 0;
}

std::u16string to_utf16(std::string_view text) {
  std::u16string out(text.size(), u'\0');  // UTF-16 never needs more units than UTF-8 bytes
  int32_t length = 0;
  UErrorCode status = U_ZERO_ERROR;
  u_strFromUTF8(reinterpret_cast<UChar*>(out.data()), static_cast<int32_t>(out.size()), &length, text.data(),
                static_cast<int32_t>(text.size()), &status);
  EPIC_CHECK(U_SUCCESS(status), ErrorCode::kInternal,
             std::string("tokenizer: ICU u_strFromUTF8 failed: ") + u_errorName(status));
  out.resize(static_cast<size_t>(length));
  return out;
}

std::string to_utf8(std::u16string_view text) {
  std::string out(text.size() * 3, '\0');  // one UTF-16 unit is at most 3 UTF-8 bytes
  int32_t length = 0;
  UErrorCode status = U_ZERO_ERROR;
  u_strToUTF8(out.data(), static_cast<int32_t>(out.size()), &length,
              reinterpret_cast<const UChar*>(text.data()), static_cast<int32_t>(text.size()), &status);
  EPIC_CHECK(U_SUCCESS(status), ErrorCode::kInternal,
             std::string("tokenizer: ICU u_strToUTF8 failed: ") + u_errorName(status));
  out.resize(static_cast<size_t>(length));
  return out;
}

}  // namespace

std::optional<size_t> find_invalid_utf8(std::string_view text) {
  size_t pos = 0;
  while (pos < text.size()) {
    if (static_cast<unsigned char>(text[pos]) < 0x80) {
      ++pos;
      continue;
    }
    const SequenceCheck check = check_sequence(text, pos);
    if (!check.complete) return pos;
    pos += check.length;
  }
  return std::nullopt;
}

char32_t next_code_point(std::string_view text, size_t& pos) {
  const auto byte_at = [&](size_t i) { return static_cast<char32_t>(static_cast<unsigned char>(text[i])); };
  const char32_t lead = byte_at(pos);
  if (lead < 0x80) {
    pos += 1;
    return lead;
  }
  if (lead < 0xE0) {
    const char32_t code_point = ((lead & 0x1F) << 6) | (byte_at(pos + 1) & 0x3F);
    pos += 2;
    return code_point;
  }
  if (lead < 0xF0) {
    const char32_t code_point =
        ((lead & 0x0F) << 12) | ((byte_at(pos + 1) & 0x3F) << 6) | (byte_at(pos + 2) & 0x3F);
    pos += 3;
    return code_point;
  }
  const char32_t code_point = ((lead & 0x07) << 18) | ((byte_at(pos + 1) & 0x3F) << 12) |
                              ((byte_at(pos + 2) & 0x3F) << 6) | (byte_at(pos + 3) & 0x3F);
  pos += 4;
  return code_point;
}

char32_t previous_code_point(std::string_view text, size_t& pos) {
  size_t start = pos - 1;
  while (start > 0 && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) --start;
  size_t cursor = start;
  const char32_t code_point = next_code_point(text, cursor);
  pos = start;
  return code_point;
}

void append_utf8(std::string& out, char32_t code_point) {
  if (code_point < 0x80) {
    out.push_back(static_cast<char>(code_point));
  } else if (code_point < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (code_point >> 6)));
    out.push_back(static_cast<char>(0x80 | (code_point & 0x3F)));
  } else if (code_point < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (code_point >> 12)));
    out.push_back(static_cast<char>(0x80 | ((code_point >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (code_point & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (code_point >> 18)));
    out.push_back(static_cast<char>(0x80 | ((code_point >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((code_point >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (code_point & 0x3F)));
  }
}

std::string utf8_lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  size_t pos = 0;
  while (pos < bytes.size()) {
    const SequenceCheck check = check_sequence(bytes, pos);
    if (check.complete) {
      out.append(bytes.substr(pos, check.length));
    } else {
      out.append("\xEF\xBF\xBD");  // U+FFFD for the maximal ill-formed subpart
    }
    pos += check.length;
  }
  return out;
}

std::string to_nfc(std::string_view text) {
  if (std::all_of(text.begin(), text.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80; })) {
    return std::string(text);  // ASCII is always NFC
  }
  UErrorCode status = U_ZERO_ERROR;
  const UNormalizer2* nfc = unorm2_getNFCInstance(&status);
  EPIC_CHECK(U_SUCCESS(status), ErrorCode::kInternal,
             std::string("tokenizer: ICU has no NFC data (unorm2_getNFCInstance: ") + u_errorName(status) +
                 "); install the ICU data package (libicu72 on Debian)");
  const std::u16string utf16 = to_utf16(text);
  const auto* source = reinterpret_cast<const UChar*>(utf16.data());
  const auto source_length = static_cast<int32_t>(utf16.size());
  const int32_t normalized_prefix = unorm2_spanQuickCheckYes(nfc, source, source_length, &status);
  EPIC_CHECK(U_SUCCESS(status), ErrorCode::kInternal,
             std::string("tokenizer: ICU unorm2_spanQuickCheckYes failed: ") + u_errorName(status));
  if (normalized_prefix == source_length) return std::string(text);

  std::vector<UChar> normalized(static_cast<size_t>(source_length) * 3 + 16);
  int32_t length = unorm2_normalize(nfc, source, source_length, normalized.data(),
                                    static_cast<int32_t>(normalized.size()), &status);
  if (status == U_BUFFER_OVERFLOW_ERROR) {
    status = U_ZERO_ERROR;
    normalized.resize(static_cast<size_t>(length));
    length = unorm2_normalize(nfc, source, source_length, normalized.data(), length, &status);
  }
  EPIC_CHECK(U_SUCCESS(status), ErrorCode::kInternal,
             std::string("tokenizer: ICU unorm2_normalize (NFC) failed: ") + u_errorName(status));
  return to_utf8(
      std::u16string_view(reinterpret_cast<const char16_t*>(normalized.data()), static_cast<size_t>(length)));
}

bool is_letter(char32_t code_point) {
  if (code_point < 0x80) return (code_point | 0x20) >= 'a' && (code_point | 0x20) <= 'z';
  return has_category(code_point, U_GC_L_MASK);
}

bool is_number(char32_t code_point) {
  if (code_point < 0x80) return code_point >= '0' && code_point <= '9';
  return has_category(code_point, U_GC_N_MASK);
}

bool is_whitespace(char32_t code_point) {
  if (code_point < 0x80) return code_point == ' ' || (code_point >= 0x09 && code_point <= 0x0D);
  return u_isUWhiteSpace(static_cast<UChar32>(code_point));
}

bool is_word_character(char32_t code_point) {
  const auto c = static_cast<UChar32>(code_point);
  return u_hasBinaryProperty(c, UCHAR_ALPHABETIC) ||
         has_category(code_point, U_GC_M_MASK | U_GC_ND_MASK | U_GC_PC_MASK) ||
         u_hasBinaryProperty(c, UCHAR_JOIN_CONTROL);
}

}  // namespace epic::unicode
