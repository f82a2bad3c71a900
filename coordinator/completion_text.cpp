// A completion's text as it streams (completion_text.h).
#include "coordinator/completion_text.h"

#include <algorithm>
#include <utility>

#include "coordinator/unicode_text.h"

namespace epic {

size_t complete_utf8_prefix(std::string_view bytes) {
  // Look back at most 3 bytes for the lead byte of a sequence that has not all arrived.
  const size_t size = bytes.size();
  for (size_t back = 1; back <= std::min<size_t>(3, size); ++back) {
    const auto byte = static_cast<unsigned char>(bytes[size - back]);
    if ((byte & 0xC0) == 0x80) continue;  // a continuation byte: keep looking for its lead
    const size_t length = byte >= 0xF8 ? 1 : byte >= 0xF0 ? 4 : byte >= 0xE0 ? 3 : byte >= 0xC0 ? 2 : 1;
    return length > back ? size - back : size;
  }
  return size;
}

CompletionText::CompletionText(std::vector<std::string> stops) : stops_(std::move(stops)) {}

std::string CompletionText::push(std::string_view bytes) {
  if (stopped_) return "";
  pending_ += bytes;
  // A stop string anywhere in what is not yet sent (it may straddle tokens): the text before the earliest
  // one is the rest of the completion.
  size_t earliest = std::string::npos;
  for (const std::string& stop : stops_) earliest = std::min(earliest, pending_.find(stop));
  if (earliest != std::string::npos) {
    stopped_ = true;
    std::string out = unicode::utf8_lossy(pending_.substr(0, earliest));
    pending_.clear();
    sent_ += out;
    return out;
  }
  // Hold back a tail that is a prefix of some stop string, and an unfinished character.
  size_t held = 0;
  for (const std::string& stop : stops_)
    for (size_t length = std::min(stop.size() - 1, pending_.size()); length > held; --length)
      if (pending_.compare(pending_.size() - length, length, stop, 0, length) == 0) {
        held = length;
        break;
      }
  const size_t ready = complete_utf8_prefix(std::string_view(pending_).substr(0, pending_.size() - held));
  // Whole characters only, so the lossy decode of this piece is what a decode of the whole text shows.
  std::string out = unicode::utf8_lossy(std::string_view(pending_).substr(0, ready));
  pending_.erase(0, ready);
  sent_ += out;
  return out;
}

std::string CompletionText::finish() {
  if (stopped_) return "";
  std::string out = unicode::utf8_lossy(pending_);
  pending_.clear();
  sent_ += out;
  return out;
}

}  // namespace epic
