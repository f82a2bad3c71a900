// In-order printing of streamed results and their logits rows (see result_printer.h).
#include "launch/result_printer.h"

#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "kernels/error.h"
#include "launch/id_list.h"

namespace epic::cli {

ResultPrinter::ResultPrinter(const std::vector<int64_t>& prompt_lengths, bool one_line_per_prompt,
                             const Tokenizer* tokenizer, const std::string& logits_out, int64_t vocab_size)
    : first_row_(prompt_lengths.size() + 1, 0),
      one_line_per_prompt_(one_line_per_prompt),
      tokenizer_(tokenizer),
      vocab_size_(vocab_size),
      received_(prompt_lengths.size(), false) {
  for (size_t p = 0; p < prompt_lengths.size(); ++p) first_row_[p + 1] = first_row_[p] + prompt_lengths[p];
  if (!logits_out.empty()) logits_.emplace(logits_out, std::vector<int64_t>{first_row_.back(), vocab_size_});
}

void ResultPrinter::add(SequenceResult&& result) {
  const int64_t id = result.sequence_id;
  const int64_t num_prompts = static_cast<int64_t>(received_.size());
  EPIC_CHECK(id >= 0 && id < num_prompts, ErrorCode::kInternal,
             "a worker returned sequence " + std::to_string(id) + " of a run with " +
                 std::to_string(num_prompts) + " prompts");
  EPIC_CHECK(!received_[id], ErrorCode::kInternal, "sequence " + std::to_string(id) + " was returned twice");
  received_[id] = true;
  if (logits_) {
    const uint64_t expected = static_cast<uint64_t>(first_row_[id + 1] - first_row_[id]) * vocab_size_;
    EPIC_CHECK(result.prompt_logits.size() == expected, ErrorCode::kInternal,
               "sequence " + std::to_string(id) + " came with " +
                   std::to_string(result.prompt_logits.size()) + " prompt logits, expected " +
                   std::to_string(expected));
    logits_->write(static_cast<uint64_t>(first_row_[id]) * vocab_size_, result.prompt_logits);
  }
  generated_tokens_ += static_cast<int64_t>(result.new_ids.size());
  if (id != next_to_print_) {
    waiting_.emplace(id, std::move(result.new_ids));
    most_waiting_ = std::max(most_waiting_, static_cast<int64_t>(waiting_.size()));
    return;
  }
  print(id, result.new_ids);
  for (auto next = waiting_.begin(); next != waiting_.end() && next->first == next_to_print_;
       next = waiting_.erase(next))
    print(next->first, next->second);
}

void ResultPrinter::print(int64_t sequence_id, const std::vector<int32_t>& new_ids) {
  if (one_line_per_prompt_) {
    // One JSON object per line: safe for text with newlines, easy to collect in scaling studies.
    nlohmann::json line = {{"sequence", sequence_id}, {"ids", new_ids}};
    if (tokenizer_) line["text"] = tokenizer_->decode(new_ids);
    std::printf("%s\n", line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else if (tokenizer_) {
    std::printf("%s\n", tokenizer_->decode(new_ids).c_str());
  } else {
    std::printf("%s\n", join_ids(new_ids).c_str());
  }
  // Flushed per result: what was printed stays printed if a later step fails or a rank dies.
  std::fflush(stdout);
  next_to_print_ = sequence_id + 1;
}

void ResultPrinter::finish() {
  EPIC_CHECK(next_to_print_ == static_cast<int64_t>(received_.size()), ErrorCode::kInternal,
             "the run ended without a result for sequence " + std::to_string(next_to_print_));
  if (logits_) logits_->commit();
}

}  // namespace epic::cli
