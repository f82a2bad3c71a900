// The Split pre-tokenizer of Qwen2/Qwen3 tokenizer.json files, a hand-written matcher of
//   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|
//   ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
// with the semantics of the Oniguruma engine that Hugging Face tokenizers runs it with.
#pragma once

#include <string_view>
#include <vector>

namespace epic {

// The regex exactly as tokenizer.json spells it (pre_tokenizer.pretokenizers[0].pattern.Regex).
inline constexpr std::string_view kQwen2SplitPattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// Splits valid UTF-8 text into the consecutive matches of the pattern ("Isolated" behaviour);
// the pieces are views into text and concatenate back to it.
std::vector<std::string_view> split_qwen2_pretokens(std::string_view text);

}  // namespace epic
