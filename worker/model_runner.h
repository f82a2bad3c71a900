// The Qwen3-MoE forward pass over a batch of sequences on one backend: every op of every layer is
// a backend op on backend memory (the residual stream, the paged KV cache, the work buffers); the
// host only builds the step's small tables (token ids, positions, block tables), uploads them in
// one copy and reads back the next token ids (and logits when asked). A decode step (one new token
// per sequence) is captured as a graph per batch-size bucket and replayed, so it costs kernel time,
// not launch time. The MoE blocks go through a MoeExecutor (local or expert-parallel).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "worker/kv_cache.h"
#include "worker/model_config.h"
#include "worker/model_weights.h"
#include "worker/moe_executor.h"
#include "worker/workspace.h"

namespace epic {

// The next tokens of one sequence in a batched forward pass.
struct SequenceChunk {
  KvSequence* sequence = nullptr;
  std::span<const int32_t> tokens;
  bool all_positions = false;  // logits of every token, else of the last only
  // Experts per token of these rows: the sequence's own residency state (e.g. WAKE's 4 in a batch of
  // FOCUS sequences), in [1, the model's top-k]; 0: the routing policy's.
  int64_t top_k = 0;
};

// The experts per token of one step's rows: top_k slots per row, every row taking all of them, or
// (mixed) each row its own k <= top_k (Backend::route_top_k's row_top_k: a row's result is bitwise
// what it would be in a step of its own k; the slots past it are computed and weighted by zero).
struct StepTopK {
  int64_t top_k = 0;
  bool mixed = false;
  bool operator==(const StepTopK&) const = default;
};

// The logits of a batch in one host buffer (no copy per chunk), chunk after chunk.
struct BatchLogits {
  std::vector<float> values;       // [rows, vocab]
  std::vector<int64_t> first_row;  // chunk c's rows are [first_row[c], first_row[c + 1])
  int64_t vocab = 0;
  std::span<const float> of_chunk(size_t c) const {
    return {values.data() + first_row[c] * vocab,
            static_cast<size_t>((first_row[c + 1] - first_row[c]) * vocab)};
  }
  std::span<const float> last_row(size_t c) const {
    return {values.data() + (first_row[c + 1] - 1) * vocab, static_cast<size_t>(vocab)};
  }
};

struct StepOutput {
  std::vector<int32_t> greedy_ids;  // per chunk: argmax of its last row (lowest id among the maxima)
  BatchLogits logits;               // filled only when the step was asked for logits
};

// What the ranks of an expert-parallel job agree on before a step (generation_loop.cpp), so every rank
// runs the same MoE exchange (MoeExecutor::begin_step) and captures or replays the same decode graph at
// the same step: NCCL requires a graph holding its operations to be captured and launched by all its ranks
// together, and a rank with fewer rows (or none) runs the same padded bucket as the others.
struct StepAgreement {
  int64_t max_rows = 0;               // the most token rows any rank runs in the step
  bool every_rank_decode = false;     // every rank's step is decode-only (one token per sequence) or empty
  uint64_t common_graph_buckets = 0;  // bit b: every rank holds a current decode graph of 2^b rows
  // The largest experts per token of any rank's rows, mixed when some row takes fewer (the dispatch
  // records of an exchange carry top_k slots per row, so every rank routes the same slots); top_k 0:
  // every rank's rows take the routing policy's.
  StepTopK top_k;
};

struct RunnerOptions {
  ScalarType activation_type = ScalarType::kF32;  // BF16: the cuda serving mode
  int64_t max_sequences = 64;                     // live at once (KV cache and block-table rows)
  int64_t max_context = 4096;                     // positions per sequence (prompt + new tokens)
  bool use_graphs = true;                         // capture decode steps where the backend can
  int64_t max_graph_batch = 512;                  // the largest decode batch captured
  // Positions the KV cache holds for all live sequences together (rounded up to whole blocks); 0: every
  // live sequence at max_context. A smaller pool serves many short sequences in the memory of a few long
  // ones; GenerationEngine admits a sequence only when its longest possible cache fits what is left.
  int64_t kv_cache_tokens = 0;
};

class ModelRunner {
 public:
  // With no executor the MoE blocks run locally. Allocates the KV cache for options.max_sequences
  // x options.max_context positions (Error(kUnsupported) when it does not fit).
  ModelRunner(const ModelConfig& config, const ModelWeights& weights, Backend& backend,
              const RunnerOptions& options = {}, MoeExecutor* executor = nullptr);
  ~ModelRunner();

  KvSequence new_sequence() { return KvSequence(*kv_pool_); }

  // One step over several sequences: each chunk's tokens run at positions sequence.length, ... and
  // are appended to its cache. An empty batch still runs every MoE layer (with no rows) so that an
  // expert-parallel executor's collectives see this worker. Ids outside [0, vocab) ->
  // Error(kInvalidArgument) naming the id and its position; a sequence longer than max_context ->
  // Error(kInvalidArgument).
  // The executor's begin_step / finish_step go around the step: with `agreement` (every rank of an
  // expert-parallel job, the same value) with its rows, and decode graphs of the agreed bucket are captured
  // and replayed on every rank together (a rank without sequences runs padding rows); without, with this
  // step's rows.
  StepOutput forward_batch(std::span<const SequenceChunk> chunks, bool want_logits,
                           const StepAgreement* agreement = nullptr);
  // The decode graphs this runner holds that are still current (stale ones are dropped), as
  // StepAgreement::common_graph_buckets' bits: what this rank contributes to the next agreement.
  uint64_t current_graph_buckets();

  // The routing of the coming steps (routing_policy.h; null: the model as trained), e.g. a residency
  // state's experts per token. Drops the captured decode graphs, which hold the previous top-k and masks.
  // In an expert-parallel job every rank sets the same policy before the same step.
  void set_routing(std::shared_ptr<const RoutingPolicy> policy);
  const RoutingPolicy* routing() const { return executor_->routing(); }
  // Who runs the MoE blocks (the runner's own local executor when it was given none), e.g. to count the
  // per-expert load (MoeExecutor::count_expert_load, before the first step: captured graphs keep the ops
  // they were captured with).
  MoeExecutor& moe_executor() { return *executor_; }
  // Experts per token of a chunk's rows (its own, else the policy's); Error(kInvalidArgument) when its
  // own is outside [1, the model's top-k].
  int64_t experts_per_token(const SequenceChunk& chunk) const;
  // The step's experts per token on this rank alone: the largest of its chunks', mixed when they differ.
  StepTopK step_top_k(std::span<const SequenceChunk> chunks) const;

  // The last step's logits where the backend computed them, F32 [rows, vocab]: chunk after chunk, every
  // position's rows of a chunk with all_positions, else its last row's (StepOutput::logits' layout),
  // whether or not the step copied them to the host. A view of the runner's work memory, valid until its
  // next step; for callers that reduce logits on the backend (epic eval scores them with score_rows).
  Tensor step_logits() const { return step_logits_; }
  Backend& backend() const { return backend_; }

  // One sequence: logits [tokens.size(), vocab] when all_positions, else [1, vocab].
  std::vector<float> forward(std::span<const int32_t> tokens, KvSequence& sequence, bool all_positions);

  const ModelConfig& config() const { return config_; }
  const RunnerOptions& options() const { return options_; }
  size_t kv_cache_bytes() const { return kv_pool_->bytes(); }
  // Blocks of kKvBlockSize positions the live sequences can hold together (the padding block excluded).
  int64_t kv_cache_blocks() const { return kv_cache_blocks_; }
  size_t workspace_bytes() const { return workspace_.bytes(); }
  int64_t graph_replays() const { return graph_replays_; }

 private:
  struct StepShape;
  void upload_step_tables(std::span<const SequenceChunk> chunks, const StepShape& shape);
  void enqueue_forward(const StepShape& shape);
  void attention_block(int64_t layer, const StepShape& shape, const Tensor& normed, const Tensor& out);

  const ModelConfig& config_;
  const ModelWeights& weights_;
  Backend& backend_;
  RunnerOptions options_;
  std::unique_ptr<MoeExecutor> local_executor_;
  MoeExecutor* executor_;
  int64_t kv_cache_blocks_ = 0;
  std::unique_ptr<KvCachePool> kv_pool_;
  Workspace workspace_;
  std::unique_ptr<Buffer> table_staging_;                    // host copy of the step tables (pinned for cuda)
  std::map<int64_t, std::unique_ptr<Graph>> decode_graphs_;  // by bucket (rows)
  uint64_t graphs_generation_ = 0;                           // the workspace generation they were made at
  StepTopK graphs_top_k_;                                    // the experts per token they route
  int64_t graph_replays_ = 0;
  Tensor step_logits_;  // the last step's real rows (no bucket padding)
};

// Validates ids against the vocabulary: Error(kInvalidArgument) naming the id and its position,
// after `context` (e.g. "prompt 3: ") when given.
void check_token_ids(std::span<const int32_t> tokens, int64_t vocab_size, const std::string& context = "");

}  // namespace epic
