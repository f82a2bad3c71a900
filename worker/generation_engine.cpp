// A worker's sequences advanced one step at a time (generation_engine.h).
#include "worker/generation_engine.h"

#include <algorithm>
#include <limits>
#include <string>
#include <utility>

#include "kernels/error.h"
#include "worker/sampler.h"

namespace epic {

// One live sequence: its cache and sampler exist only while it is admitted.
struct GenerationEngine::LiveSequence {
  SequenceRequest request;
  KvSequence cache;
  Sampler sampler;
  SequenceResult result;
  std::vector<int32_t> prefill;  // prompt then resumed tokens (when any were resumed)
  int64_t fed = 0;               // prefill tokens in the cache so far
  int64_t reserved_blocks = 0;   // the KV blocks it may come to hold (admission counts them)
  bool prefilled = false;
  bool done = false;
  LiveSequence(SequenceRequest&& sequence, ModelRunner& runner)
      : request(std::move(sequence)), cache(runner.new_sequence()), sampler([&] {
          SamplingOptions sampling = request.sampling;
          sampling.seed = sequence_seed(sampling.seed, request.seed_id.value_or(request.sequence_id));
          return sampling;
        }()) {
    result.sequence_id = request.sequence_id;
    if (!request.resumed_ids.empty()) {
      prefill = request.prompt;
      prefill.insert(prefill.end(), request.resumed_ids.begin(), request.resumed_ids.end());
      result.new_ids = request.resumed_ids;
      sampler.skip_samples(static_cast<int64_t>(request.resumed_ids.size()));
    }
  }
  std::span<const int32_t> prefill_tokens() const {
    return prefill.empty() ? std::span<const int32_t>(request.prompt) : std::span<const int32_t>(prefill);
  }
  int64_t prefill_left() const { return static_cast<int64_t>(prefill_tokens().size()) - fed; }
};

namespace {

// Test-only (EPIC_TEST_STEP_FAULT ... nan): every chunk's last logits row gets a NaN and no greedy id, as
// non-finite logits from the model would, so the engine's own check raises the error it raises for those.
void poison_logits(StepOutput& output) {
  BatchLogits& logits = output.logits;
  for (size_t c = 0; c + 1 < logits.first_row.size(); ++c) {
    logits.values[static_cast<size_t>((logits.first_row[c + 1] - 1) * logits.vocab)] =
        std::numeric_limits<float>::quiet_NaN();
    output.greedy_ids[c] = -1;
  }
}

}  // namespace

GenerationEngine::GenerationEngine(ModelRunner& runner, int64_t max_active_sequences, int64_t prefill_chunk_tokens)
    : runner_(runner), max_active_sequences_(max_active_sequences), prefill_chunk_tokens_(prefill_chunk_tokens) {
  EPIC_CHECK(max_active_sequences >= 1 && max_active_sequences <= kMaxActiveSequencesBound,
             ErrorCode::kInvalidArgument,
             "--max-active-sequences must be in [1, " + std::to_string(kMaxActiveSequencesBound) + "], got " +
                 std::to_string(max_active_sequences));
  EPIC_CHECK(prefill_chunk_tokens >= 0, ErrorCode::kInvalidArgument,
             "--prefill-chunk must be >= 0 (0: a prompt in one step), got " + std::to_string(prefill_chunk_tokens));
}

int64_t GenerationEngine::blocks_needed(const SequenceRequest& request) {
  const int64_t longest = static_cast<int64_t>(request.prompt.size()) +
                          std::max<int64_t>(request.max_new_tokens, static_cast<int64_t>(request.resumed_ids.size()));
  return KvCachePool::blocks_for(longest);
}

GenerationEngine::~GenerationEngine() = default;

void GenerationEngine::admit(SequenceRequest request) {
  EPIC_CHECK(!request.prompt.empty(), ErrorCode::kInvalidArgument,
             "sequence " + std::to_string(request.sequence_id) + " has an empty prompt");
  const int64_t id = request.sequence_id;
  EPIC_CHECK(blocks_needed(request) <= runner_.kv_cache_blocks(), ErrorCode::kInvalidArgument,
             "sequence " + std::to_string(id) + " may grow to " +
                 std::to_string(request.prompt.size() + request.max_new_tokens) +
                 " positions, more than the whole KV cache holds (" +
                 std::to_string(runner_.kv_cache_blocks() * kKvBlockSize) +
                 "); raise --kv-cache-tokens or shorten the prompt or max_new_tokens");
  EPIC_CHECK(known_ids_.insert(id).second, ErrorCode::kInvalidArgument,
             "sequence " + std::to_string(id) + " is already admitted; give every sequence its own id");
  waiting_.push_back(std::move(request));
}

bool GenerationEngine::cancel(int64_t sequence_id) {
  const auto waiting = std::find_if(waiting_.begin(), waiting_.end(),
                                    [&](const SequenceRequest& w) { return w.sequence_id == sequence_id; });
  if (waiting != waiting_.end()) {
    waiting_.erase(waiting);
    known_ids_.erase(sequence_id);
    return true;
  }
  const auto live = std::find_if(live_.begin(), live_.end(),
                                 [&](const auto& l) { return l->request.sequence_id == sequence_id; });
  if (live == live_.end()) return false;
  live_.erase(live);  // its KV cache goes with it
  known_ids_.erase(sequence_id);
  return true;
}

int64_t GenerationEngine::kv_positions() const {
  int64_t positions = 0;
  for (const auto& sequence : live_) positions += sequence->cache.length;
  return positions;
}

GenerationEngine::Layout GenerationEngine::layout() const {
  Layout layout;
  int64_t budget = prefill_chunk_tokens_ > 0 ? prefill_chunk_tokens_ : std::numeric_limits<int64_t>::max();
  int64_t reserved = 0;
  for (const auto& sequence : live_) {
    reserved += sequence->reserved_blocks;
    if (sequence->prefilled) {
      layout.rows.push_back(1);  // decodes never wait for prompts
    } else {
      const int64_t rows = std::min(sequence->prefill_left(), budget);
      budget -= rows;
      layout.rows.push_back(rows);
    }
  }
  // Waiting sequences join in order while a slot, the KV cache and the chunk budget allow (none overtakes
  // one that does not fit yet, so none starves).
  int64_t slots = max_active_sequences_ - static_cast<int64_t>(live_.size());
  for (const SequenceRequest& waiting : waiting_) {
    const int64_t need = blocks_needed(waiting);
    if (slots <= 0 || budget <= 0 || reserved + need > runner_.kv_cache_blocks()) break;
    const int64_t rows =
        std::min(static_cast<int64_t>(waiting.prompt.size() + waiting.resumed_ids.size()), budget);
    budget -= rows;
    reserved += need;
    --slots;
    ++layout.joining;
    layout.rows.push_back(rows);
  }
  return layout;
}

PlannedStep GenerationEngine::next_step() const {
  const Layout step = layout();
  PlannedStep plan;
  plan.unfinished = static_cast<int64_t>(live_.size() + waiting_.size());
  plan.joining = step.joining;
  const auto note_top_k = [&](const SequenceRequest& request) {
    SequenceChunk chunk;
    chunk.top_k = request.top_k;
    const int64_t k = runner_.experts_per_token(chunk);
    plan.fewest_top_k = plan.fewest_top_k == 0 ? k : std::min(plan.fewest_top_k, k);
    plan.most_top_k = std::max(plan.most_top_k, k);
  };
  for (size_t i = 0; i < step.rows.size(); ++i) {
    if (step.rows[i] == 0) continue;
    plan.rows += step.rows[i];
    const bool is_live = i < live_.size();
    if (!is_live || !live_[i]->prefilled) plan.decode_only = false;
    note_top_k(is_live ? live_[i]->request : waiting_[i - live_.size()]);
  }
  return plan;
}

std::vector<SequenceStepEvent> GenerationEngine::step(const StepAgreement* agreement, bool poison) {
  const ModelConfig& config = runner_.config();
  const Layout step = layout();
  for (int64_t i = 0; i < step.joining; ++i) {
    live_.push_back(std::make_unique<LiveSequence>(std::move(waiting_.front()), runner_));
    live_.back()->reserved_blocks = blocks_needed(live_.back()->request);
    waiting_.pop_front();
  }
  stats_.most_active_sequences = std::max(stats_.most_active_sequences, static_cast<int64_t>(live_.size()));

  // A prefilling sequence feeds its next slice of the prompt, a prefilled one its last token; one whose
  // slice is empty this step sits it out.
  std::vector<SequenceChunk> chunks;
  std::vector<size_t> live_of_chunk;
  chunks.reserve(live_.size());
  bool want_logits = false;  // only sampling and prompt logits need them on the host
  for (size_t i = 0; i < live_.size(); ++i) {
    LiveSequence& sequence = *live_[i];
    const SequenceRequest& request = sequence.request;
    const int64_t rows = step.rows[i];
    if (rows == 0) continue;
    const bool produces = sequence.prefilled || rows == sequence.prefill_left();
    want_logits = want_logits || (produces && request.sampling.temperature != 0.0) ||
                  (!sequence.prefilled && request.want_prompt_logits);
    if (sequence.prefilled) {
      chunks.push_back({&sequence.cache, std::span<const int32_t>(&sequence.result.new_ids.back(), 1), false,
                        request.top_k});
    } else {
      chunks.push_back({&sequence.cache, sequence.prefill_tokens().subspan(static_cast<size_t>(sequence.fed), rows),
                        request.want_prompt_logits, request.top_k});
    }
    live_of_chunk.push_back(i);
    stats_.tokens_processed += rows;
  }
  StepOutput output = runner_.forward_batch(chunks, want_logits || poison, agreement);
  if (poison) poison_logits(output);
  const BatchLogits* logits = output.logits.values.empty() ? nullptr : &output.logits;

  std::vector<SequenceStepEvent> events;
  events.reserve(chunks.size());
  for (size_t c = 0; c < chunks.size(); ++c) {
    LiveSequence& sequence = *live_[live_of_chunk[c]];
    const SequenceRequest& request = sequence.request;
    SequenceResult& result = sequence.result;
    if (!sequence.prefilled) {
      if (request.want_prompt_logits) {
        const std::span<const float> prompt_rows = logits->of_chunk(c);
        result.prompt_logits.insert(result.prompt_logits.end(), prompt_rows.begin(), prompt_rows.end());
      }
      sequence.fed += static_cast<int64_t>(chunks[c].tokens.size());
      if (sequence.prefill_left() > 0) continue;  // more of the prompt next step: no token yet
      sequence.prefilled = true;
      if (!request.resumed_ids.empty() && request.want_prompt_logits) {
        // Prompt logits cover the prompt only (resumed tokens are not the prompt).
        result.prompt_logits.resize(std::min(result.prompt_logits.size(),
                                             request.prompt.size() * static_cast<size_t>(config.vocab_size)));
      }
    }
    // The next token: the device's greedy choice, or sampled from the last logits. A greedy id of -1 means
    // the logits were not finite: they are fetched to name the first bad one.
    const int64_t produced = static_cast<int64_t>(result.new_ids.size());
    if (logits != nullptr) check_logits_finite(logits->last_row(c), request.sequence_id, produced);
    EPIC_CHECK(output.greedy_ids[c] >= 0, ErrorCode::kInternal,
               "sequence " + std::to_string(request.sequence_id) + " step " + std::to_string(produced) +
                   ": the logits are not finite but were not fetched to report it");
    SequenceStepEvent event;
    event.sequence_id = request.sequence_id;
    if (produced >= request.max_new_tokens) {
      sequence.done = true;
    } else {
      const int32_t next = request.sampling.temperature == 0.0 ? output.greedy_ids[c]
                                                               : sequence.sampler.sample(logits->last_row(c));
      result.new_ids.push_back(next);
      event.token = next;
      const bool eos = std::find(config.eos_token_ids.begin(), config.eos_token_ids.end(), next) !=
                       config.eos_token_ids.end();
      sequence.done = eos || static_cast<int64_t>(result.new_ids.size()) >= request.max_new_tokens;
    }
    if (sequence.done) {
      known_ids_.erase(request.sequence_id);
      event.finished = std::move(result);
    }
    events.push_back(std::move(event));
  }
  // Finished sequences leave now: their caches are freed.
  std::erase_if(live_, [](const std::unique_ptr<LiveSequence>& sequence) { return sequence->done; });
  ++stats_.steps;
  return events;
}

}  // namespace epic
