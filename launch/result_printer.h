// Rank 0's output of `epic run`, streamed as results arrive: a result is printed (stdout flushed)
// as soon as every earlier prompt's is, and its prompt logits go at once to their rows of the
// --logits-out file. Only results waiting for an earlier prompt are held, and only their ids (a
// few bytes per token), never logits. The logits file appears at finish(), complete, or not at all.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "coordinator/tokenizer.h"
#include "worker/generation_loop.h"
#include "worker/npy_file.h"

namespace epic::cli {

class ResultPrinter {
 public:
  // prompt_lengths[p]: tokens of prompt p. one_line_per_prompt: a JSON object per line (sequence,
  // ids, text) instead of the bare text or ids. logits_out empty: no logits file. The tokenizer,
  // when given, must outlive the printer.
  ResultPrinter(const std::vector<int64_t>& prompt_lengths, bool one_line_per_prompt,
                const Tokenizer* tokenizer, const std::string& logits_out, int64_t vocab_size);

  // Error(kInternal) for an unknown or repeated sequence id or logits of the wrong size.
  void add(SequenceResult&& result);
  // Every prompt printed (else Error(kInternal) naming the first missing one); commits the logits.
  void finish();

  int64_t prompt_tokens() const { return first_row_.back(); }
  int64_t generated_tokens() const { return generated_tokens_; }
  int64_t most_waiting() const { return most_waiting_; }  // results held at once for an earlier one

 private:
  void print(int64_t sequence_id, const std::vector<int32_t>& new_ids);

  std::vector<int64_t> first_row_;  // prompt p's logits rows: [first_row_[p], first_row_[p + 1])
  bool one_line_per_prompt_;
  const Tokenizer* tokenizer_;
  int64_t vocab_size_;
  std::optional<NpyF32Writer> logits_;
  std::vector<bool> received_;
  std::map<int64_t, std::vector<int32_t>> waiting_;  // sequence id -> new ids
  int64_t next_to_print_ = 0;
  int64_t generated_tokens_ = 0;
  int64_t most_waiting_ = 0;
};

}  // namespace epic::cli
