// The model runner on the golden qwen3_moe_f32 fixture (CPU backend): batch composition and
// chunking never change a result (bitwise), the paged KV cache keeps interleaved sequences apart
// and reuses freed blocks, the context and pool limits fail with named errors, greedy ids are the
// argmax of the logits, and non-finite logits stop generation naming the sequence and the step.
#include "worker/model_runner.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <set>

#include "comm/communicator.h"
#include "kernels/error.h"
#include "temp_dir.h"
#include "tests/checkpoint/rewrite_tensor.h"
#include "worker/generation_loop.h"
#include "worker/kv_cache.h"
#include "worker/weight_source.h"

namespace epic {
namespace {

namespace fs = std::filesystem;
const fs::path kCase = fs::path(EPIC_GOLDEN_DIR) / "qwen3_moe_f32";

using Ids = std::vector<int32_t>;
using Logits = std::vector<float>;

// The lowest id among the largest values, written apart from the backends' argmax.
int32_t host_argmax(std::span<const float> row) {
  int32_t best = 0;
  for (size_t i = 1; i < row.size(); ++i)
    if (row[i] > row[best]) best = static_cast<int32_t>(i);
  return best;
}

RunnerOptions runner_options(int64_t max_sequences, int64_t max_context) {
  RunnerOptions options;
  options.max_sequences = max_sequences;
  options.max_context = max_context;
  return options;
}

SequenceChunk chunk(KvSequence& sequence, std::span<const int32_t> tokens, bool all_positions) {
  return SequenceChunk{&sequence, tokens, all_positions};
}

StepOutput run_step(ModelRunner& runner, const std::vector<SequenceChunk>& chunks, bool want_logits = true) {
  return runner.forward_batch(chunks, want_logits);
}

Logits as_vector(std::span<const float> values) { return Logits(values.begin(), values.end()); }

class RunnerOnGolden : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    config_ = new ModelConfig(ModelConfig::load(kCase));
    backend_ = make_cpu_backend().release();
    const std::unique_ptr<WeightSource> source = open_checkpoint_source(kCase);
    weights_ = new ModelWeights(load_model_weights(*config_, *source, *backend_, LoadOptions{}));
  }
  static void TearDownTestSuite() {
    delete weights_;
    delete backend_;
    delete config_;
  }

  void SetUp() override {
    const unsigned seed = std::random_device{}();
    seed_trace_ =
        std::make_unique<::testing::ScopedTrace>(__FILE__, __LINE__, "seed " + std::to_string(seed));
    rng_.seed(seed);
  }

  Ids random_ids(int64_t count) {
    std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(config_->vocab_size - 1));
    Ids ids(static_cast<size_t>(count));
    for (int32_t& v : ids) v = id(rng_);
    return ids;
  }

  // The logits of every position of `tokens` run as one sequence alone, in one chunk.
  static Logits alone(ModelRunner& runner, const Ids& tokens) {
    KvSequence sequence = runner.new_sequence();
    return run_step(runner, {chunk(sequence, tokens, true)}).logits.values;
  }

  // Row `row` of logits holding several rows.
  static Logits row_of(const Logits& logits, int64_t row) {
    const int64_t vocab = config_->vocab_size;
    return Logits(logits.begin() + row * vocab, logits.begin() + (row + 1) * vocab);
  }

  static ModelConfig* config_;
  static Backend* backend_;  // the weights live in its memory
  static ModelWeights* weights_;
  std::unique_ptr<::testing::ScopedTrace> seed_trace_;
  std::mt19937 rng_;
};
ModelConfig* RunnerOnGolden::config_ = nullptr;
Backend* RunnerOnGolden::backend_ = nullptr;
ModelWeights* RunnerOnGolden::weights_ = nullptr;

// ---- (a) batch composition and chunking ---------------------------------------------------------

TEST_F(RunnerOnGolden, SequencesAloneOrTogetherGiveBitwiseTheSameLogits) {
  ModelRunner runner(*config_, *weights_, *backend_, runner_options(4, 64));
  const std::vector<Ids> prompts = {random_ids(5), random_ids(9), random_ids(1)};
  constexpr int kDecodeSteps = 3;
  std::vector<Ids> continuations;  // fed one token per decode step
  for (size_t s = 0; s < prompts.size(); ++s) continuations.push_back(random_ids(kDecodeSteps));

  // Each sequence alone: its prompt in one chunk, then one token per step.
  std::vector<Logits> prompt_alone;
  std::vector<std::vector<Logits>> decode_alone(prompts.size());
  for (size_t s = 0; s < prompts.size(); ++s) {
    KvSequence sequence = runner.new_sequence();
    prompt_alone.push_back(run_step(runner, {chunk(sequence, prompts[s], true)}).logits.values);
    ASSERT_EQ(prompt_alone.back().size(), prompts[s].size() * config_->vocab_size);
    for (int d = 0; d < kDecodeSteps; ++d) {
      const StepOutput out = run_step(runner, {chunk(sequence, std::span(&continuations[s][d], 1), false)});
      decode_alone[s].push_back(out.logits.values);
      ASSERT_EQ(decode_alone[s].back().size(), static_cast<size_t>(config_->vocab_size));
    }
  }

  {
    SCOPED_TRACE("all three in every step");
    std::vector<KvSequence> sequences;
    for (size_t s = 0; s < prompts.size(); ++s) sequences.push_back(runner.new_sequence());
    std::vector<SequenceChunk> chunks;
    for (size_t s = 0; s < prompts.size(); ++s) chunks.push_back(chunk(sequences[s], prompts[s], true));
    const StepOutput prefill = run_step(runner, chunks);
    for (size_t s = 0; s < prompts.size(); ++s)
      EXPECT_EQ(as_vector(prefill.logits.of_chunk(s)), prompt_alone[s]) << "prompt of sequence " << s;
    for (int d = 0; d < kDecodeSteps; ++d) {
      chunks.clear();
      for (size_t s = 0; s < prompts.size(); ++s)
        chunks.push_back(chunk(sequences[s], std::span(&continuations[s][d], 1), false));
      const StepOutput out = run_step(runner, chunks);
      for (size_t s = 0; s < prompts.size(); ++s)
        EXPECT_EQ(as_vector(out.logits.last_row(s)), decode_alone[s][d])
            << "sequence " << s << " decode " << d;
    }
  }
  {
    // As the generation loop batches: sequence 2 prefills while 0 and 1 decode.
    SCOPED_TRACE("a late prefill among decodes");
    KvSequence first = runner.new_sequence(), second = runner.new_sequence(), late = runner.new_sequence();
    const StepOutput prefill =
        run_step(runner, {chunk(first, prompts[0], true), chunk(second, prompts[1], false)});
    EXPECT_EQ(as_vector(prefill.logits.of_chunk(0)), prompt_alone[0]);
    EXPECT_EQ(as_vector(prefill.logits.of_chunk(1)), row_of(prompt_alone[1], 8)) << "last row only";
    const StepOutput mixed = run_step(
        runner, {chunk(first, std::span(&continuations[0][0], 1), false), chunk(late, prompts[2], true),
                 chunk(second, std::span(&continuations[1][0], 1), false)});
    EXPECT_EQ(as_vector(mixed.logits.of_chunk(0)), decode_alone[0][0]);
    EXPECT_EQ(as_vector(mixed.logits.of_chunk(1)), prompt_alone[2]);
    EXPECT_EQ(as_vector(mixed.logits.of_chunk(2)), decode_alone[1][0]);
  }
}

// Records what an expert-parallel executor sees of a step: begin_step's agreed rows, finish_step, and
// each forward's rows; the MoE itself is the local one, so results stay comparable bit for bit.
class RecordingExecutor final : public MoeExecutor {
 public:
  RecordingExecutor(const ModelConfig& config, const ModelWeights& weights, Backend& backend)
      : local_(config, weights, backend) {}
  void forward(int64_t layer, const Tensor& hidden, const Tensor& router_input, const Tensor& out,
               Workspace& workspace) override {
    forward_rows.push_back(hidden.dim(0));
    local_.forward(layer, hidden, router_input, out, workspace);
  }
  bool capturable() const override { return true; }
  void begin_step(int64_t max_rows_on_any_rank) override { begun.push_back(max_rows_on_any_rank); }
  void finish_step() override { ++finished; }

  std::vector<int64_t> begun, forward_rows;
  int finished = 0;

 private:
  LocalMoeExecutor local_;
};

// An agreed step (several ranks): the executor hears the agreed rows around the step, a decode step runs
// the bucket of the most rows any rank has (padding rows beyond this rank's), a rank without sequences
// runs that bucket all padding, and none of it changes this rank's logits.
TEST_F(RunnerOnGolden, AgreedStepsPadToTheCommonBucketAndKeepTheLogits) {
  RecordingExecutor executor(*config_, *weights_, *backend_);
  ModelRunner agreed_runner(*config_, *weights_, *backend_, runner_options(4, 64), &executor);
  ModelRunner plain_runner(*config_, *weights_, *backend_, runner_options(4, 64));
  int64_t moe_layers = 0;
  for (const LayerWeights& layer : weights_->layers) moe_layers += layer.is_moe ? 1 : 0;
  ASSERT_GT(moe_layers, 0);

  // A rank with nothing this step while another decodes 3 rows: bucket 4 of padding, no ids.
  const StepAgreement empty_step{3, true, 0};
  const StepOutput empty = agreed_runner.forward_batch({}, false, &empty_step);
  EXPECT_TRUE(empty.greedy_ids.empty());
  EXPECT_EQ(executor.begun, std::vector<int64_t>{3});
  EXPECT_EQ(executor.finished, 1);
  EXPECT_EQ(executor.forward_rows, std::vector<int64_t>(moe_layers, 4));

  const Ids prompt = random_ids(6), next = random_ids(2);
  KvSequence agreed_sequence = agreed_runner.new_sequence(), plain_sequence = plain_runner.new_sequence();
  // Prefill, agreed as not decode-only: no padding, this rank's 6 rows.
  executor.forward_rows.clear();
  const StepAgreement prefill_step{9, false, 0};
  const Logits agreed_prefill =
      agreed_runner.forward_batch(std::vector<SequenceChunk>{chunk(agreed_sequence, prompt, true)}, true, &prefill_step)
          .logits.values;
  EXPECT_EQ(executor.forward_rows, std::vector<int64_t>(moe_layers, 6));
  EXPECT_EQ(agreed_prefill, run_step(plain_runner, {chunk(plain_sequence, prompt, true)}).logits.values);
  // Decode steps while another rank runs 5 rows: bucket 8, this rank's one row first.
  for (int d = 0; d < 2; ++d) {
    executor.forward_rows.clear();
    const StepAgreement decode_step{5, true, 0};
    const StepOutput agreed =
        agreed_runner.forward_batch(
            std::vector<SequenceChunk>{chunk(agreed_sequence, std::span(&next[d], 1), false)}, true, &decode_step);
    EXPECT_EQ(executor.forward_rows, std::vector<int64_t>(moe_layers, 8)) << "decode step " << d;
    const StepOutput plain = run_step(plain_runner, {chunk(plain_sequence, std::span(&next[d], 1), false)});
    EXPECT_EQ(agreed.logits.values, plain.logits.values) << "decode step " << d;
    EXPECT_EQ(agreed.greedy_ids, plain.greedy_ids) << "decode step " << d;
  }
  EXPECT_EQ(executor.begun, (std::vector<int64_t>{3, 9, 5, 5}));
  EXPECT_EQ(executor.finished, 4);
  // Without an agreement (one process) the executor hears of the step with this step's rows (an executor
  // that keeps state per step, like the offloading one's routing log, needs the bracket too).
  KvSequence alone = agreed_runner.new_sequence();
  run_step(agreed_runner, {chunk(alone, prompt, false)}, false);
  EXPECT_EQ(executor.begun, (std::vector<int64_t>{3, 9, 5, 5, 6}));
  EXPECT_EQ(executor.finished, 5);
}

// The per-expert load (MoeExecutor::count_expert_load, read for /metrics) counts only a step's real rows:
// an agreed decode step padded to a bucket of 8 with one real row, and a step of padding alone, add what
// the same tokens add unpadded, and every MoE layer's counts sum to tokens x experts per token.
TEST_F(RunnerOnGolden, ExpertLoadCountsTheRealRowsOfAPaddedStepOnly) {
  ModelRunner padded(*config_, *weights_, *backend_, runner_options(4, 64));
  ModelRunner plain(*config_, *weights_, *backend_, runner_options(4, 64));
  EXPECT_TRUE(padded.moe_executor().read_expert_load().rows_per_expert.empty()) << "nothing before counting";
  padded.moe_executor().count_expert_load(*backend_, *weights_);
  plain.moe_executor().count_expert_load(*backend_, *weights_);
  const Ids prompt = random_ids(6), next = random_ids(3);
  KvSequence padded_sequence = padded.new_sequence(), plain_sequence = plain.new_sequence();
  const StepAgreement all_padding{3, true, 0};
  padded.forward_batch({}, false, &all_padding);
  const StepAgreement prefill_step{9, false, 0};
  padded.forward_batch(std::vector<SequenceChunk>{chunk(padded_sequence, prompt, true)}, false,
                       &prefill_step);
  run_step(plain, {chunk(plain_sequence, prompt, true)}, false);
  for (size_t d = 0; d < next.size(); ++d) {
    const StepAgreement decode_step{5, true, 0};  // bucket 8: one real row, seven padding
    padded.forward_batch(std::vector<SequenceChunk>{chunk(padded_sequence, std::span(&next[d], 1), false)},
                         false, &decode_step);
    run_step(plain, {chunk(plain_sequence, std::span(&next[d], 1), false)}, false);
  }
  const ExpertLoad counted = padded.moe_executor().read_expert_load();
  EXPECT_TRUE(counted.rows_per_rank.empty()) << "a local executor sends nothing to other ranks";
  int64_t moe_layers = 0;
  for (size_t layer = 0; layer < weights_->layers.size(); ++layer) {
    if (!weights_->layers[layer].is_moe) continue;
    ++moe_layers;
    ASSERT_TRUE(counted.rows_per_expert.count(static_cast<int64_t>(layer))) << "layer " << layer;
    const std::vector<int64_t>& rows = counted.rows_per_expert.at(static_cast<int64_t>(layer));
    EXPECT_EQ(static_cast<int64_t>(rows.size()), weights_->layers[layer].moe.num_experts);
    int64_t total = 0;
    for (int64_t n : rows) total += n;
    EXPECT_EQ(total, static_cast<int64_t>(prompt.size() + next.size()) * config_->num_experts_per_tok)
        << "layer " << layer;
  }
  EXPECT_EQ(static_cast<int64_t>(counted.rows_per_expert.size()), moe_layers);
  EXPECT_EQ(counted.rows_per_expert, plain.moe_executor().read_expert_load().rows_per_expert);
}

TEST_F(RunnerOnGolden, PrefillInOneChunkOrTokenByTokenGivesBitwiseTheSameLogits) {
  ModelRunner runner(*config_, *weights_, *backend_, runner_options(2, 64));
  const Ids prompt = random_ids(21);  // crosses a KV block boundary (16)
  const Logits whole = alone(runner, prompt);
  ASSERT_EQ(whole.size(), prompt.size() * config_->vocab_size);
  {
    KvSequence sequence = runner.new_sequence();
    for (size_t t = 0; t < prompt.size(); ++t) {
      const StepOutput out = run_step(runner, {chunk(sequence, std::span(&prompt[t], 1), false)});
      EXPECT_EQ(out.logits.values, row_of(whole, static_cast<int64_t>(t))) << "position " << t;
    }
    EXPECT_EQ(sequence.length, static_cast<int64_t>(prompt.size()));
  }
  {
    KvSequence sequence = runner.new_sequence();
    Logits pieces;
    for (const auto& [begin, count] : std::vector<std::pair<size_t, size_t>>{{0, 7}, {7, 10}, {17, 4}}) {
      const StepOutput out = run_step(runner, {chunk(sequence, std::span(&prompt[begin], count), true)});
      pieces.insert(pieces.end(), out.logits.values.begin(), out.logits.values.end());
    }
    EXPECT_EQ(pieces, whole) << "chunks of 7, 10 and 4 positions";
  }
}

// ---- (b) the paged KV cache ---------------------------------------------------------------------

TEST_F(RunnerOnGolden, InterleavedBlocksGiveTheLogitsOfEachSequenceAloneAndFreedBlocksAreReused) {
  constexpr int64_t kBlocksPerSequence = 5, kContext = kBlocksPerSequence * kKvBlockSize;
  // Two sequences of the longest context: the pool has exactly their blocks (plus the padding one).
  ModelRunner runner(*config_, *weights_, *backend_, runner_options(2, kContext));
  const Ids tokens_a = random_ids(kContext), tokens_b = random_ids(kContext);
  const Logits alone_a = alone(runner, tokens_a), alone_b = alone(runner, tokens_b);

  std::set<int32_t> blocks_used;
  {
    KvSequence a = runner.new_sequence(), b = runner.new_sequence();
    Logits together_a, together_b;
    // Both grow in every step, by different amounts, so their blocks alternate in the pool.
    for (int64_t at_a = 0, at_b = 0; at_a < kContext || at_b < kContext;) {
      const int64_t step_a = std::min<int64_t>(11, kContext - at_a),
                    step_b = std::min<int64_t>(13, kContext - at_b);
      std::vector<SequenceChunk> chunks;
      if (step_a > 0) chunks.push_back(chunk(a, std::span(&tokens_a[at_a], step_a), true));
      if (step_b > 0) chunks.push_back(chunk(b, std::span(&tokens_b[at_b], step_b), true));
      const StepOutput out = run_step(runner, chunks);
      size_t c = 0;
      if (step_a > 0) {
        const std::span<const float> rows = out.logits.of_chunk(c++);
        together_a.insert(together_a.end(), rows.begin(), rows.end());
      }
      if (step_b > 0) {
        const std::span<const float> rows = out.logits.of_chunk(c++);
        together_b.insert(together_b.end(), rows.begin(), rows.end());
      }
      at_a += step_a;
      at_b += step_b;
    }
    ASSERT_EQ(a.blocks.size(), static_cast<size_t>(kBlocksPerSequence));
    ASSERT_EQ(b.blocks.size(), static_cast<size_t>(kBlocksPerSequence));
    blocks_used.insert(a.blocks.begin(), a.blocks.end());
    blocks_used.insert(b.blocks.begin(), b.blocks.end());
    EXPECT_EQ(blocks_used.size(), static_cast<size_t>(2 * kBlocksPerSequence)) << "a block is shared";
    EXPECT_EQ(blocks_used.count(0), 0u) << "block 0 is the padding block";
    const auto [min_a, max_a] = std::minmax_element(a.blocks.begin(), a.blocks.end());
    EXPECT_TRUE(std::any_of(b.blocks.begin(), b.blocks.end(), [&](int32_t block) {
      return *min_a < block && block < *max_a;
    })) << "the test meant the two sequences' blocks to interleave";
    EXPECT_EQ(together_a, alone_a);
    EXPECT_EQ(together_b, alone_b);
  }

  // Both destroyed: every block is free again (else the pool, sized for exactly two sequences,
  // could not hold two more at full length), and reused blocks hold no trace of their old keys.
  KvSequence c = runner.new_sequence(), d = runner.new_sequence();
  const StepOutput out = run_step(runner, {chunk(c, tokens_b, true), chunk(d, tokens_a, true)});
  EXPECT_EQ(as_vector(out.logits.of_chunk(0)), alone_b);
  EXPECT_EQ(as_vector(out.logits.of_chunk(1)), alone_a);
  std::set<int32_t> blocks_reused(c.blocks.begin(), c.blocks.end());
  blocks_reused.insert(d.blocks.begin(), d.blocks.end());
  EXPECT_EQ(blocks_reused, blocks_used);
}

TEST_F(RunnerOnGolden, PoolHandsOutDisjointBlocksAndTakesThemBack) {
  constexpr int64_t kNumBlocks = 9;  // block 0 is the padding block: 8 to hand out
  KvCachePool pool(*backend_, *config_, ScalarType::kF32, kNumBlocks);
  EXPECT_EQ(pool.free_blocks(), kNumBlocks - 1);
  EXPECT_EQ(pool.bytes(),
            static_cast<size_t>(kNumBlocks * kKvBlockSize * kv_cache_bytes_per_token(*config_)));
  {
    KvSequence a(pool), b(pool);
    pool.reserve(a, 1);
    pool.reserve(b, kKvBlockSize + 1);
    pool.reserve(a, 3 * kKvBlockSize);
    EXPECT_EQ(a.blocks.size(), 3u);
    EXPECT_EQ(b.blocks.size(), 2u);
    EXPECT_EQ(pool.free_blocks(), kNumBlocks - 1 - 5);
    std::set<int32_t> all(a.blocks.begin(), a.blocks.end());
    all.insert(b.blocks.begin(), b.blocks.end());
    EXPECT_EQ(all.size(), 5u);
    EXPECT_EQ(all.count(pool.padding_block()), 0u);
    const std::vector<int32_t> freed = a.blocks;
    {
      KvSequence gone = std::move(a);  // the moved-from sequence gives nothing back twice
    }
    EXPECT_EQ(pool.free_blocks(), kNumBlocks - 1 - 2);
    KvSequence c(pool);
    pool.reserve(c, 3 * kKvBlockSize);
    EXPECT_EQ(c.blocks, freed) << "the most recently freed blocks are reused first";
    KvSequence greedy(pool);
    try {
      pool.reserve(greedy, 4 * kKvBlockSize);  // 3 blocks are left
      FAIL() << "the pool handed out more blocks than it has";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kUnsupported) << e.what();
      EXPECT_NE(std::string(e.what()).find("--max-active-sequences"), std::string::npos) << e.what();
    }
  }
  EXPECT_EQ(pool.free_blocks(), kNumBlocks - 1) << "destroyed sequences gave back every block";
}

// ---- (c) limits ---------------------------------------------------------------------------------

TEST_F(RunnerOnGolden, SequenceLongerThanMaxContextIsAnInvalidArgument) {
  ModelRunner runner(*config_, *weights_, *backend_, runner_options(1, 20));
  auto expect_too_long = [&](KvSequence& sequence, const Ids& tokens, int64_t reached) {
    try {
      run_step(runner, {chunk(sequence, tokens, false)});
      FAIL() << "a sequence of " << reached << " positions ran in a runner sized for 20";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
      for (const std::string word : {std::to_string(reached) + " positions", std::string("20")})
        EXPECT_NE(std::string(e.what()).find(word), std::string::npos) << e.what();
    }
  };
  {
    KvSequence sequence = runner.new_sequence();
    expect_too_long(sequence, random_ids(21), 21);
    EXPECT_EQ(sequence.length, 0);
  }
  KvSequence sequence = runner.new_sequence();
  const Ids first = random_ids(15);
  run_step(runner, {chunk(sequence, first, false)});
  expect_too_long(sequence, random_ids(6), 21);
  EXPECT_EQ(sequence.length, 15) << "a refused step must not advance the sequence";
  const Ids rest = random_ids(5);
  EXPECT_NO_THROW(run_step(runner, {chunk(sequence, rest, false)})) << "exactly max_context positions fit";
  EXPECT_EQ(sequence.length, 20);
}

TEST_F(RunnerOnGolden, ExhaustedPoolNamesMaxActiveSequences) {
  // One sequence of 32 positions: two blocks, all the pool has.
  ModelRunner runner(*config_, *weights_, *backend_, runner_options(1, 2 * kKvBlockSize));
  const Ids tokens = random_ids(2 * kKvBlockSize), one = random_ids(1);
  {
    KvSequence full = runner.new_sequence();
    run_step(runner, {chunk(full, tokens, false)});
    KvSequence extra = runner.new_sequence();
    try {
      run_step(runner, {chunk(extra, one, false)});
      FAIL() << "a second sequence ran in a pool sized for one";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kUnsupported) << e.what();
      EXPECT_NE(std::string(e.what()).find("--max-active-sequences"), std::string::npos) << e.what();
    }
  }
  KvSequence again = runner.new_sequence();  // the blocks came back
  EXPECT_NO_THROW(run_step(runner, {chunk(again, tokens, false)}));
}

// ---- (d) greedy ids -----------------------------------------------------------------------------

TEST_F(RunnerOnGolden, GreedyIdsAreTheArgmaxOfTheLogitsWithOrWithoutFetchingThem) {
  ModelRunner runner(*config_, *weights_, *backend_, runner_options(6, 64));
  const std::vector<Ids> prompts = {random_ids(6), random_ids(1), random_ids(17)};
  std::vector<KvSequence> fetched, unfetched;
  for (size_t s = 0; s < prompts.size(); ++s) {
    fetched.push_back(runner.new_sequence());
    unfetched.push_back(runner.new_sequence());
  }
  std::vector<Ids> feed = prompts;
  for (int step = 0; step < 5; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    std::vector<SequenceChunk> with, without;
    for (size_t s = 0; s < prompts.size(); ++s) {
      with.push_back(chunk(fetched[s], feed[s], s == 0));
      without.push_back(chunk(unfetched[s], feed[s], s == 0));
    }
    const StepOutput out = run_step(runner, with, true);
    const StepOutput ids_only = run_step(runner, without, false);
    EXPECT_TRUE(ids_only.logits.values.empty()) << "logits fetched without being asked for";
    ASSERT_EQ(out.greedy_ids.size(), prompts.size());
    EXPECT_EQ(ids_only.greedy_ids, out.greedy_ids);
    for (size_t s = 0; s < prompts.size(); ++s) {
      EXPECT_EQ(out.greedy_ids[s], host_argmax(out.logits.last_row(s))) << "sequence " << s;
      feed[s] = {out.greedy_ids[s]};
    }
  }
}

// ---- (e) non-finite logits ----------------------------------------------------------------------

std::string error_of(const std::function<void()>& action) {
  try {
    action();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidCheckpoint) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "no error";
  return "";
}

TEST_F(RunnerOnGolden, NonFiniteLogitsStopGenerationNamingSequenceAndStep) {
  const auto comm = make_self_communicator();
  SequenceRequest greedy, sampled;
  greedy.sequence_id = 5;
  greedy.max_new_tokens = 3;
  sampled.sequence_id = 6;
  sampled.max_new_tokens = 3;
  sampled.sampling = {0.8, 0.9, 7};
  // The first token each would generate on the clean model: its embedding row gets a NaN, so the
  // prefill (step 0) stays finite and decode step 1, which feeds that token, is not.
  int32_t greedy_first = -1, sampled_first = -1;
  bool found = false;
  for (int attempt = 0; attempt < 50 && !found; ++attempt) {
    greedy.prompt = random_ids(4);
    sampled.prompt = random_ids(4);
    ModelRunner runner(*config_, *weights_, *backend_, runner_options(2, 16));
    const std::vector<SequenceResult> clean = run_generation(runner, {greedy, sampled}, *comm);
    greedy_first = clean.at(0).new_ids.at(0);
    sampled_first = clean.at(1).new_ids.at(0);
    auto in = [](const Ids& ids, int32_t id) { return std::find(ids.begin(), ids.end(), id) != ids.end(); };
    found = !in(greedy.prompt, greedy_first) && !in(greedy.prompt, sampled_first) &&
            !in(sampled.prompt, greedy_first) && !in(sampled.prompt, sampled_first);
  }
  ASSERT_TRUE(found) << "no prompts avoid the tokens they generate";

  testing::TempDir temp;
  const int64_t hidden = config_->hidden_size;
  testing::copy_with_edited_tensor(
      kCase, temp.path() / "m", "model.embed_tokens.weight", [&](std::vector<float>& values) {
        values[greedy_first * hidden + 3] = std::numeric_limits<float>::quiet_NaN();
        values[sampled_first * hidden + 7] = std::numeric_limits<float>::quiet_NaN();
      });
  const std::unique_ptr<WeightSource> source = open_checkpoint_source(temp.path() / "m");
  LoadOptions load_options;
  load_options.allow_nonfinite_weights = true;
  const ModelWeights poisoned = load_model_weights(*config_, *source, *backend_, load_options);
  ModelRunner runner(*config_, poisoned, *backend_, runner_options(2, 16));

  // A companion that stops after its prefill (nothing poisoned is fed) must not be blamed.
  SequenceRequest companion = greedy;
  companion.sequence_id = 4;
  companion.max_new_tokens = 1;
  for (const auto& [request, words] : std::vector<std::pair<SequenceRequest, std::string>>{
           {greedy, "sequence 5, decode step 1"}, {sampled, "sequence 6, decode step 1"}}) {
    SCOPED_TRACE(request.sampling.temperature == 0 ? "greedy (logits not fetched)" : "sampling");
    const std::string message = error_of([&] { run_generation(runner, {companion, request}, *comm); });
    for (const std::string word : {words, std::string("NaN at token id 0"), std::string("not finite")})
      EXPECT_NE(message.find(word), std::string::npos) << message;
  }
  SequenceRequest poisoned_prompt = greedy;
  poisoned_prompt.sequence_id = 9;
  poisoned_prompt.prompt.push_back(greedy_first);
  const std::string message = error_of([&] { run_generation(runner, {poisoned_prompt}, *comm); });
  EXPECT_NE(message.find("sequence 9, prefill (step 0)"), std::string::npos) << message;

  // The runner alone: the poisoned row's greedy id is -1, the clean row beside it keeps its id.
  KvSequence bad = runner.new_sequence(), good = runner.new_sequence();
  const Ids bad_tokens = {greedy_first};
  const StepOutput out =
      run_step(runner, {chunk(bad, bad_tokens, false), chunk(good, greedy.prompt, false)}, false);
  EXPECT_EQ(out.greedy_ids, (Ids{-1, greedy_first}));
}

}  // namespace
}  // namespace epic
