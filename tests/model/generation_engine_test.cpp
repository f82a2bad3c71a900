// The step loop as an engine (worker/generation_engine.h) on the committed qwen3_moe_f32 fixture, CPU
// backend: sequences admitted between steps, while others decode, get bitwise the tokens and prompt logits
// they get alone (greedy and sampled); the tokens a step reports join up to each result; a sequence ends
// exactly once; cancelling a live or waiting sequence drops it (its cache freed: the slot serves the next);
// the live bound holds; bad admissions are refused; a sequence resumed with the tokens it already produced
// (epic serve after a worker job restart) goes on with exactly the tokens an uninterrupted run gives.
#include "worker/generation_engine.h"

#include <gtest/gtest.h>

#include <map>
#include <optional>
#include <vector>

#include "comm/communicator.h"
#include "kernels/backend.h"
#include "kernels/error.h"
#include "tests/model/cpu_fixture_model.h"
#include "worker/model_config.h"
#include "worker/model_runner.h"
#include "worker/model_weights.h"
#include "worker/weight_source.h"

namespace epic {
namespace {


class Engine : public testing::CpuFixtureModelTest {
 protected:
  static RunnerOptions runner_options(int64_t max_sequences) {
    RunnerOptions options;
    options.max_sequences = max_sequences;
    options.max_context = 64;
    return options;
  }
  static SequenceRequest request(int64_t id) {
    SequenceRequest request;
    request.sequence_id = id;
    for (int64_t t = 0; t <= id % 5; ++t) request.prompt.push_back(static_cast<int32_t>(7 * id + 3 * t + 2));
    request.max_new_tokens = 2 + (id * 5) % 7;
    request.want_prompt_logits = id % 2 == 1;
    request.sampling = {id % 3 == 0 ? 0.0 : 0.9, 0.95, 11};
    return request;
  }
  // The sequence run alone through run_generation: the reference.
  static SequenceResult alone(const SequenceRequest& sequence) {
    ModelRunner runner(*config_, *weights_, *backend_, runner_options(1));
    const auto comm = make_self_communicator();
    return run_generation(runner, std::vector<SequenceRequest>{sequence}, *comm).at(0);
  }
};

TEST_F(Engine, SequencesJoiningBetweenStepsGetTheirTokensAlone) {
  ModelRunner runner(*config_, *weights_, *backend_, runner_options(3));
  GenerationEngine engine(runner, 3);
  std::map<int64_t, std::vector<int32_t>> streamed;
  std::map<int64_t, SequenceResult> results;
  const auto run_step = [&] {
    const PlannedStep plan = engine.next_step();
    EXPECT_LE(engine.live_sequences() + plan.joining, 3);
    for (SequenceStepEvent& event : engine.step()) {
      if (event.token) streamed[event.sequence_id].push_back(*event.token);
      if (event.finished) {
        EXPECT_EQ(results.count(event.sequence_id), 0u) << "sequence " << event.sequence_id << " ended twice";
        results[event.sequence_id] = std::move(*event.finished);
      }
    }
  };
  // Two at first; then one more every other step while they decode; seven in all, three live at most.
  engine.admit(request(0));
  engine.admit(request(1));
  int64_t next = 2;
  for (int step = 0; !engine.idle() || next < 7; ++step) {
    if (step % 2 == 1 && next < 7) engine.admit(request(next++));
    if (engine.idle()) continue;
    run_step();
    ASSERT_LT(step, 200) << "the engine never went idle";
  }
  EXPECT_EQ(engine.stats().most_active_sequences, 3);
  ASSERT_EQ(results.size(), 7u);
  for (int64_t id = 0; id < 7; ++id) {
    SCOPED_TRACE("sequence " + std::to_string(id));
    const SequenceResult expected = alone(request(id));
    EXPECT_EQ(results[id].new_ids, expected.new_ids);
    EXPECT_TRUE(results[id].prompt_logits == expected.prompt_logits) << "prompt logits differ";
    EXPECT_EQ(streamed[id], expected.new_ids) << "the streamed tokens do not join up to the result";
  }
}

TEST_F(Engine, CancelDropsALiveOrWaitingSequenceAndFreesItsSlot) {
  ModelRunner runner(*config_, *weights_, *backend_, runner_options(2));
  GenerationEngine engine(runner, 2);
  SequenceRequest long_one = request(1);
  long_one.max_new_tokens = 20;
  engine.admit(long_one);
  engine.admit(request(2));
  engine.admit(request(3));  // waits: two live at most
  engine.step();
  EXPECT_EQ(engine.live_sequences(), 2);
  EXPECT_EQ(engine.waiting_sequences(), 1);
  EXPECT_TRUE(engine.cancel(1));   // live
  EXPECT_TRUE(engine.cancel(3));   // waiting
  EXPECT_FALSE(engine.cancel(3));  // gone already
  EXPECT_FALSE(engine.cancel(99));
  EXPECT_EQ(engine.live_sequences(), 1);
  EXPECT_EQ(engine.waiting_sequences(), 0);
  // The freed slot takes a new sequence at once; the cancelled ones never report again.
  engine.admit(request(4));
  EXPECT_EQ(engine.next_step().joining, 1);
  std::map<int64_t, SequenceResult> results;
  while (!engine.idle())
    for (SequenceStepEvent& event : engine.step()) {
      EXPECT_NE(event.sequence_id, 1);
      EXPECT_NE(event.sequence_id, 3);
      if (event.finished) results[event.sequence_id] = std::move(*event.finished);
    }
  EXPECT_EQ(results.size(), 2u);
  EXPECT_EQ(results[2].new_ids, alone(request(2)).new_ids);
  EXPECT_EQ(results[4].new_ids, alone(request(4)).new_ids);
  // An id may come back once its sequence is gone.
  engine.admit(request(1));
  EXPECT_TRUE(engine.cancel(1));
}

// epic serve resumes a sequence after its worker job died with the tokens it already streamed: they are
// prefilled after the prompt, not reported again, and the sampler skips their draws. The tokens after them
// must be bitwise those of an uninterrupted run, greedy and sampled.
TEST_F(Engine, ResumedSequenceGoesOnAsIfUninterrupted) {
  for (const double temperature : {0.0, 0.9}) {
    SequenceRequest whole = request(4);
    whole.want_prompt_logits = false;
    whole.max_new_tokens = 10;
    whole.sampling = {temperature, 0.95, 23};
    const SequenceResult reference = alone(whole);
    ASSERT_GE(reference.new_ids.size(), 3u);
    for (const size_t already : {size_t{1}, reference.new_ids.size() - 1}) {
      SCOPED_TRACE("temperature " + std::to_string(temperature) + ", resumed after " + std::to_string(already));
      ModelRunner runner(*config_, *weights_, *backend_, runner_options(2));
      GenerationEngine engine(runner, 2);
      SequenceRequest resumed = whole;
      resumed.resumed_ids.assign(reference.new_ids.begin(), reference.new_ids.begin() + already);
      engine.admit(resumed);
      engine.admit(request(2));  // company in the batch changes nothing
      const PlannedStep plan = engine.next_step();
      EXPECT_EQ(plan.rows, static_cast<int64_t>(whole.prompt.size() + already + request(2).prompt.size()));
      std::vector<int32_t> reported;
      std::optional<SequenceResult> finished;
      while (!engine.idle())
        for (SequenceStepEvent& event : engine.step()) {
          if (event.sequence_id != whole.sequence_id) continue;
          if (event.token) reported.push_back(*event.token);
          if (event.finished) finished = std::move(event.finished);
        }
      const std::vector<int32_t> rest(reference.new_ids.begin() + already, reference.new_ids.end());
      EXPECT_EQ(reported, rest);
      ASSERT_TRUE(finished.has_value());
      EXPECT_EQ(finished->new_ids, reference.new_ids);
    }
  }
}

// A long prompt fed in chunks of a few tokens a step: its tokens and prompt logits are bitwise those of a
// prompt fed at once, and a sequence already decoding gets its token every step meanwhile (no stall).
TEST_F(Engine, ChunkedPrefillKeepsResultsAndNeverStallsDecodes) {
  SequenceRequest long_prompt = request(8);
  long_prompt.prompt.clear();
  for (int32_t t = 0; t < 11; ++t) long_prompt.prompt.push_back(static_cast<int32_t>(13 * t + 5));
  long_prompt.want_prompt_logits = true;
  long_prompt.max_new_tokens = 4;
  SequenceRequest short_prompt = request(3);
  short_prompt.max_new_tokens = 12;
  const SequenceResult long_alone = alone(long_prompt), short_alone = alone(short_prompt);

  ModelRunner runner(*config_, *weights_, *backend_, runner_options(2));
  GenerationEngine engine(runner, 2, /*prefill_chunk_tokens=*/4);
  engine.admit(short_prompt);
  std::map<int64_t, std::vector<int32_t>> streamed;
  std::map<int64_t, SequenceResult> results;
  const auto run_step = [&] {
    std::map<int64_t, bool> got_token;
    for (SequenceStepEvent& event : engine.step()) {
      if (event.token) streamed[event.sequence_id].push_back(*event.token), got_token[event.sequence_id] = true;
      if (event.finished) results[event.sequence_id] = std::move(*event.finished);
    }
    return got_token;
  };
  ASSERT_LE(short_prompt.prompt.size(), 4u);
  run_step();  // the short prompt's prefill (within the chunk)
  engine.admit(long_prompt);
  // 11 prompt tokens at 4 a step: 3 steps of prefill, the first token at the 3rd; the short sequence decodes
  // in each of them.
  for (int step = 1; step <= 3; ++step) {
    const PlannedStep plan = engine.next_step();
    EXPECT_EQ(plan.rows, 1 + (step < 3 ? 4 : 3)) << "step " << step;
    EXPECT_FALSE(plan.decode_only);
    const auto got = run_step();
    EXPECT_TRUE(got.count(short_prompt.sequence_id)) << "the decoding sequence stalled at step " << step;
    EXPECT_EQ(got.count(long_prompt.sequence_id), step == 3 ? 1u : 0u) << "step " << step;
  }
  while (!engine.idle()) run_step();
  EXPECT_EQ(results.at(long_prompt.sequence_id).new_ids, long_alone.new_ids);
  EXPECT_EQ(results.at(long_prompt.sequence_id).prompt_logits, long_alone.prompt_logits);
  EXPECT_EQ(results.at(short_prompt.sequence_id).new_ids, short_alone.new_ids);
  EXPECT_EQ(streamed[long_prompt.sequence_id], long_alone.new_ids);
}

// A KV cache of a few blocks: sequences join only while their longest caches fit together, the rest wait
// (and then run to the same tokens); one that could never fit is refused at admission.
TEST_F(Engine, KvCacheBudgetHoldsSequencesBackUntilTheyFit) {
  RunnerOptions options = runner_options(4);
  options.kv_cache_tokens = 2 * kKvBlockSize;  // two sequences of at most one block each
  ModelRunner runner(*config_, *weights_, *backend_, options);
  GenerationEngine engine(runner, 4);
  std::map<int64_t, SequenceResult> expected;
  for (int64_t id = 0; id < 5; ++id) {
    SequenceRequest sequence = request(id);
    sequence.want_prompt_logits = false;
    engine.admit(sequence);
    expected[id] = alone(sequence);
  }
  std::map<int64_t, SequenceResult> results;
  for (int guard = 0; !engine.idle() && guard < 200; ++guard)
    for (SequenceStepEvent& event : engine.step())
      if (event.finished) results[event.sequence_id] = std::move(*event.finished);
  EXPECT_EQ(engine.stats().most_active_sequences, 2);
  for (auto& [id, result] : expected) EXPECT_EQ(results.at(id).new_ids, result.new_ids) << "sequence " << id;
  SequenceRequest too_long = request(9);
  too_long.max_new_tokens = 3 * kKvBlockSize;
  EXPECT_THROW(engine.admit(too_long), Error);
  EXPECT_THROW(GenerationEngine(runner, 2, -1), Error);
}

TEST_F(Engine, RefusesBadAdmissions) {
  ModelRunner runner(*config_, *weights_, *backend_, runner_options(2));
  GenerationEngine engine(runner, 2);
  SequenceRequest empty = request(1);
  empty.prompt.clear();
  EXPECT_THROW(engine.admit(empty), Error);
  engine.admit(request(1));
  EXPECT_THROW(engine.admit(request(1)), Error);  // the same id twice
  EXPECT_THROW(GenerationEngine(runner, 0), Error);
  const PlannedStep plan = engine.next_step();
  EXPECT_EQ(plan.unfinished, 1);
  EXPECT_EQ(plan.joining, 1);
  EXPECT_FALSE(plan.decode_only);
  EXPECT_EQ(plan.rows, static_cast<int64_t>(request(1).prompt.size()));
}

}  // namespace
}  // namespace epic
