// embed -> N x [RMSNorm -> GQA attention -> residual -> RMSNorm -> MoE or dense MLP -> residual]
// -> RMSNorm -> lm_head -> argmax, exactly as transformers' Qwen3MoeForCausalLM, as backend ops.
// The residual stream is kept in fp32 whatever the activation type (bf16 mode rounds each block's
// input and output, not the running sum).
#include "worker/model_runner.h"

#include <algorithm>
#include <cstring>

#include "kernels/error.h"

namespace epic {

void check_token_ids(std::span<const int32_t> tokens, int64_t vocab_size, const std::string& context) {
  for (size_t t = 0; t < tokens.size(); ++t) {
    if (tokens[t] < 0 || tokens[t] >= vocab_size)
      throw Error(ErrorCode::kInvalidArgument,
                  context + "token id " + std::to_string(tokens[t]) + " at position " + std::to_string(t) +
                      " is outside the model's vocabulary [0, " + std::to_string(vocab_size) + ")");
  }
}

// The sizes of one step, and where its tables live inside the uploaded table buffer. Rows are
// padded up to a graph bucket for captured decode steps (padding rows feed token 0 at position 0
// through the pool's padding block and their logits are ignored).
struct ModelRunner::StepShape {
  int64_t rows = 0;       // token rows computed (padded)
  int64_t sequences = 0;  // block-table rows (padded)
  int64_t wanted = 0;     // rows whose logits / argmax are computed
  int64_t max_blocks = 0;
  bool decode_only = false;  // one row per sequence, its newest position (padding rows: their own sequence)
  // The experts per token of the step's rows (StepTopK); row_top_k is uploaded only when mixed.
  StepTopK top_k;
  // Views into the table tensor (I32): ids, positions, row_sequence, slot_mapping [rows];
  // wanted_rows [wanted]; block_tables [sequences, max_blocks]; row_top_k [rows] (after those, so the
  // views a decode graph holds do not move with it); real_tokens [1]: the rows before the padding ones.
  Tensor tables, ids, positions, row_sequence, slot_mapping, wanted_rows, block_tables, row_top_k,
      real_tokens;
  int64_t table_elements() const { return 5 * rows + wanted + sequences * max_blocks + 1; }
};

ModelRunner::ModelRunner(const ModelConfig& config, const ModelWeights& weights, Backend& backend,
                         const RunnerOptions& options, MoeExecutor* executor)
    : config_(config), weights_(weights), backend_(backend), options_(options), workspace_(backend) {
  EPIC_CHECK(options.max_sequences >= 1 && options.max_context >= 1, ErrorCode::kInvalidArgument,
             "the model runner needs at least one sequence of at least one position");
  if (executor == nullptr) local_executor_ = std::make_unique<LocalMoeExecutor>(config, weights, backend);
  executor_ = executor != nullptr ? executor : local_executor_.get();
  EPIC_CHECK(options.kv_cache_tokens >= 0, ErrorCode::kInvalidArgument, "--kv-cache-tokens must be >= 0");
  // Every live sequence at the longest context (or the given budget), plus the padding block.
  kv_cache_blocks_ = options.kv_cache_tokens > 0 ? KvCachePool::blocks_for(options.kv_cache_tokens)
                                                 : options.max_sequences * KvCachePool::blocks_for(options.max_context);
  kv_cache_blocks_ = std::max<int64_t>(kv_cache_blocks_, 1);
  kv_pool_ = std::make_unique<KvCachePool>(backend, config, options.activation_type, kv_cache_blocks_ + 1);
}

ModelRunner::~ModelRunner() = default;

void ModelRunner::upload_step_tables(std::span<const SequenceChunk> chunks, const StepShape& shape) {
  const size_t bytes = static_cast<size_t>(shape.table_elements()) * sizeof(int32_t);
  if (!table_staging_ || table_staging_->size() < bytes) {
    table_staging_.reset();
    table_staging_ = backend_.allocate_staging(std::max<size_t>(bytes, 4096) * 2);
  }
  int32_t* ids = static_cast<int32_t*>(table_staging_->data());
  int32_t* positions = ids + shape.rows;
  int32_t* row_sequence = positions + shape.rows;
  int32_t* slot_mapping = row_sequence + shape.rows;
  int32_t* wanted_rows = slot_mapping + shape.rows;
  int32_t* block_tables = wanted_rows + shape.wanted;
  int32_t* row_top_k = block_tables + shape.sequences * shape.max_blocks;
  int32_t* real_tokens = row_top_k + shape.rows;
  const int32_t padding_slot = kv_pool_->padding_block() * static_cast<int32_t>(kKvBlockSize);
  int64_t row = 0, wanted = 0;
  for (size_t c = 0; c < chunks.size(); ++c) {
    const KvSequence& sequence = *chunks[c].sequence;
    const int64_t first_position = sequence.length;
    const int64_t count = static_cast<int64_t>(chunks[c].tokens.size());
    for (int64_t t = 0; t < count; ++t, ++row) {
      const int64_t position = first_position + t;
      ids[row] = chunks[c].tokens[t];
      positions[row] = static_cast<int32_t>(position);
      row_sequence[row] = static_cast<int32_t>(c);
      slot_mapping[row] = sequence.blocks[position / kKvBlockSize] * static_cast<int32_t>(kKvBlockSize) +
                          static_cast<int32_t>(position % kKvBlockSize);
      if (chunks[c].all_positions || t == count - 1) wanted_rows[wanted++] = static_cast<int32_t>(row);
      row_top_k[row] = static_cast<int32_t>(experts_per_token(chunks[c]));
    }
    int32_t* table_row = block_tables + c * shape.max_blocks;
    for (int64_t b = 0; b < shape.max_blocks; ++b)
      table_row[b] =
          b < static_cast<int64_t>(sequence.blocks.size()) ? sequence.blocks[b] : kv_pool_->padding_block();
  }
  for (int64_t s = static_cast<int64_t>(chunks.size()); s < shape.sequences; ++s)
    for (int64_t b = 0; b < shape.max_blocks; ++b)
      block_tables[s * shape.max_blocks + b] = kv_pool_->padding_block();
  *real_tokens = static_cast<int32_t>(row);
  for (; row < shape.rows; ++row) {  // padding rows: their own (empty) sequence, position 0
    ids[row] = 0;
    positions[row] = 0;
    row_sequence[row] = static_cast<int32_t>(std::min<int64_t>(row, shape.sequences - 1));
    slot_mapping[row] = padding_slot;
    wanted_rows[wanted++] = static_cast<int32_t>(row);
    row_top_k[row] = static_cast<int32_t>(shape.top_k.top_k);
  }
  EPIC_CHECK(wanted == shape.wanted, ErrorCode::kInternal, "step tables: wanted rows miscounted");
  backend_.copy_from_host(shape.tables, 0, table_staging_->data(), bytes);
}

void ModelRunner::attention_block(int64_t layer, const StepShape& shape, const Tensor& normed,
                                  const Tensor& out) {
  const LayerWeights& w = weights_.layers[layer];
  const AttentionShape geometry{config_.num_attention_heads, config_.num_key_value_heads, config_.head_dim};
  const ScalarType act = options_.activation_type;
  const Tensor qkv = workspace_.get(kSlotQkv, act, {shape.rows, geometry.qkv_dim()});
  backend_.linear(normed, w.qkv_proj, qkv);
  const Tensor attended = workspace_.get(kSlotAttention, act, {shape.rows, geometry.q_dim()});
  if (shape.decode_only) {  // each row its sequence's only and newest: Backend::decode_attention's
                            // precondition
    backend_.decode_attention(
        qkv, w.q_norm, w.k_norm, kv_pool_->keys(layer), kv_pool_->values(layer),
        AttentionTables{shape.positions, shape.slot_mapping, shape.row_sequence, shape.block_tables},
        geometry, config_.rms_norm_eps, config_.rope_theta, attended);
  } else {
    backend_.qk_norm_rope(qkv, w.q_norm, w.k_norm, shape.positions, geometry, config_.rms_norm_eps,
                          config_.rope_theta);
    backend_.store_kv(qkv, shape.slot_mapping, kv_pool_->keys(layer), kv_pool_->values(layer), geometry);
    backend_.attention(qkv, kv_pool_->keys(layer), kv_pool_->values(layer), shape.block_tables,
                       shape.row_sequence, shape.positions, geometry, attended);
  }
  backend_.linear(attended, w.o_proj, out);
}

void ModelRunner::enqueue_forward(const StepShape& shape) {
  const int64_t hidden = config_.hidden_size, rows = shape.rows;
  const ScalarType act = options_.activation_type;
  const Tensor x = workspace_.get(kSlotResidual, ScalarType::kF32, {rows, hidden});
  const Tensor normed = workspace_.get(kSlotNormed, act, {rows, hidden});
  // Block outputs feed the fp32 residual stream unrounded (o_proj, combine and dense down write f32).
  const Tensor block_out = workspace_.get(kSlotBlockOut, ScalarType::kF32, {rows, hidden});
  backend_.embed(shape.ids, weights_.embed, x);
  const int64_t num_layers = config_.num_hidden_layers;
  // Each residual add is fused with the norm that follows it (add_rms_norm); only the first layer's
  // input norm and the last layer's add stand alone (the final norm runs on the wanted rows only).
  if (num_layers > 0) backend_.rms_norm(x, weights_.layers[0].input_norm, normed, config_.rms_norm_eps);
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    const LayerWeights& w = weights_.layers[layer];
    attention_block(layer, shape, normed, block_out);
    // bf16 mode: the router takes the same normed rows in fp32 as well (MoeExecutor::forward).
    const bool router_f32 = w.is_moe && act != ScalarType::kF32;
    const Tensor router_input =
        router_f32 ? workspace_.get(kSlotNormedF32, ScalarType::kF32, {rows, hidden}) : normed;
    backend_.add_rms_norm(block_out, x, w.post_attention_norm, normed, router_f32 ? router_input : Tensor{},
                          config_.rms_norm_eps);
    if (w.is_moe) {
      executor_->forward(layer, normed, router_input, block_out, workspace_);
    } else {
      const int64_t inter = config_.intermediate_size;
      const Tensor gate_up = workspace_.get(kSlotDenseGateUp, act, {rows, 2 * inter});
      const Tensor activated = workspace_.get(kSlotDenseIntermediate, act, {rows, inter});
      backend_.linear(normed, w.dense_gate_up, gate_up);
      backend_.silu_mul(gate_up, activated);
      backend_.linear(activated, w.dense_down, block_out);
    }
    if (layer + 1 < num_layers) {
      backend_.add_rms_norm(block_out, x, weights_.layers[layer + 1].input_norm, normed, Tensor{},
                            config_.rms_norm_eps);
    } else {
      backend_.add(block_out, x);
    }
  }
  // Final norm and lm_head on the rows whose logits are wanted, gathered into one batch.
  const Tensor selected = workspace_.get(kSlotSelected, ScalarType::kF32, {shape.wanted, hidden});
  const Tensor selected_normed = workspace_.get(kSlotSelectedNormed, act, {shape.wanted, hidden});
  backend_.gather_rows(x, shape.wanted_rows, selected);
  backend_.rms_norm(selected, weights_.final_norm, selected_normed, config_.rms_norm_eps);
  const Tensor logits = workspace_.get(kSlotLogits, ScalarType::kF32, {shape.wanted, config_.vocab_size});
  backend_.linear(selected_normed, weights_.output_projection(), logits);
  backend_.argmax(logits, workspace_.get(kSlotNextIds, ScalarType::kI32, {shape.wanted}));
}

namespace {

int bucket_bit(int64_t bucket) {
  int bit = 0;
  while ((int64_t{1} << bit) < bucket) ++bit;
  return bit;
}

}  // namespace

int64_t ModelRunner::experts_per_token(const SequenceChunk& chunk) const {
  if (chunk.top_k == 0) return routing() != nullptr ? routing()->top_k() : config_.num_experts_per_tok;
  EPIC_CHECK(chunk.top_k >= 1 && chunk.top_k <= config_.num_experts_per_tok, ErrorCode::kInvalidArgument,
             "a sequence asks for " + std::to_string(chunk.top_k) +
                 " experts per token; this model routes 1 to " + std::to_string(config_.num_experts_per_tok) +
                 " (FOCUS: " + std::to_string(config_.num_experts_per_tok) + ", WAKE: " +
                 std::to_string(std::min(kWakeExpertsPerToken, config_.num_experts_per_tok)) + ")");
  return chunk.top_k;
}

StepTopK ModelRunner::step_top_k(std::span<const SequenceChunk> chunks) const {
  StepTopK step;
  int64_t fewest = 0;
  for (const SequenceChunk& chunk : chunks) {
    const int64_t k = experts_per_token(chunk);
    step.top_k = std::max(step.top_k, k);
    fewest = fewest == 0 ? k : std::min(fewest, k);
  }
  if (chunks.empty()) step.top_k = experts_per_token(SequenceChunk{});
  step.mixed = fewest > 0 && fewest < step.top_k;
  return step;
}

void ModelRunner::set_routing(std::shared_ptr<const RoutingPolicy> policy) {
  executor_->set_routing(std::move(policy));
  decode_graphs_.clear();
}

uint64_t ModelRunner::current_graph_buckets() {
  if (graphs_generation_ != workspace_.generation()) decode_graphs_.clear();
  uint64_t buckets = 0;
  for (const auto& [bucket, graph] : decode_graphs_) buckets |= uint64_t{1} << bucket_bit(bucket);
  return buckets;
}

StepOutput ModelRunner::forward_batch(std::span<const SequenceChunk> chunks, bool want_logits,
                                      const StepAgreement* agreement) {
  StepShape shape;
  std::vector<int64_t> first_wanted(chunks.size() + 1, 0);
  bool decode_only = !chunks.empty();
  for (size_t c = 0; c < chunks.size(); ++c) {
    const SequenceChunk& chunk = chunks[c];
    EPIC_CHECK(!chunk.tokens.empty() && chunk.sequence != nullptr, ErrorCode::kInvalidArgument,
               "every sequence in a batch needs at least one token and a KV cache");
    check_token_ids(chunk.tokens, config_.vocab_size);
    const int64_t count = static_cast<int64_t>(chunk.tokens.size());
    const int64_t length = chunk.sequence->length + count;
    EPIC_CHECK(length <= options_.max_context, ErrorCode::kInvalidArgument,
               "a sequence reaches " + std::to_string(length) + " positions but the runner was sized for " +
                   std::to_string(options_.max_context) + " (prompt + new tokens)");
    shape.rows += count;
    first_wanted[c + 1] = first_wanted[c] + (chunk.all_positions ? count : 1);
    decode_only = decode_only && count == 1 && !chunk.all_positions;
  }
  for (const SequenceChunk& chunk : chunks)
    kv_pool_->reserve(*chunk.sequence, chunk.sequence->length + static_cast<int64_t>(chunk.tokens.size()));
  shape.sequences = std::max<int64_t>(static_cast<int64_t>(chunks.size()), 1);
  shape.wanted = first_wanted.back();
  shape.max_blocks = KvCachePool::blocks_for(options_.max_context);
  shape.decode_only = decode_only;

  // Decode steps are replayed from a graph captured per power-of-two bucket of rows; under an agreement
  // the bucket of the most rows any rank runs, on every rank (an empty rank too, all padding).
  // One process: its own rows (an executor that keeps state per step, like the offloading one's
  // routing log, needs the bracket too).
  // The step's experts per token: agreed by every rank of an exchange, else this rank's rows'.
  shape.top_k = agreement != nullptr && agreement->top_k.top_k > 0 ? agreement->top_k : step_top_k(chunks);
  executor_->begin_step(agreement != nullptr ? agreement->max_rows : shape.rows);
  int64_t bucket = 0;
  const bool graph_step = agreement != nullptr ? agreement->every_rank_decode : decode_only;
  const int64_t bucket_rows = agreement != nullptr ? std::max<int64_t>(agreement->max_rows, 1) : shape.rows;
  if (graph_step && options_.use_graphs && executor_->capturable() &&
      bucket_rows <= options_.max_graph_batch) {
    bucket = 1;
    while (bucket < bucket_rows) bucket *= 2;
    shape.rows = shape.sequences = shape.wanted = bucket;
    shape.decode_only = true;
  }
  shape.tables = workspace_.get(kSlotStepTables, ScalarType::kI32, {shape.table_elements()});
  int64_t at = 0;
  auto take = [&](int64_t count) {
    const Tensor view = shape.tables.rows_view(at, count);
    at += count;
    return view;
  };
  shape.ids = take(shape.rows);
  shape.positions = take(shape.rows);
  shape.row_sequence = take(shape.rows);
  shape.slot_mapping = take(shape.rows);
  shape.wanted_rows = take(shape.wanted);
  shape.block_tables = take(shape.sequences * shape.max_blocks).reshaped({shape.sequences, shape.max_blocks});
  shape.row_top_k = take(shape.rows);
  shape.real_tokens = take(1);
  upload_step_tables(chunks, shape);
  executor_->set_step_top_k(shape.top_k.top_k, shape.top_k.mixed ? shape.row_top_k : Tensor{});
  executor_->set_step_tokens(shape.real_tokens);

  if (bucket > 0) {
    // The tables view starts at the slot's base, so a bucket's views are the same every step; a
    // grown workspace moves buffers, which makes every graph stale.
    if (graphs_generation_ != workspace_.generation()) decode_graphs_.clear();
    // A graph routes the slots per row it was captured with (under an agreement every rank drops
    // its graphs at the same step: the step's top_k is agreed).
    if (graphs_top_k_ != shape.top_k) {
      decode_graphs_.clear();
      graphs_top_k_ = shape.top_k;
    }
    auto graph = decode_graphs_.find(bucket);
    // Agreed: replay only where every rank holds the bucket's graph, else every rank captures it anew.
    if (agreement != nullptr && graph != decode_graphs_.end() &&
        (agreement->common_graph_buckets & (uint64_t{1} << bucket_bit(bucket))) == 0) {
      decode_graphs_.erase(graph);
      graph = decode_graphs_.end();
    }
    if (graph == decode_graphs_.end()) {
      enqueue_forward(shape);  // sizes the workspace for this bucket (and computes this step)
      if (graphs_generation_ != workspace_.generation()) decode_graphs_.clear();
      graphs_generation_ = workspace_.generation();
      std::unique_ptr<Graph> captured = backend_.capture([&] { enqueue_forward(shape); });
      if (captured) decode_graphs_.emplace(bucket, std::move(captured));
    } else {
      graph->second->replay();
      ++graph_replays_;
    }
  } else {
    enqueue_forward(shape);
  }
  executor_->finish_step();

  StepOutput output;
  std::vector<int32_t> wanted_ids(shape.wanted);
  const Tensor next_ids = workspace_.get(kSlotNextIds, ScalarType::kI32, {shape.wanted});
  backend_.copy_to_host(next_ids, 0, wanted_ids.data(), wanted_ids.size() * sizeof(int32_t));
  for (size_t c = 0; c < chunks.size(); ++c) output.greedy_ids.push_back(wanted_ids[first_wanted[c + 1] - 1]);
  // A row with a NaN or Inf (argmax -1): fetch the logits anyway, so the caller can name the first
  // bad value, its sequence and step.
  if (std::find(output.greedy_ids.begin(), output.greedy_ids.end(), -1) != output.greedy_ids.end())
    want_logits = true;
  step_logits_ = workspace_.get(kSlotLogits, ScalarType::kF32, {shape.wanted, config_.vocab_size})
                     .rows_view(0, first_wanted.back());
  if (want_logits) {
    output.logits.vocab = config_.vocab_size;
    output.logits.first_row = first_wanted;
    output.logits.values.resize(static_cast<size_t>(step_logits_.numel()));
    backend_.copy_to_host(step_logits_, 0, output.logits.values.data(), step_logits_.bytes());
  }
  for (const SequenceChunk& chunk : chunks)
    chunk.sequence->length += static_cast<int64_t>(chunk.tokens.size());
  return output;
}

std::vector<float> ModelRunner::forward(std::span<const int32_t> tokens, KvSequence& sequence,
                                        bool all_positions) {
  EPIC_CHECK(!tokens.empty(), ErrorCode::kInvalidArgument, "forward needs at least one token");
  const SequenceChunk chunk{&sequence, tokens, all_positions};
  return std::move(forward_batch(std::span<const SequenceChunk>(&chunk, 1), true).logits.values);
}

}  // namespace epic
