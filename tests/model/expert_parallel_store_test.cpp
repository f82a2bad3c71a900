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

TEST(ExpertParallelStore, EachRowsRoutingWeightReachesTheUsefulnessScore) {
  const auto backend = make_cpu_backend();
  ModelPreset preset = testing::small_preset(DType::kF32);
  preset.config.num_experts_per_tok = 6;  // of 8: rows at 2 and at 6 experts per token differ
  const ModelConfig& config = preset.config;
  ASSERT_TRUE(config.norm_topk_prob);  // a token's weights sum to 1
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const std::unique_ptr<WeightSource> source =
      make_random_source(config, preset.storage, seed, "random tiny");
  const ModelWeights full = load_model_weights(config, *source, *backend, {});
  LoadOptions no_experts;
  no_experts.hosts_expert = [](int64_t, int64_t) { return false; };
  const ModelWeights routers = load_model_weights(config, *source, *backend, no_experts);

  ExpertRoutingTable table;  // one worker hosts every expert
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) {
    if (!config.is_moe_layer(layer)) continue;
    table.expert_workers[layer].assign(static_cast<size_t>(config.num_experts), std::vector<int>{0});
  }
  ExpertStoreOptions options;
  options.tier = ExpertTier::kHost;
  options.policy = EvictionPolicy::kUsefulness;
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer)
    if (config.is_moe_layer(layer)) options.budget.slots_by_layer[layer] = 3;
  ExpertStore store(config, *source, *backend, options);
  SelfCommunicator comm;
  ExpertParallelMoeExecutor exchange(config, routers, *backend, comm, table);
  exchange.set_expert_store(&store, OnMiss::kRead);

  RunnerOptions runner_options;
  runner_options.max_sequences = 2;
  runner_options.max_context = 16;
  ModelRunner runner(config, routers, *backend, runner_options, &exchange);
  ModelRunner reference(config, full, *backend, runner_options);
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(config.vocab_size - 1));
  std::vector<int32_t> first(5), second(3);
  for (int32_t& v : first) v = id(rng);
  for (int32_t& v : second) v = id(rng);
  const auto step = [&](ModelRunner& r) {
    KvSequence a = r.new_sequence(), b = r.new_sequence();
    const std::vector<SequenceChunk> chunks = {{&a, first, true, 2}, {&b, second, true, 0}};
    return r.forward_batch(chunks, true).logits.values;
  };
  EXPECT_TRUE(step(runner) == step(reference)) << "logits differ from every expert resident";

  // One step: no decay yet, so a layer's scores add up to its rows' weights, 1 per token.
  const int64_t tokens = static_cast<int64_t>(first.size() + second.size());
  int64_t moe_layers = 0;
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) {
    if (!config.is_moe_layer(layer)) continue;
    ++moe_layers;
    double total = 0;
    for (int64_t e = 0; e < config.num_experts; ++e) total += store.usefulness(layer, e);
    EXPECT_NEAR(total, static_cast<double>(tokens), 1e-4) << "layer " << layer;
  }
  // Each row's own picks, once: 2 for the first sequence's tokens, 6 for the second's.
  const int64_t own_picks = 2 * static_cast<int64_t>(first.size()) + 6 * static_cast<int64_t>(second.size());
  EXPECT_EQ(exchange.store_hits() + exchange.store_misses(), own_picks * moe_layers);
}

// One rank, the same warm stores: in a step, a layer's residency when it routes is the step's start (no
// prefetch, the layer's own loads come after its routing), so the exchange's substitution from the gathered
// residency equals the one-process executor's from its store: bitwise the same logits and substitutions.
TEST(ExpertParallelStore, SubstituteEqualsTheOneProcessExecutorFromTheSameResidency) {
  const auto backend = make_cpu_backend();
  ModelPreset preset = testing::small_preset(DType::kF32);
  preset.config.num_experts_per_tok = 4;
  const ModelConfig& config = preset.config;
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const std::unique_ptr<WeightSource> source =
      make_random_source(config, preset.storage, seed, "random tiny");
  LoadOptions no_experts;
  no_experts.hosts_expert = [](int64_t, int64_t) { return false; };
  const ModelWeights routers = load_model_weights(config, *source, *backend, no_experts);
  ExpertRoutingTable table;
  ExpertStoreOptions options;
  options.tier = ExpertTier::kHost;
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) {
    if (!config.is_moe_layer(layer)) continue;
    table.expert_workers[layer].assign(static_cast<size_t>(config.num_experts), std::vector<int>{0});
    options.budget.slots_by_layer[layer] = 3;
  }
  ExpertStore one_store(config, *source, *backend, options),
      exchange_store(config, *source, *backend, options);
  for (ExpertStore* store : {&one_store, &exchange_store}) {  // the same three experts resident per layer
    for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer)
      if (config.is_moe_layer(layer)) store->ensure_resident(layer, {1, 4, 6}, 0);
    store->unpin_all();
  }
  OffloadingMoeExecutor one(config, routers, *backend, one_store, OnMiss::kSubstitute);
  SelfCommunicator comm;
  ExpertParallelMoeExecutor exchange(config, routers, *backend, comm, table);
  exchange.set_expert_store(&exchange_store, OnMiss::kSubstitute);
  RunnerOptions runner_options;
  runner_options.max_sequences = 2;
  runner_options.max_context = 16;
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(config.vocab_size - 1));
  std::vector<int32_t> first(6), second(4);
  for (int32_t& v : first) v = id(rng);
  for (int32_t& v : second) v = id(rng);
  const auto prefill = [&](MoeExecutor& executor) {
    ModelRunner runner(config, routers, *backend, runner_options, &executor);
    KvSequence a = runner.new_sequence(), b = runner.new_sequence();
    const std::vector<SequenceChunk> chunks = {{&a, first, true, 0}, {&b, second, true, 2}};
    return runner.forward_batch(chunks, true).logits.values;
  };
  const std::vector<float> expected = prefill(one), actual = prefill(exchange);
  EXPECT_TRUE(actual == expected) << "the exchange's substitution differs from the one-process executor's";
  EXPECT_GT(one.stats().substituted, 0);
  EXPECT_EQ(exchange.store_substituted(), one.stats().substituted);
}

}  // namespace
}  // namespace epic
