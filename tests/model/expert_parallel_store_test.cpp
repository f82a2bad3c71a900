// The host exchange over an expert store (ExpertParallelMoeExecutor::set_expert_store) on one rank: the
// routing weight of every received row reaches the store's usefulness score (so --eviction usefulness ranks
// by routing weights under mpirun too), rows in a state of fewer experts per token are counted with their
// own picks only (padding is not sent), and the output is the local executor's bitwise; with --on-miss
// substitute the sender substitutes as the one-process executor does from the same residency.
#include <gtest/gtest.h>

#include <random>

#include "../checkpoint/small_model.h"
#include "comm/self_communicator.h"
#include "kernels/backend.h"
#include "worker/expert_parallel_moe.h"
#include "worker/expert_store.h"
#include "worker/model_runner.h"
#include "worker/offloading_moe_executor.h"
#include "worker/weight_source.h"

namespace epic {
namespace {

// The small preset routing `top_k` of its 8 experts, random weights of a fresh seed, on one rank that hosts
// every expert: the routers alone (the experts live in stores), stores of 3 slots per MoE layer, two
// prompts of random ids.
class ExpertParallelStore : public ::testing::Test {
 protected:
  void build(int64_t top_k) {
    ModelPreset preset = testing::small_preset(DType::kF32);
    preset.config.num_experts_per_tok = top_k;
    config_ = preset.config;
    seed_ = std::random_device{}();
    source_ = make_random_source(config_, preset.storage, seed_, "random tiny");
    LoadOptions no_experts;
    no_experts.hosts_expert = [](int64_t, int64_t) { return false; };
    routers_ = load_model_weights(config_, *source_, *backend_, no_experts);
    for (int64_t layer = 0; layer < config_.num_hidden_layers; ++layer) {
      if (!config_.is_moe_layer(layer)) continue;
      table_.expert_workers[layer].assign(static_cast<size_t>(config_.num_experts), std::vector<int>{0});
      store_options_.budget.slots_by_layer[layer] = 3;
    }
    store_options_.tier = ExpertTier::kHost;
    std::mt19937 rng(static_cast<uint32_t>(seed_));
    std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(config_.vocab_size - 1));
    first_.resize(6);
    second_.resize(4);
    for (int32_t& v : first_) v = id(rng);
    for (int32_t& v : second_) v = id(rng);
  }

  // Every prompt position's logits of one step over both prompts, at first_k and second_k experts per token.
  std::vector<float> prefill(MoeExecutor* executor, const ModelWeights& weights, int64_t first_k,
                             int64_t second_k) {
    RunnerOptions options;
    options.max_sequences = 2;
    options.max_context = 16;
    ModelRunner runner(config_, weights, *backend_, options, executor);
    KvSequence a = runner.new_sequence(), b = runner.new_sequence();
    const std::vector<SequenceChunk> chunks = {{&a, first_, true, first_k}, {&b, second_, true, second_k}};
    return runner.forward_batch(chunks, true).logits.values;
  }

  std::unique_ptr<Backend> backend_ = make_cpu_backend();
  ModelConfig config_;
  uint64_t seed_ = 0;
  std::unique_ptr<WeightSource> source_;
  ModelWeights routers_;
  ExpertRoutingTable table_;
  ExpertStoreOptions store_options_;
  SelfCommunicator comm_;
  std::vector<int32_t> first_, second_;
};

TEST_F(ExpertParallelStore, EachRowsRoutingWeightReachesTheUsefulnessScore) {
  build(6);  // of 8: rows at 2 and at 6 experts per token differ
  SCOPED_TRACE("seed " + std::to_string(seed_));
  ASSERT_TRUE(config_.norm_topk_prob);  // a token's weights sum to 1
  store_options_.policy = EvictionPolicy::kUsefulness;
  ExpertStore store(config_, *source_, *backend_, store_options_);
  ExpertParallelMoeExecutor exchange(config_, routers_, *backend_, comm_, table_);
  exchange.set_expert_store(&store, OnMiss::kRead);
  const ModelWeights full = load_model_weights(config_, *source_, *backend_, {});
  EXPECT_TRUE(prefill(&exchange, routers_, 2, 0) == prefill(nullptr, full, 2, 0))
      << "logits differ from every expert resident";

  // One step: no decay yet, so a layer's scores add up to its rows' weights, 1 per token.
  const int64_t tokens = static_cast<int64_t>(first_.size() + second_.size());
  int64_t moe_layers = 0;
  for (int64_t layer = 0; layer < config_.num_hidden_layers; ++layer) {
    if (!config_.is_moe_layer(layer)) continue;
    ++moe_layers;
    double total = 0;
    for (int64_t e = 0; e < config_.num_experts; ++e) total += store.usefulness(layer, e);
    EXPECT_NEAR(total, static_cast<double>(tokens), 1e-4) << "layer " << layer;
  }
  // Each row's own picks, once: 2 for the first prompt's tokens, 6 for the second's.
  const int64_t own_picks =
      2 * static_cast<int64_t>(first_.size()) + 6 * static_cast<int64_t>(second_.size());
  EXPECT_EQ(exchange.store_demand().hits + exchange.store_demand().misses, own_picks * moe_layers);
}

// The same warm stores: in a step, a layer's residency when it routes is the step's start (no prefetch, the
// layer's own loads come after its routing), so the exchange's substitution from the gathered residency
// equals the one-process executor's from its store: bitwise the same logits and substitutions.
TEST_F(ExpertParallelStore, SubstituteEqualsTheOneProcessExecutorFromTheSameResidency) {
  build(4);
  SCOPED_TRACE("seed " + std::to_string(seed_));
  ExpertStore one_store(config_, *source_, *backend_, store_options_),
      exchange_store(config_, *source_, *backend_, store_options_);
  for (ExpertStore* store : {&one_store, &exchange_store}) {  // the same three experts resident per layer
    for (int64_t layer = 0; layer < config_.num_hidden_layers; ++layer)
      if (config_.is_moe_layer(layer)) store->ensure_resident(layer, {1, 4, 6}, 0);
    store->unpin_all();
  }
  OffloadingMoeExecutor one(config_, routers_, *backend_, one_store, OnMiss::kSubstitute);
  ExpertParallelMoeExecutor exchange(config_, routers_, *backend_, comm_, table_);
  exchange.set_expert_store(&exchange_store, OnMiss::kSubstitute);
  const std::vector<float> expected = prefill(&one, routers_, 0, 2),
                           actual = prefill(&exchange, routers_, 0, 2);
  EXPECT_TRUE(actual == expected) << "the exchange's substitution differs from the one-process executor's";
  EXPECT_GT(one.stats().substituted, 0);
  EXPECT_EQ(exchange.store_demand().substituted, one.stats().substituted);
}

}  // namespace
}  // namespace epic
