// A residency state per request (SequenceChunk::top_k): sequences with different experts per token share
// every step, and each gets, bitwise, the logits it gets in a step of its own k (the routing policy of
// that k, the sequence alone), with the local executor and with an expert store under a budget (wait
// and read in place); an agreed step routes the agreed slots; the store's statistics count each row's
// own picks, never the padding; an out-of-range k is refused naming the range.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "../checkpoint/small_model.h"
#include "kernels/backend.h"
#include "kernels/error.h"
#include "worker/model_runner.h"
#include "worker/offloading_moe_executor.h"
#include "worker/routing_policy.h"
#include "worker/weight_source.h"

namespace epic {
namespace {

using Ids = std::vector<int32_t>;
using Logits = std::vector<float>;

// The small preset routing 6 of its 8 experts, so 1, 4 and 6 experts per token all differ.
struct Model {
  ModelConfig config;
  uint64_t seed = 0;
  std::unique_ptr<WeightSource> source;
  ModelWeights full;
};

std::unique_ptr<Model> random_model(Backend& backend) {
  auto model = std::make_unique<Model>();
  ModelPreset preset = testing::small_preset(DType::kF32);
  preset.config.num_experts_per_tok = 6;
  model->config = preset.config;
  model->seed = std::random_device{}();
  model->source = make_random_source(model->config, preset.storage, model->seed, "random tiny top-6");
  model->full = load_model_weights(model->config, *model->source, backend, {});
  return model;
}

struct Sequence {
  Ids prompt, continuation;  // the continuation is fed one token per decode step
  int64_t top_k = 0;
};

// Every prompt position's logits, then each decode step's, of `sequences` run together: prompts in one
// step, then one token each per step, every chunk with its own top_k.
std::vector<Logits> run_together(ModelRunner& runner, const std::vector<Sequence>& sequences,
                                 const StepAgreement* agreement = nullptr) {
  std::vector<KvSequence> caches;
  for (size_t s = 0; s < sequences.size(); ++s) caches.push_back(runner.new_sequence());
  std::vector<Logits> logits(sequences.size());
  std::vector<SequenceChunk> chunks;
  for (size_t s = 0; s < sequences.size(); ++s)
    chunks.push_back({&caches[s], sequences[s].prompt, true, sequences[s].top_k});
  StepOutput out = runner.forward_batch(chunks, true, agreement);
  for (size_t s = 0; s < sequences.size(); ++s) {
    const auto rows = out.logits.of_chunk(s);
    logits[s].assign(rows.begin(), rows.end());
  }
  for (size_t d = 0; d < sequences[0].continuation.size(); ++d) {
    chunks.clear();
    for (size_t s = 0; s < sequences.size(); ++s)
      chunks.push_back({&caches[s], std::span(&sequences[s].continuation[d], 1), false, sequences[s].top_k});
    out = runner.forward_batch(chunks, true, agreement);
    for (size_t s = 0; s < sequences.size(); ++s) {
      const auto row = out.logits.last_row(s);
      logits[s].insert(logits[s].end(), row.begin(), row.end());
    }
  }
  return logits;
}

class ResidencyPerRequest : public ::testing::Test {
 protected:
  void SetUp() override {
    backend_ = make_cpu_backend();
    model_ = random_model(*backend_);
    trace_ =
        std::make_unique<::testing::ScopedTrace>(__FILE__, __LINE__, "seed " + std::to_string(model_->seed));
    std::mt19937 rng(model_->seed);
    std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(model_->config.vocab_size - 1));
    const int64_t lengths[] = {5, 9, 1, 4};
    const int64_t top_ks[] = {1, 6, 4, 0};  // 0: the policy's (the trained 6)
    for (int s = 0; s < 4; ++s) {
      Sequence sequence;
      sequence.prompt.resize(static_cast<size_t>(lengths[s]));
      sequence.continuation.resize(3);
      for (int32_t& v : sequence.prompt) v = id(rng);
      for (int32_t& v : sequence.continuation) v = id(rng);
      sequence.top_k = top_ks[s];
      sequences_.push_back(sequence);
    }
    options_.max_sequences = 8;
    options_.max_context = 64;
  }

  // A sequence alone, with a routing policy of k experts per token instead of a per-chunk k.
  Logits alone(const Sequence& sequence, int64_t k) {
    ModelRunner runner(model_->config, model_->full, *backend_, options_);
    runner.set_routing(RoutingPolicy::make(model_->config, model_->full, *backend_, k, {}));
    Sequence plain = sequence;
    plain.top_k = 0;
    return run_together(runner, {plain})[0];
  }
  std::vector<Logits> expected_alone() {
    std::vector<Logits> logits;
    for (const Sequence& sequence : sequences_)
      logits.push_back(
          alone(sequence, sequence.top_k == 0 ? model_->config.num_experts_per_tok : sequence.top_k));
    return logits;
  }

  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<::testing::ScopedTrace> trace_;
  std::vector<Sequence> sequences_;
  RunnerOptions options_;
};

TEST_F(ResidencyPerRequest, EachSequenceGetsTheLogitsOfItsOwnStateWithTheLocalExecutor) {
  const std::vector<Logits> expected = expected_alone();
  ASSERT_NE(expected[0], expected[1]);
  ModelRunner runner(model_->config, model_->full, *backend_, options_);
  const std::vector<Logits> together = run_together(runner, sequences_);
  for (size_t s = 0; s < sequences_.size(); ++s)
    EXPECT_TRUE(together[s] == expected[s]) << "sequence " << s << " (top_k " << sequences_[s].top_k << ")";

  // Under a WAKE policy (4 per token) a chunk may still ask for more: the chunk's own k wins.
  runner.set_routing(RoutingPolicy::make(model_->config, model_->full, *backend_, 4, {}));
  const std::vector<Logits> under_wake = run_together(runner, sequences_);
  for (size_t s = 0; s < 3; ++s) EXPECT_TRUE(under_wake[s] == expected[s]) << "sequence " << s;
  EXPECT_TRUE(under_wake[3] == alone(sequences_[3], 4)) << "top_k 0 takes the policy's 4";
}

TEST_F(ResidencyPerRequest, AnExpertStoreUnderABudgetGivesTheSameLogitsAndCountsEachRowsOwnPicks) {
  const std::vector<Logits> expected = expected_alone();
  LoadOptions no_experts;
  no_experts.hosts_expert = [](int64_t, int64_t) { return false; };
  const ModelWeights routers = load_model_weights(model_->config, *model_->source, *backend_, no_experts);
  int64_t moe_layers = 0;
  for (const LayerWeights& layer : routers.layers) moe_layers += layer.is_moe ? 1 : 0;
  int64_t own_picks = 0;  // every row's own k, over the prompt and decode steps
  for (const Sequence& sequence : sequences_) {
    const int64_t k = sequence.top_k == 0 ? model_->config.num_experts_per_tok : sequence.top_k;
    own_picks += k * static_cast<int64_t>(sequence.prompt.size() + sequence.continuation.size());
  }
  for (const OnMiss on_miss : {OnMiss::kWait, OnMiss::kRead}) {
    SCOPED_TRACE(on_miss_name(on_miss));
    ExpertStoreOptions store_options;
    store_options.tier = ExpertTier::kHost;
    for (int64_t layer = 0; layer < model_->config.num_hidden_layers; ++layer)
      if (model_->config.is_moe_layer(layer)) store_options.budget.slots_by_layer[layer] = 3;
    ExpertStore store(model_->config, *model_->source, *backend_, store_options);
    OffloadingMoeExecutor executor(model_->config, routers, *backend_, store, on_miss);
    ModelRunner runner(model_->config, routers, *backend_, options_, &executor);
    const std::vector<Logits> together = run_together(runner, sequences_);
    for (size_t s = 0; s < sequences_.size(); ++s)
      EXPECT_TRUE(together[s] == expected[s]) << "sequence " << s;
    EXPECT_EQ(executor.stats().picks, own_picks * moe_layers) << "padding slots are not picks";
    if (on_miss == OnMiss::kRead)
      EXPECT_EQ(executor.stats().demand_hits + executor.stats().demand_misses, own_picks * moe_layers);
  }
}

// Under an agreement (an expert-parallel step) every rank routes the agreed slots: this rank's rows in
// fewer experts per token are padded, a rank whose rows all take the agreed k runs them unpadded.
TEST_F(ResidencyPerRequest, AnAgreedStepRoutesTheAgreedSlotsAndKeepsEachRowsResult) {
  const std::vector<Logits> expected = expected_alone();
  ModelRunner runner(model_->config, model_->full, *backend_, options_);
  StepAgreement agreement{64, false, 0, {}};
  agreement.top_k = StepTopK{6, true};  // another rank runs FOCUS rows
  const std::vector<Sequence> wake_only = {sequences_[0], sequences_[2]};
  const std::vector<Logits> padded = run_together(runner, wake_only, &agreement);
  EXPECT_TRUE(padded[0] == expected[0]);
  EXPECT_TRUE(padded[1] == expected[2]);
  agreement.top_k = StepTopK{6, false};
  const std::vector<Logits> focus = run_together(runner, {sequences_[1], sequences_[3]}, &agreement);
  EXPECT_TRUE(focus[0] == expected[1]);
  EXPECT_TRUE(focus[1] == expected[3]);
}

TEST_F(ResidencyPerRequest, AnExpertsPerTokenOutsideTheModelsRangeIsRefused) {
  ModelRunner runner(model_->config, model_->full, *backend_, options_);
  for (const int64_t bad : {int64_t{7}, int64_t{-1}}) {
    KvSequence cache = runner.new_sequence();
    const SequenceChunk chunk{&cache, sequences_[0].prompt, false, bad};
    try {
      runner.forward_batch(std::span(&chunk, 1), false);
      ADD_FAILURE() << "top_k " << bad << " was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
      EXPECT_NE(std::string(e.what()).find("asks for " + std::to_string(bad) +
                                           " experts per token; this model "
                                           "routes 1 to 6"),
                std::string::npos)
          << e.what();
    }
  }
}

}  // namespace
}  // namespace epic
