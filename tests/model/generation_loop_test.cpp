// The generation loop's bound on live sequences and its streaming of results: any
// max_active_sequences gives bitwise the results of running every sequence at once, never more
// than that many sequences are live, results reach the sink as they finish, and what reached the
// sink stays delivered when a later step fails.
#include "worker/generation_loop.h"

#include <gtest/gtest.h>

#include <map>

#include "comm/communicator.h"
#include "kernels/backend.h"
#include "kernels/error.h"
#include "tests/model/cpu_fixture_model.h"
#include "worker/kv_cache.h"
#include "worker/model_config.h"
#include "worker/model_runner.h"
#include "worker/model_weights.h"
#include "worker/weight_source.h"

namespace epic {
namespace {


class GenerationLoop : public testing::CpuFixtureModelTest {
 protected:
  // Room for every test's sequences: 7 live at once, prompts + new tokens well under 64 positions.
  static RunnerOptions runner_options() {
    RunnerOptions options;
    options.max_sequences = 8;
    options.max_context = 64;
    return options;
  }

  // Seven prompts of different lengths (ids identify the prompt), mixed greedy and sampled, with
  // different token budgets so they finish at different steps.
  static std::vector<SequenceRequest> requests() {
    std::vector<SequenceRequest> sequences;
    for (int64_t s = 0; s < 7; ++s) {
      SequenceRequest request;
      request.sequence_id = s;
      for (int64_t t = 0; t <= s % 4; ++t) request.prompt.push_back(static_cast<int32_t>(10 * s + t + 1));
      request.max_new_tokens = 1 + (s * 3) % 5;
      request.want_prompt_logits = s % 2 == 0;
      request.sampling = {s % 3 == 0 ? 0.0 : 0.8, 0.9, 42};
      sequences.push_back(request);
    }
    return sequences;
  }

  struct Run {
    std::vector<SequenceResult> results;  // in the order the sink received them
    GenerationStats stats;
  };
  static Run run(const std::vector<SequenceRequest>& sequences, int64_t max_active) {
    ModelRunner runner(*config_, *weights_, *backend_, runner_options());
    const auto comm = make_self_communicator();
    Run out;
    GenerationOptions options;
    options.max_active_sequences = max_active;
    out.stats = run_generation(runner, sequences, *comm, options,
                               [&](SequenceResult&& result) { out.results.push_back(std::move(result)); });
    return out;
  }
};

TEST_F(GenerationLoop, AnyBoundOnLiveSequencesGivesBitwiseTheSameResults) {
  const std::vector<SequenceRequest> sequences = requests();
  const Run all_at_once = run(sequences, 64);
  ASSERT_EQ(all_at_once.results.size(), sequences.size());
  std::map<int64_t, const SequenceResult*> reference;
  for (const SequenceResult& result : all_at_once.results) reference[result.sequence_id] = &result;
  ASSERT_EQ(reference.size(), sequences.size());
  for (int64_t max_active : {1, 2, 3, 6}) {
    SCOPED_TRACE("max_active_sequences " + std::to_string(max_active));
    const Run bounded = run(sequences, max_active);
    EXPECT_LE(bounded.stats.most_active_sequences, max_active);
    EXPECT_EQ(bounded.stats.most_active_sequences, max_active)
        << "the bound should be reached with 7 prompts";
    ASSERT_EQ(bounded.results.size(), sequences.size());
    for (const SequenceResult& result : bounded.results) {
      const SequenceResult& expected = *reference.at(result.sequence_id);
      EXPECT_EQ(result.new_ids, expected.new_ids) << "sequence " << result.sequence_id;
      // Bitwise: vectors of float compare with ==, and a NaN would fail too.
      EXPECT_EQ(result.prompt_logits, expected.prompt_logits) << "sequence " << result.sequence_id;
      EXPECT_EQ(result.prompt_logits.empty(), !sequences[result.sequence_id].want_prompt_logits);
    }
  }
  EXPECT_EQ(all_at_once.stats.most_active_sequences, 7);
}

TEST_F(GenerationLoop, OneLiveSequenceDeliversResultsInAdmissionOrderOneAtATime) {
  const std::vector<SequenceRequest> sequences = requests();
  const Run one = run(sequences, 1);
  ASSERT_EQ(one.results.size(), sequences.size());
  for (size_t i = 0; i < one.results.size(); ++i)
    EXPECT_EQ(one.results[i].sequence_id, static_cast<int64_t>(i));
  // Each sequence runs alone: one prefill step plus a step per further token.
  int64_t steps = 0;
  for (const SequenceResult& result : one.results) steps += std::max<int64_t>(1, result.new_ids.size());
  EXPECT_EQ(one.stats.steps, steps);
}

TEST_F(GenerationLoop, ResultsDeliveredBeforeALaterFailureStayDelivered) {
  std::vector<SequenceRequest> sequences = requests();
  sequences.resize(3);
  sequences[2].prompt = {1, static_cast<int32_t>(config_->vocab_size)};  // fails when admitted
  ModelRunner runner(*config_, *weights_, *backend_, runner_options());
  const auto comm = make_self_communicator();
  std::vector<int64_t> delivered;
  GenerationOptions options;
  options.max_active_sequences = 1;
  try {
    run_generation(runner, sequences, *comm, options,
                   [&](SequenceResult&& result) { delivered.push_back(result.sequence_id); });
    FAIL() << "a prompt id outside the vocabulary must fail its step";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
  }
  EXPECT_EQ(delivered, (std::vector<int64_t>{0, 1}))
      << "results finished before the failing step were held back";
}

TEST_F(GenerationLoop, BoundOutsideItsRangeIsRefused) {
  for (int64_t bad : {int64_t{0}, int64_t{-3}, kMaxActiveSequencesBound + 1}) {
    try {
      run(requests(), bad);
      FAIL() << "max_active_sequences " << bad << " accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
      EXPECT_NE(std::string(e.what()).find("--max-active-sequences"), std::string::npos) << e.what();
    }
  }
}

TEST(KvCacheBytes, TwoTensorsPerLayerOfKvHeadsTimesHeadDimOfTheCacheType) {
  ModelConfig config;
  config.num_hidden_layers = 48;
  config.num_key_value_heads = 4;
  config.head_dim = 128;
  EXPECT_EQ(kv_cache_bytes_per_token(config), 2 * 48 * 4 * 128 * 4);  // Qwen3-30B-A3B: 192 KiB
  EXPECT_EQ(kv_cache_bytes_per_token(config, ScalarType::kF32), 2 * 48 * 4 * 128 * 4);
  EXPECT_EQ(kv_cache_bytes_per_token(config, ScalarType::kBF16), 2 * 48 * 4 * 128 * 2);  // the cuda bf16 mode
}

}  // namespace
}  // namespace epic
