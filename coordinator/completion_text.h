// The text of one completion as it streams out (epic serve, issue 11): token bytes go in as the sequence
// generates them (Tokenizer::decode_bytes of each new token); what comes out is safe to send at once. A
// UTF-8 character split across tokens is held back until it is whole (a stream never cuts a character),
// and so is any tail that could still grow into one of the request's stop strings; once a stop string
// appears, the text before it is the whole completion and nothing after it is ever sent.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace epic {

class CompletionText {
 public:
  explicit CompletionText(std::vector<std::string> stops = {});

  // Appends a new token's bytes; returns the text that may be sent now (possibly empty). After a stop
  // string appeared, returns "" for good.
  std::string push(std::string_view bytes);
  // The sequence ended: returns what was held back (a partial stop string that never completed, and an
  // incomplete character as U+FFFD, as a whole decode would show it); "" after a stop.
  std::string finish();

  bool stopped() const { return stopped_; }
  const std::string& sent() const { return sent_; }  // everything returned so far

 private:
  std::vector<std::string> stops_;
  std::string pending_;  // received, not yet sent
  std::string sent_;
  bool stopped_ = false;
};

// The length of the longest prefix of `bytes` that ends on a whole UTF-8 character (an incomplete
// sequence at the end is left out; invalid bytes elsewhere count as whole, a decoder shows them as U+FFFD).
size_t complete_utf8_prefix(std::string_view bytes);

}  // namespace epic
