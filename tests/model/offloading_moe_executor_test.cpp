// The MoE blocks over an ExpertStore (worker/offloading_moe_executor.h): with --on-miss wait the model's
// logits do not depend on the budget, the eviction policy or the tier (bitwise on the CPU, against the
// local executor with every expert loaded); with substitute a missing pick goes to the most probable
// resident expert the token did not choose, with the router's weights of the final choice (checked
// against a reference computed here from the router logits).
#include "worker/offloading_moe_executor.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <set>

#include "../checkpoint/small_model.h"
#include "kernels/backend.h"
#include "kernels/error.h"
#include "worker/model_runner.h"
#include "worker/moe_block.h"
#include "worker/weight_source.h"

namespace epic {
namespace {

struct Model {
  ModelPreset preset;
  uint64_t seed = 0;
  std::unique_ptr<WeightSource> source;
  ModelWeights full;  // every expert loaded: the reference
};

Model random_model(Backend& backend) {
  Model model;
  model.preset = testing::small_preset(DType::kF32);
  model.seed = std::random_device{}();
  model.source = make_random_source(model.preset.config, model.preset.storage, model.seed, "random tiny");
  model.full = load_model_weights(model.preset.config, *model.source, backend, {});
  return model;
}

ExpertStoreOptions store_options(const ModelConfig& config, int64_t slots, EvictionPolicy policy,
                                 ExpertTier tier) {
  ExpertStoreOptions options;
  options.tier = tier;
  options.policy = policy;
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer)
    if (config.is_moe_layer(layer)) options.budget.slots_by_layer[layer] = slots;
  return options;
}

// Logits of every prompt position and of 4 greedy decode steps.
std::vector<float> run_model(ModelRunner& runner, const std::vector<int32_t>& prompt) {
  KvSequence sequence = runner.new_sequence();
  std::vector<float> all = runner.forward(prompt, sequence, true);
  std::vector<int32_t> next{
      static_cast<int32_t>(std::max_element(all.end() - runner.config().vocab_size, all.end()) -
                           (all.end() - runner.config().vocab_size))};
  for (int step = 0; step < 4; ++step) {
    const std::vector<float> logits = runner.forward(next, sequence, false);
    all.insert(all.end(), logits.begin(), logits.end());
    next[0] = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }
  return all;
}

TEST(OffloadingMoeExecutor, WaitGivesTheFullModelsLogitsForAnyBudgetPolicyAndTier) {
  const auto backend = make_cpu_backend();
  Model model = random_model(*backend);
  SCOPED_TRACE("seed " + std::to_string(model.seed));
  const ModelConfig& config = model.preset.config;
  std::mt19937 rng(model.seed);
  std::vector<int32_t> prompt(24);
  for (int32_t& id : prompt) id = std::uniform_int_distribution<int32_t>(0, config.vocab_size - 1)(rng);
  RunnerOptions options;
  options.max_sequences = 1;
  options.max_context = 64;
  ModelRunner reference_runner(config, model.full, *backend, options);
  const std::vector<float> expected = run_model(reference_runner, prompt);

  LoadOptions no_experts;
  no_experts.hosts_expert = [](int64_t, int64_t) { return false; };
  const ModelWeights routers = load_model_weights(config, *model.source, *backend, no_experts);
  EXPECT_EQ(routers.experts_hosted(), 0);
  for (int64_t slots : {int64_t{1}, int64_t{3}, config.num_experts}) {
    for (EvictionPolicy policy : {EvictionPolicy::kLru, EvictionPolicy::kLfu, EvictionPolicy::kUsefulness}) {
      for (ExpertTier tier : {ExpertTier::kHost, ExpertTier::kDisk}) {
        SCOPED_TRACE(std::to_string(slots) + " slots, " + std::string(eviction_policy_name(policy)) + ", " +
                     std::string(expert_tier_name(tier)));
        for (Prefetch prefetch : {Prefetch::kNone, Prefetch::kNextLayer}) {
          SCOPED_TRACE(prefetch == Prefetch::kNone ? "no prefetch" : "next-layer prefetch");
          ExpertStore ahead(config, *model.source, *backend, store_options(config, slots, policy, tier));
          OffloadingMoeExecutor prefetching(config, routers, *backend, ahead, OnMiss::kWait, prefetch);
          ModelRunner runner(config, routers, *backend, options, &prefetching);
          const std::vector<float> actual = run_model(runner, prompt);
          ASSERT_EQ(actual.size(), expected.size());
          EXPECT_TRUE(actual == expected) << "logits differ from the full model's";
          if (prefetch == Prefetch::kNextLayer) {
            EXPECT_GT(prefetching.stats().prefetched, 0);
            EXPECT_GT(ahead.stats().prefetch_loads, 0);
          }
          EXPECT_EQ(prefetching.stats().demand_hits + prefetching.stats().demand_misses > 0, true);
        }
        ExpertStore store(config, *model.source, *backend, store_options(config, slots, policy, tier));
        OffloadingMoeExecutor executor(config, routers, *backend, store, OnMiss::kWait);
        ModelRunner runner(config, routers, *backend, options, &executor);
        const std::vector<float> actual = run_model(runner, prompt);
        ASSERT_EQ(actual.size(), expected.size());
        EXPECT_TRUE(actual == expected) << "logits differ from the full model's";
        const ExpertStoreStats stats = store.stats();
        EXPECT_GT(stats.misses, 0);
        int64_t moe_layers = 0;
        for (const LayerWeights& layer : routers.layers) moe_layers += layer.is_moe ? 1 : 0;
        EXPECT_EQ(stats.resident_bytes, static_cast<uint64_t>(slots * moe_layers) * store.expert_bytes());
        // One slot and top-2 routing: every step runs its expert FFN in several groups.
        if (slots < config.num_experts_per_tok)
          EXPECT_GT(executor.stats().expert_groups, executor.stats().calls);
        if (slots == config.num_experts) EXPECT_EQ(stats.evictions, 0);
        if (slots == 1) EXPECT_GT(stats.evictions, 0);
      }
    }
  }
}

TEST(OffloadingMoeExecutor, SubstituteRoutesAMissToTheMostProbableResidentExpert) {
  const auto backend = make_cpu_backend();
  Model model = random_model(*backend);
  SCOPED_TRACE("seed " + std::to_string(model.seed));
  const ModelConfig& config = model.preset.config;
  const int64_t layer = 0, tokens = 16, hidden_size = config.hidden_size, top_k = config.num_experts_per_tok;
  ASSERT_TRUE(config.is_moe_layer(layer));
  const MoeLayerWeights& full = model.full.layers[layer].moe;
  const int64_t experts = full.num_experts;
  std::mt19937 rng(model.seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(tokens * hidden_size);
  for (float& v : x) v = normal(rng);
  OwnedTensor hidden = backend->new_tensor(ScalarType::kF32, {tokens, hidden_size});
  backend->copy_from_host(hidden, 0, x.data(), x.size() * sizeof(float));

  // A store holding 4 of the 8 experts, chosen at random.
  std::vector<int64_t> all(experts);
  for (int64_t e = 0; e < experts; ++e) all[e] = e;
  std::shuffle(all.begin(), all.end(), rng);
  const std::vector<int64_t> resident(all.begin(), all.begin() + 4);
  ExpertStore store(config, *model.source, *backend,
                    store_options(config, 4, EvictionPolicy::kLru, ExpertTier::kHost));
  store.ensure_resident(layer, resident, 0);
  store.unpin_all();
  OffloadingMoeExecutor executor(config, model.full, *backend, store, OnMiss::kSubstitute);
  Workspace workspace(*backend);
  OwnedTensor out = backend->new_tensor(ScalarType::kF32, {tokens, hidden_size});
  executor.forward(layer, hidden, hidden, out, workspace);
  std::vector<float> actual(tokens * hidden_size);
  backend->copy_to_host(out, 0, actual.data(), actual.size() * sizeof(float));

  // The reference: the router's probabilities, top-k, each miss replaced in slot order.
  OwnedTensor logits = backend->new_tensor(ScalarType::kF32, {tokens, experts});
  backend->linear(hidden, full.router, logits);
  std::vector<float> logit_rows(tokens * experts);
  backend->copy_to_host(logits, 0, logit_rows.data(), logit_rows.size() * sizeof(float));
  const std::set<int64_t> is_resident(resident.begin(), resident.end());
  std::vector<int32_t> final_ids(tokens * top_k);
  std::vector<double> final_weights(tokens * top_k);
  int64_t substituted = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<double> p(experts);
    double max = -INFINITY, total = 0;
    for (int64_t e = 0; e < experts; ++e) max = std::max(max, double(logit_rows[t * experts + e]));
    for (int64_t e = 0; e < experts; ++e) total += p[e] = std::exp(double(logit_rows[t * experts + e]) - max);
    for (double& v : p) v /= total;
    std::vector<int64_t> order(experts);
    for (int64_t e = 0; e < experts; ++e) order[e] = e;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return p[a] > p[b]; });
    std::set<int64_t> taken(order.begin(), order.begin() + top_k);
    double mass = 0;
    for (int64_t j = 0; j < top_k; ++j) {
      int64_t e = order[j];
      if (!is_resident.count(e)) {
        int64_t best = -1;
        for (int64_t r : resident)
          if (!taken.count(r) && (best < 0 || p[r] > p[best] || (p[r] == p[best] && r < best))) best = r;
        ASSERT_GE(best, 0);
        e = best;
        taken.insert(e);
        ++substituted;
      }
      final_ids[t * top_k + j] = static_cast<int32_t>(e);
      mass += p[e];
    }
    for (int64_t j = 0; j < top_k; ++j)
      final_weights[t * top_k + j] = p[final_ids[t * top_k + j]] / (config.norm_topk_prob ? mass : 1.0);
  }
  ASSERT_GT(substituted, 0) << "the random routing never missed: nothing tested";
  EXPECT_EQ(executor.stats().substituted, substituted);

  // Each (token, slot)'s expert output with the full weights, combined here.
  OwnedTensor rows = backend->new_tensor(ScalarType::kF32, {tokens * top_k, hidden_size});
  std::vector<float> repeated(tokens * top_k * hidden_size);
  for (int64_t s = 0; s < tokens * top_k; ++s)
    std::copy(x.begin() + (s / top_k) * hidden_size, x.begin() + (s / top_k + 1) * hidden_size,
              repeated.begin() + s * hidden_size);
  backend->copy_from_host(rows, 0, repeated.data(), repeated.size() * sizeof(float));
  OwnedTensor ids = backend->new_tensor(ScalarType::kI32, {tokens * top_k});
  backend->copy_from_host(ids, 0, final_ids.data(), final_ids.size() * sizeof(int32_t));
  OwnedTensor sorted = backend->new_tensor(ScalarType::kF32, {tokens * top_k, hidden_size});
  OwnedTensor computed = backend->new_tensor(ScalarType::kF32, {tokens * top_k, hidden_size});
  OwnedTensor y = backend->new_tensor(ScalarType::kF32, {tokens * top_k, hidden_size});
  Workspace scratch(*backend);
  run_experts_in_row_order(*backend, config, full, rows, ids, sorted, computed, y, scratch);
  std::vector<float> outputs(tokens * top_k * hidden_size);
  backend->copy_to_host(y, 0, outputs.data(), outputs.size() * sizeof(float));
  for (int64_t t = 0; t < tokens; ++t) {
    double scale = 0;
    std::vector<double> expected(hidden_size, 0.0);
    for (int64_t j = 0; j < top_k; ++j)
      for (int64_t i = 0; i < hidden_size; ++i)
        expected[i] += final_weights[t * top_k + j] * outputs[(t * top_k + j) * hidden_size + i];
    for (double v : expected) scale = std::max(scale, std::abs(v));
    for (int64_t i = 0; i < hidden_size; ++i)
      ASSERT_NEAR(actual[t * hidden_size + i], expected[i], 1e-5 * scale)
          << "token " << t << " element " << i;
  }
  // The layer was served from what was resident; the experts it missed were fetched after it.
  int64_t fetched = 0;
  for (int64_t e = 0; e < experts; ++e) fetched += !is_resident.count(e) && store.resident(layer, e) ? 1 : 0;
  EXPECT_GT(fetched, 0);
}

// --on-miss read: every expert is computed from the address the store's table gives it (its slot, or its
// host-tier bytes in place), so the logits are the full model's, bitwise, for any budget and policy;
// finish_step counts each pick against the residency and admits the misses behind the step, after which
// the table points at the slots of exactly the resident experts.
TEST(OffloadingMoeExecutor, ReadGivesTheFullModelsLogitsAndAdmitsMissesBehindTheStep) {
  const auto backend = make_cpu_backend();
  Model model = random_model(*backend);
  SCOPED_TRACE("seed " + std::to_string(model.seed));
  const ModelConfig& config = model.preset.config;
  std::mt19937 rng(model.seed);
  RunnerOptions options;
  options.max_sequences = 1;
  options.max_context = 128;
  ModelRunner reference_runner(config, model.full, *backend, options);
  LoadOptions no_experts;
  no_experts.hosts_expert = [](int64_t, int64_t) { return false; };
  const ModelWeights routers = load_model_weights(config, *model.source, *backend, no_experts);
  // 24 prompt rows fit the routing log; 80 do not (read back in forward instead).
  for (int64_t prompt_length : {int64_t{24}, OffloadingMoeExecutor::kLoggedRows + 16}) {
    std::vector<int32_t> prompt(static_cast<size_t>(prompt_length));
    for (int32_t& id : prompt) id = std::uniform_int_distribution<int32_t>(0, config.vocab_size - 1)(rng);
    const std::vector<float> expected = run_model(reference_runner, prompt);
    for (int64_t slots : {int64_t{1}, int64_t{3}, config.num_experts}) {
      for (EvictionPolicy policy :
           {EvictionPolicy::kLru, EvictionPolicy::kLfu, EvictionPolicy::kUsefulness}) {
        SCOPED_TRACE(std::to_string(prompt_length) + " prompt tokens, " + std::to_string(slots) + " slots, " +
                     std::string(eviction_policy_name(policy)));
        ExpertStore store(config, *model.source, *backend,
                          store_options(config, slots, policy, ExpertTier::kHost));
        OffloadingMoeExecutor executor(config, routers, *backend, store, OnMiss::kRead);
        ModelRunner runner(config, routers, *backend, options, &executor);
        const std::vector<float> actual = run_model(runner, prompt);
        ASSERT_EQ(actual.size(), expected.size());
        EXPECT_TRUE(actual == expected) << "logits differ from the full model's";

        const OffloadStats stats = executor.stats();
        int64_t moe_layers = 0;
        for (const LayerWeights& layer : routers.layers) moe_layers += layer.is_moe ? 1 : 0;
        // Every row of the prompt and of the 4 decode steps, top-k picks in every MoE layer.
        EXPECT_EQ(stats.picks, (prompt_length + 4) * config.num_experts_per_tok * moe_layers);
        // One call per MoE layer of each of the 5 steps, counted per step by finish_step (on cuda a
        // replayed step calls no forward, the one that captures calls it twice).
        EXPECT_EQ(stats.calls, 5 * moe_layers);
        EXPECT_EQ(stats.demand_hits + stats.demand_misses, stats.picks);
        EXPECT_GT(stats.read_in_place, 0);  // the first step finds nothing resident
        EXPECT_EQ(stats.bytes_read_in_place,
                  static_cast<uint64_t>(stats.read_in_place) * store.expert_bytes());
        EXPECT_GT(stats.prefetched, 0);
        EXPECT_EQ(store.stats().stall_seconds, 0.0);  // never waited
        if (slots == config.num_experts) EXPECT_EQ(store.stats().evictions, 0);

        // The table: a resident expert's addresses inside its layer's slot tensors, any other's outside.
        for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) {
          if (!store.is_moe_layer(layer)) continue;
          const MoeLayerWeights& slots_of = store.layer_weights(layer);
          std::vector<int64_t> table(static_cast<size_t>(2 * slots_of.num_experts));
          backend->copy_to_host(store.address_table(layer), 0, table.data(), table.size() * sizeof(int64_t));
          const auto in = [](int64_t address, const OwnedTensor& tensor) {
            const auto* base = static_cast<const uint8_t*>(tensor.view().data);
            const auto* at = reinterpret_cast<const uint8_t*>(address);
            return at >= base && at < base + tensor.view().bytes();
          };
          int64_t resident = 0;
          for (int64_t e = 0; e < slots_of.num_experts; ++e) {
            ASSERT_NE(table[2 * e], 0) << "layer " << layer << " expert " << e << " has no address";
            const bool is_resident = store.resident(layer, e);
            resident += is_resident ? 1 : 0;
            EXPECT_EQ(in(table[2 * e], slots_of.gate_up), is_resident)
                << "layer " << layer << " expert " << e;
            EXPECT_EQ(in(table[2 * e + 1], slots_of.down), is_resident)
                << "layer " << layer << " expert " << e;
          }
          EXPECT_LE(resident, std::min(slots, slots_of.num_experts));
          EXPECT_GE(resident, 1);  // misses were admitted
        }
      }
    }
  }
}

TEST(OffloadingMoeExecutor, ReadNeedsTheHostTier) {
  const auto backend = make_cpu_backend();
  Model model = random_model(*backend);
  const ModelConfig& config = model.preset.config;
  ExpertStore store(config, *model.source, *backend,
                    store_options(config, 2, EvictionPolicy::kLru, ExpertTier::kDisk));
  EXPECT_FALSE(store.reads_in_place());
  int64_t moe_layer = 0;
  while (!config.is_moe_layer(moe_layer)) ++moe_layer;
  EXPECT_THROW(store.address_table(moe_layer), Error);
  try {
    OffloadingMoeExecutor executor(config, model.full, *backend, store, OnMiss::kRead);
    FAIL() << "a disk-tier store was taken for --on-miss read";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("--expert-tier host"), std::string::npos) << error.what();
  }
}

TEST(OffloadingMoeExecutor, OnMissNames) {
  EXPECT_EQ(parse_on_miss("wait"), OnMiss::kWait);
  EXPECT_EQ(parse_on_miss("substitute"), OnMiss::kSubstitute);
  EXPECT_EQ(parse_on_miss("read"), OnMiss::kRead);
  EXPECT_STREQ(on_miss_name(OnMiss::kRead), "read");
  EXPECT_THROW(parse_on_miss("skip"), Error);
  EXPECT_EQ(parse_prefetch("next-layer"), Prefetch::kNextLayer);
  EXPECT_EQ(parse_prefetch("none"), Prefetch::kNone);
  EXPECT_THROW(parse_prefetch("always"), Error);
}

}  // namespace
}  // namespace epic
