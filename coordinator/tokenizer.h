// Byte-level BPE tokenizer of Qwen2/Qwen3 models, read from a Hugging Face tokenizer.json:
// added/special tokens are split out first, the rest is pre-tokenized with the Qwen2 split
// regex, mapped to the GPT-2 byte-level alphabet, and merged by BPE rank.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace epic {

class Tokenizer {
 public:
  // Throws Error(kInvalidArgument) when the path is missing or not a regular file (a FIFO,
  // directory or device is refused without being opened), Error(kIo) when reading fails and
  // Error(kInvalidConfig) when it is not a byte-level BPE tokenizer.json (the message says which
  // field is missing or unsupported).
  static Tokenizer load(const std::filesystem::path& tokenizer_json);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // No special tokens are added; added-token strings in the text map to their ids.
  std::vector<int32_t> encode(std::string_view text) const;
  // As Hugging Face tokenizers' decode: an id the tokenizer has no text for (past its last id,
  // e.g. Qwen3's padded vocabulary rows, or a gap) decodes to nothing, and byte sequences that
  // are not valid UTF-8 decode to U+FFFD. A negative id -> Error(kInvalidArgument) naming it;
  // whether ids fit the model's vocabulary is the caller's check.
  std::string decode(std::span<const int32_t> ids) const;
  // The same bytes before the UTF-8 cleanup: a character split across tokens stays split, so a stream
  // can hold its first bytes back until the rest arrive (coordinator/completion_text.h).
  std::string decode_bytes(std::span<const int32_t> ids) const;

  // One past the largest token id (regular vocabulary and added tokens).
  int64_t vocab_size() const;
  std::optional<int32_t> token_to_id(std::string_view token) const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace epic
