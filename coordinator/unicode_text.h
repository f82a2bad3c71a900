// UTF-8 and Unicode helpers of the tokenizer: strict and lossy UTF-8 decoding, NFC, and the
// character classes that the Qwen2 split regex and added-token matching use (through ICU).
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

namespace epic::unicode {

// Byte offset of the first byte that does not start a well-formed UTF-8 sequence (overlong
// forms, surrogates and values above U+10FFFF included), or nullopt when all of text is valid.
std::optional<size_t> find_invalid_utf8(std::string_view text);

// Decodes the code point at text[pos] and advances pos past it; text must be valid UTF-8.
char32_t next_code_point(std::string_view text, size_t& pos);
// Decodes the code point that ends at text[pos - 1] and moves pos to its start; valid UTF-8.
char32_t previous_code_point(std::string_view text, size_t& pos);
void append_utf8(std::string& out, char32_t code_point);

// Bytes -> UTF-8 text with every maximal ill-formed subpart replaced by one U+FFFD: the policy
// of Rust's String::from_utf8_lossy and of the WHATWG TextDecoder, so decode matches both.
std::string utf8_lossy(std::string_view bytes);

// NFC of valid UTF-8 text (ASCII-only and already-NFC text come back without copying work).
std::string to_nfc(std::string_view text);

// \p{L}, \p{N}: general categories L* and N*.
bool is_letter(char32_t code_point);
bool is_number(char32_t code_point);
// \s of the Oniguruma and Rust regex engines that Hugging Face tokenizers uses: the Unicode
// White_Space property (so U+0085 is whitespace and U+FEFF is not, unlike JavaScript's \s).
bool is_whitespace(char32_t code_point);
// \w of the Rust regex crate (added tokens' single_word): Alphabetic, M, Nd, Pc, Join_Control.
bool is_word_character(char32_t code_point);

}  // namespace epic::unicode
