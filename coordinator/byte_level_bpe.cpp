// Merges run lowest rank first, leftmost among equal ranks: the order of both Hugging Face's
// Word::merge_all and the transformers.js BPE, driven by a heap over a linked list of symbols.
#include "coordinator/byte_level_bpe.h"

#include <queue>

#include "coordinator/unicode_text.h"
#include "kernels/error.h"

namespace epic {
namespace {

struct ByteLevelAlphabet {
  std::array<std::string, 256> byte_to_utf8;
  std::unordered_map<char32_t, uint8_t> code_point_to_byte;

  ByteLevelAlphabet() {
    char32_t next_unprintable = 256;
    for (int byte = 0; byte < 256; ++byte) {
      const bool printable = (byte >= 33 && byte <= 126) || (byte >= 161 && byte <= 172) || byte >= 174;
      const char32_t code_point = printable ? static_cast<char32_t>(byte) : next_unprintable++;
      unicode::append_utf8(byte_to_utf8[byte], code_point);
      code_point_to_byte[code_point] = static_cast<uint8_t>(byte);
    }
  }
};

const ByteLevelAlphabet& alphabet() {
  static const ByteLevelAlphabet instance;
  return instance;
}

}  // namespace

const std::string& byte_level_character(uint8_t byte) { return alphabet().byte_to_utf8[byte]; }

std::string byte_level_token_bytes(std::string_view token) {
  std::string bytes;
  size_t pos = 0;
  while (pos < token.size()) {
    const auto it = alphabet().code_point_to_byte.find(unicode::next_code_point(token, pos));
    if (it == alphabet().code_point_to_byte.end()) return std::string(token);
    bytes.push_back(static_cast<char>(it->second));
  }
  return bytes;
}

ByteLevelBpe::ByteLevelBpe(std::unordered_map<std::string, int32_t> vocab,
                           std::unordered_map<uint64_t, BpeMerge> merges, bool ignore_merges)
    : vocab_(std::move(vocab)), merges_(std::move(merges)), ignore_merges_(ignore_merges) {
  for (int byte = 0; byte < 256; ++byte) {
    const auto it = vocab_.find(byte_level_character(static_cast<uint8_t>(byte)));
    EPIC_CHECK(
        it != vocab_.end(), ErrorCode::kInternal,
        "ByteLevelBpe: no vocabulary token for byte " + std::to_string(byte) + " (the loader checks this)");
    byte_token_ids_[byte] = it->second;
  }
}

void ByteLevelBpe::merge(std::string_view word, std::vector<int32_t>& out) const {
  struct Symbol {
    int32_t id;  // kAbsorbed once merged into its left neighbour
    int32_t previous;
    int32_t next;
  };
  struct Candidate {
    int32_t rank;
    int32_t position;  // of the left symbol of the pair
    bool operator>(const Candidate& other) const {
      return rank != other.rank ? rank > other.rank : position > other.position;
    }
  };
  constexpr int32_t kAbsorbed = -1;
  const auto num_symbols = static_cast<int32_t>(word.size());
  std::vector<Symbol> symbols(word.size());
  for (int32_t i = 0; i < num_symbols; ++i) {
    symbols[i] = {byte_token_ids_[static_cast<unsigned char>(word[i])], i - 1,
                  i + 1 < num_symbols ? i + 1 : -1};
  }
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> heap;
  const auto push_pair = [&](int32_t position) {
    const int32_t next = symbols[position].next;
    if (next < 0) return;
    const auto it = merges_.find(pair_key(symbols[position].id, symbols[next].id));
    if (it != merges_.end()) heap.push({it->second.rank, position});
  };
  for (int32_t i = 0; i + 1 < num_symbols; ++i) push_pair(i);

  while (!heap.empty()) {
    const Candidate top = heap.top();
    heap.pop();
    Symbol& left = symbols[top.position];
    if (left.id == kAbsorbed || left.next < 0) continue;
    // Stale entries: the pair at this position may have changed since it was pushed. A rank
    // names exactly one pair, so an unchanged rank means an unchanged pair.
    const auto it = merges_.find(pair_key(left.id, symbols[left.next].id));
    if (it == merges_.end() || it->second.rank != top.rank) continue;
    Symbol& right = symbols[left.next];
    left.id = it->second.merged_id;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].previous = top.position;
    right.id = kAbsorbed;
    if (left.previous >= 0) push_pair(left.previous);
    push_pair(top.position);
  }
  for (int32_t i = 0; i >= 0; i = symbols[i].next) out.push_back(symbols[i].id);
}

void ByteLevelBpe::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  const bool cacheable = word.size() <= kMaxCachedWordBytes;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    const auto it = cache_.find(word);
    if (it != cache_.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> ids;
  if (ignore_merges_) {  // a word that is a token as a whole skips the merges
    std::string as_token;
    for (char byte : word) as_token += byte_level_character(static_cast<uint8_t>(byte));
    if (const auto it = vocab_.find(as_token); it != vocab_.end()) ids.push_back(it->second);
  }
  if (ids.empty()) merge(word, ids);
  out.insert(out.end(), ids.begin(), ids.end());
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    if (cache_.size() >= kMaxCachedWords) cache_.clear();
    cache_.emplace(std::string(word), std::move(ids));
  }
}

}  // namespace epic
