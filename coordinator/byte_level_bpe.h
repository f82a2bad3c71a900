// The BPE model of byte-level tokenizers: GPT-2's byte <-> character alphabet and the merge
// loop that turns one pre-tokenized word (raw UTF-8 bytes) into token ids, with a word cache.
#pragma once

#include <array>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace epic {

// The byte-level character (as UTF-8) that stands for a byte in vocabulary strings: printable
// Latin-1 bytes stand for themselves, the other bytes take U+0100 upwards in byte order.
const std::string& byte_level_character(uint8_t byte);

// The bytes a token string stands for under the ByteLevel decoder: each character mapped back to
// its byte or, when a character is outside the alphabet, the token's own UTF-8 (Hugging Face's
// rule; it is how added tokens such as "<\u4e2d>" decode verbatim).
std::string byte_level_token_bytes(std::string_view token);

struct BpeMerge {
  int32_t rank;       // position in model.merges: lower merges first
  int32_t merged_id;  // id of left + right
};

class ByteLevelBpe {
 public:
  static uint64_t pair_key(int32_t left_id, int32_t right_id) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left_id)) << 32) | static_cast<uint32_t>(right_id);
  }

  // vocab must hold all 256 byte-level characters; merges are keyed by pair_key.
  ByteLevelBpe(std::unordered_map<std::string, int32_t> vocab, std::unordered_map<uint64_t, BpeMerge> merges,
               bool ignore_merges);

  // Appends the ids of one word (thread-safe; the cache is shared under a mutex).
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;

  const std::unordered_map<std::string, int32_t>& vocab() const { return vocab_; }

 private:
  void merge(std::string_view word, std::vector<int32_t>& out) const;

  // Lets the cache be searched with a string_view, without building a std::string first.
  struct StringViewHash {
    using is_transparent = void;
    size_t operator()(std::string_view text) const { return std::hash<std::string_view>{}(text); }
  };

  std::unordered_map<std::string, int32_t> vocab_;  // byte-level token string -> id
  std::unordered_map<uint64_t, BpeMerge> merges_;
  std::array<int32_t, 256> byte_token_ids_{};  // id of each byte's one-character token
  bool ignore_merges_;

  // Words repeat (" the", "\n"); their ids are cached, bounded by clearing when it grows too big.
  static constexpr size_t kMaxCachedWordBytes = 128;
  static constexpr size_t kMaxCachedWords = 1 << 17;
  mutable std::mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>, StringViewHash, std::equal_to<>> cache_;
};

}  // namespace epic
