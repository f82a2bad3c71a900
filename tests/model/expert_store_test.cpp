// The expert store on the CPU backend, over a random tiny checkpoint written by make-model (4 layers,
// layer 1 dense, 8 experts; this worker hosts 6 of each MoE layer's 8, picked by the seed; 3 slots a
// layer): after ensure_resident, the expert FFN over the store's slots equals the FFN over the fully
// loaded weights bit for bit, for random need sequences on both tiers and several storage types; the
// counters, bytes moved and bytes read add up exactly; LRU order and pins hold; errors name their cause.
// Seeds are fresh every run and printed (replay with EPIC_TEST_SEED).
#include "worker/expert_store.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <ostream>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "kernels/error.h"
#include "tests/checkpoint/host_memory_backend.h"
#include "tests/checkpoint/small_model.h"
#include "tests/checkpoint/test_files.h"
#include "tests/support/expect_error.h"
#include "worker/moe_block.h"
#include "worker/resident_expert_ffn.h"
#include "worker/workspace.h"

namespace epic {
namespace {

using testing::expect_error;

constexpr int64_t kSlots = 3;
constexpr int64_t kHostedPerLayer = 6;

// A random checkpoint on disk, its fully loaded weights (the reference) and which experts this worker
// hosts. The store gets its own source so that its bytes_read counts only what the store reads.
struct Checkpointed {
  testing::TempDir temp;
  ModelPreset preset;
  uint64_t seed = 0;
  ModelConfig config;
  std::map<int64_t, std::set<int64_t>> hosted;  // MoE layer -> hosted experts
  std::unique_ptr<Backend> backend = make_cpu_backend(2);
  ModelWeights reference;
  std::unique_ptr<WeightSource> store_source;

  Checkpointed(DType storage, std::optional<ScalarType> weight_type)
      : preset(testing::small_preset(storage)) {
    seed = testing::make_small_model(preset, temp / "m");
    config = ModelConfig::load(temp / "m");
    std::mt19937_64 random(seed);
    for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) {
      if (!config.is_moe_layer(layer)) continue;
      std::vector<int64_t> experts(static_cast<size_t>(config.num_experts));
      for (int64_t e = 0; e < config.num_experts; ++e) experts[e] = e;
      std::shuffle(experts.begin(), experts.end(), random);
      hosted[layer] = std::set<int64_t>(experts.begin(), experts.begin() + kHostedPerLayer);
    }
    LoadOptions options;
    options.hosts_expert = hosts();
    options.weight_type = weight_type;
    const std::unique_ptr<WeightSource> source = open_checkpoint_source(temp / "m");
    reference = load_model_weights(config, *source, *backend, options);
    store_source = open_checkpoint_source(temp / "m");
  }

  std::function<bool(int64_t, int64_t)> hosts() const {
    return [this](int64_t layer, int64_t expert) { return hosted.at(layer).count(expert) != 0; };
  }
  std::vector<int64_t> hosted_list(int64_t layer) const {
    return {hosted.at(layer).begin(), hosted.at(layer).end()};
  }

  // host_slots > 0: the disk tier with a host cache of that many experts per layer.
  ExpertStoreOptions store_options(ExpertTier tier, std::optional<ScalarType> weight_type,
                                   int64_t host_slots = 0) const {
    ExpertStoreOptions options;
    options.tier = tier;
    for (const auto& [layer, experts] : hosted) options.budget.slots_by_layer[layer] = kSlots;
    if (host_slots > 0)
      for (const auto& [layer, experts] : hosted) options.host_budget.slots_by_layer[layer] = host_slots;
    options.hosts_expert = hosts();
    options.weight_type = weight_type;
    options.staging_experts = 2;  // three misses take two batches
    return options;
  }

  // The stored bytes the disk tier reads for one expert (its three tensors as the checkpoint has them).
  uint64_t stored_expert_bytes(int64_t layer, int64_t expert) const {
    uint64_t bytes = 0;
    for (const std::string& name : expert_tensor_names(config, layer, expert))
      bytes += store_source->info(name).num_bytes();
    return bytes;
  }
};

std::vector<uint8_t> download(Backend& backend, const Tensor& tensor) {
  std::vector<uint8_t> bytes(tensor.bytes());
  backend.copy_to_host(tensor, 0, bytes.data(), bytes.size());
  return bytes;
}

std::vector<int32_t> download_index(Backend& backend, const Tensor& local_index) {
  std::vector<int32_t> index(static_cast<size_t>(local_index.numel()));
  backend.copy_to_host(local_index, 0, index.data(), index.size() * sizeof(int32_t));
  return index;
}

// The bytes of one expert's slot in stacked gate_up and down tensors: gate_up rows, then down rows.
std::vector<uint8_t> slot_bytes(const std::vector<uint8_t>& gate_up, const std::vector<uint8_t>& down,
                                int64_t num_slots, int64_t slot) {
  const size_t gate_up_size = gate_up.size() / num_slots, down_size = down.size() / num_slots;
  std::vector<uint8_t> bytes(gate_up.begin() + slot * gate_up_size,
                             gate_up.begin() + (slot + 1) * gate_up_size);
  bytes.insert(bytes.end(), down.begin() + slot * down_size, down.begin() + (slot + 1) * down_size);
  return bytes;
}

// Checks that every expert of `experts` holds, in the store's slot local_index gives it, the bytes the
// fully loaded weights hold for it, and that no two experts share a slot.
void expect_slots_hold_reference(Backend& store_backend, const ExpertStore& store, Backend& reference_backend,
                                 const MoeLayerWeights& reference, int64_t layer,
                                 const std::vector<int64_t>& experts) {
  const MoeLayerWeights& view = store.layer_weights(layer);
  const std::vector<int32_t> local = download_index(store_backend, view.local_index);
  const std::vector<uint8_t> gate_up = download(store_backend, view.gate_up),
                             down = download(store_backend, view.down);
  const std::vector<uint8_t> reference_gate_up = download(reference_backend, reference.gate_up);
  const std::vector<uint8_t> reference_down = download(reference_backend, reference.down);
  const int64_t num_slots = view.gate_up.view().dim(0), num_hosted = reference.gate_up.view().dim(0);
  std::set<int32_t> slots_seen;
  for (int64_t expert : experts) {
    SCOPED_TRACE("layer " + std::to_string(layer) + " expert " + std::to_string(expert));
    const int32_t slot = local[expert];
    ASSERT_GE(slot, 0) << "a needed expert is not resident";
    ASSERT_LT(slot, num_slots);
    EXPECT_TRUE(slots_seen.insert(slot).second) << "slot " << slot << " given twice";
    const int64_t position =
        std::find(reference.hosted.begin(), reference.hosted.end(), expert) - reference.hosted.begin();
    ASSERT_LT(position, num_hosted);
    EXPECT_TRUE(slot_bytes(gate_up, down, num_slots, slot) ==
                slot_bytes(reference_gate_up, reference_down, num_hosted, position))
        << "slot " << slot << " does not hold the expert's weights";
  }
  // Exactly the resident experts are published.
  for (int64_t expert = 0; expert < view.num_experts; ++expert)
    EXPECT_EQ(local[expert] >= 0, store.resident(layer, expert)) << "expert " << expert;
}

// y[i] = FFN of experts[i] over x[i], through run_experts over `weights` (F32 rows).
std::vector<float> run_ffn(Backend& backend, const ModelConfig& config, const MoeLayerWeights& weights,
                           const std::vector<float>& x, const std::vector<int32_t>& experts) {
  const int64_t rows = static_cast<int64_t>(experts.size()), hidden = config.hidden_size;
  Workspace workspace(backend);
  const OwnedTensor x_tensor = backend.new_tensor(ScalarType::kF32, {rows, hidden});
  const OwnedTensor expert_tensor = backend.new_tensor(ScalarType::kI32, {rows});
  const OwnedTensor sorted = backend.new_tensor(ScalarType::kF32, {rows, hidden});
  const OwnedTensor computed = backend.new_tensor(ScalarType::kF32, {rows, hidden});
  const OwnedTensor y = backend.new_tensor(ScalarType::kF32, {rows, hidden});
  backend.copy_from_host(x_tensor, 0, x.data(), x.size() * sizeof(float));
  backend.copy_from_host(expert_tensor, 0, experts.data(), experts.size() * sizeof(int32_t));
  // NaN first: a row the FFN leaves unwritten cannot pass for a computed one.
  const std::vector<float> nan(x.size(), std::numeric_limits<float>::quiet_NaN());
  backend.copy_from_host(y, 0, nan.data(), nan.size() * sizeof(float));
  run_experts_in_row_order(backend, config, weights, x_tensor, expert_tensor, sorted, computed, y, workspace);
  std::vector<float> out(x.size());
  backend.copy_to_host(y, 0, out.data(), out.size() * sizeof(float));
  return out;
}

struct StoreCase {
  const char* name;
  ExpertTier tier;
  DType storage;
  std::optional<ScalarType> weight_type;
  int64_t host_slots = 0;  // disk tier: a host cache of this many experts per layer
};

void PrintTo(const StoreCase& store_case, std::ostream* out) { *out << store_case.name; }

class ExpertStoreTest : public ::testing::TestWithParam<StoreCase> {};

TEST_P(ExpertStoreTest, ComputesLikeTheFullyLoadedWeightsAndCountsExactly) {
  const StoreCase& param = GetParam();
  Checkpointed model(param.storage, param.weight_type);
  SCOPED_TRACE("seed " + std::to_string(model.seed));
  Backend& backend = *model.backend;
  WeightSource& source = *model.store_source;
  ExpertStore store(model.config, source, backend,
                    model.store_options(param.tier, param.weight_type, param.host_slots));
  EXPECT_EQ(store.weight_type(), model.reference.weight_type);
  const uint64_t expert_bytes = store.expert_bytes();
  EXPECT_EQ(expert_bytes,
            static_cast<uint64_t>(3 * model.config.moe_intermediate_size * model.config.hidden_size) *
                scalar_size(model.reference.weight_type));
  // The host tier reads every hosted expert once, up front; the disk tier nothing yet.
  uint64_t all_hosted_stored_bytes = 0;
  for (const auto& [layer, experts] : model.hosted)
    for (int64_t expert : experts) all_hosted_stored_bytes += model.stored_expert_bytes(layer, expert);
  EXPECT_EQ(source.bytes_read(), param.tier == ExpertTier::kHost ? all_hosted_stored_bytes : 0u);
  const ExpertStoreStats initial = store.stats();
  EXPECT_EQ(initial.resident_bytes, static_cast<uint64_t>(kSlots * 3) * expert_bytes);
  const int64_t host_tier_experts = param.tier == ExpertTier::kHost ? kHostedPerLayer : param.host_slots;
  EXPECT_EQ(initial.host_tier_bytes, static_cast<uint64_t>(host_tier_experts * 3) * expert_bytes);
  EXPECT_EQ(initial.misses, 0);

  std::mt19937_64 random(model.seed ^ 0x5709E);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> routing_weight(0.0f, 1.0f);
  int64_t requested = 0, hits = 0, misses = 0, evictions = 0, cache_hits = 0;
  bool reference_nonzero = false;
  for (int64_t step = 0; step < 30; ++step) {
    for (const auto& [layer, hosted_set] : model.hosted) {
      SCOPED_TRACE("step " + std::to_string(step) + " layer " + std::to_string(layer));
      std::vector<int64_t> hosted(hosted_set.begin(), hosted_set.end());
      std::shuffle(hosted.begin(), hosted.end(), random);
      const int64_t num_needed = 1 + static_cast<int64_t>(random() % kSlots);
      const std::vector<int64_t> distinct(hosted.begin(), hosted.begin() + num_needed);
      std::vector<int64_t> needed = distinct;
      if (random() % 2) needed.push_back(distinct.front());  // a duplicate counts once
      for (int64_t expert : distinct) store.record_use(layer, expert, routing_weight(random), step);
      const std::vector<int64_t> resident_list = store.resident_experts(layer);
      const std::set<int64_t> resident_before(resident_list.begin(), resident_list.end());
      const uint64_t read_before = source.bytes_read();
      std::set<int64_t> cached_before;
      for (int64_t expert : distinct)
        if (store.host_cached(layer, expert)) cached_before.insert(expert);
      if (param.host_slots == 0) EXPECT_TRUE(cached_before.empty());

      const ExpertLoadReport report = store.ensure_resident(layer, needed, step);
      requested += num_needed;
      hits += report.hits;
      misses += report.misses;
      evictions += report.evictions;
      EXPECT_EQ(report.hits + report.misses, num_needed);
      int64_t expected_hits = 0;
      for (int64_t expert : distinct) expected_hits += resident_before.count(expert);
      EXPECT_EQ(report.hits, expected_hits);
      ASSERT_EQ(static_cast<int64_t>(report.loaded.size()), report.misses);
      // A miss the host cache held is copied from it; the others come from disk (through the cache).
      int64_t loaded_cached = 0;
      for (int64_t expert : report.loaded) loaded_cached += cached_before.count(expert);
      EXPECT_EQ(report.host_cache_hits, loaded_cached);
      EXPECT_EQ(report.host_cache_misses, param.host_slots > 0 ? report.misses - loaded_cached : 0);
      cache_hits += report.host_cache_hits;
      const uint64_t moved = static_cast<uint64_t>(report.misses) * expert_bytes;
      const uint64_t from_cache = static_cast<uint64_t>(loaded_cached) * expert_bytes;
      EXPECT_EQ(report.bytes_from_host, param.tier == ExpertTier::kHost ? moved : from_cache);
      EXPECT_EQ(report.bytes_from_disk, param.tier == ExpertTier::kDisk ? moved - from_cache : 0u);
      // The disk tier reads exactly the stored bytes of the experts it loads and the cache did not hold,
      // the host tier nothing.
      uint64_t expected_read = 0;
      if (param.tier == ExpertTier::kDisk)
        for (int64_t expert : report.loaded)
          if (!cached_before.count(expert)) expected_read += model.stored_expert_bytes(layer, expert);
      if (param.host_slots > 0) {
        for (int64_t expert : report.loaded) EXPECT_TRUE(store.host_cached(layer, expert)) << expert;
        int64_t cached_now = 0;
        for (int64_t expert : hosted) cached_now += store.host_cached(layer, expert);
        EXPECT_LE(cached_now, param.host_slots);
      }
      EXPECT_EQ(source.bytes_read() - read_before, expected_read);
      EXPECT_EQ(report.source_bytes_read, expected_read);
      for (int64_t victim : report.evicted) {
        EXPECT_EQ(std::count(distinct.begin(), distinct.end(), victim), 0)
            << "evicted needed expert " << victim;
        EXPECT_FALSE(store.resident(layer, victim)) << "evicted expert " << victim << " still published";
      }
      EXPECT_LE(static_cast<int64_t>(store.resident_experts(layer).size()), kSlots);
      expect_slots_hold_reference(backend, store, backend, model.reference.layers[layer].moe, layer,
                                  distinct);

      // Rows of the needed experts, in random order: the store's slots compute what the full weights do.
      const int64_t rows = 1 + static_cast<int64_t>(random() % 9);
      std::vector<float> x(static_cast<size_t>(rows * model.config.hidden_size));
      for (float& value : x) value = normal(random);
      std::vector<int32_t> row_experts(static_cast<size_t>(rows));
      for (int32_t& expert : row_experts) expert = static_cast<int32_t>(distinct[random() % distinct.size()]);
      const std::vector<float> expected =
          run_ffn(backend, model.config, model.reference.layers[layer].moe, x, row_experts);
      const std::vector<float> got =
          run_ffn(backend, model.config, store.layer_weights(layer), x, row_experts);
      ASSERT_EQ(got.size(), expected.size());
      EXPECT_EQ(std::memcmp(got.data(), expected.data(), got.size() * sizeof(float)), 0)
          << "the FFN over the store's slots differs from the fully loaded weights";
      reference_nonzero |= std::any_of(expected.begin(), expected.end(), [](float v) { return v != 0.0f; });
    }
    if (step % 4 == 3) store.unpin_all();
  }
  EXPECT_TRUE(reference_nonzero) << "the reference FFN gave only zeros: the test would prove nothing";
  EXPECT_GT(misses, 9) << "too few misses for the sequence to test eviction";
  EXPECT_GT(evictions, 0);

  const ExpertStoreStats stats = store.stats();
  EXPECT_EQ(stats.hits, hits);
  EXPECT_EQ(stats.misses, misses);
  EXPECT_EQ(stats.hits + stats.misses, requested);
  EXPECT_EQ(stats.evictions, evictions);
  EXPECT_EQ(stats.prefetch_loads, 0);
  const uint64_t moved = static_cast<uint64_t>(misses) * expert_bytes;
  const uint64_t from_cache = static_cast<uint64_t>(cache_hits) * expert_bytes;
  EXPECT_EQ(stats.bytes_from_host, param.tier == ExpertTier::kHost ? moved : from_cache);
  EXPECT_EQ(stats.bytes_from_disk, param.tier == ExpertTier::kDisk ? moved - from_cache : 0u);
  EXPECT_EQ(stats.host_cache_hits, cache_hits);
  if (param.host_slots > 0) {
    EXPECT_GT(cache_hits, 0) << "the host cache never served a miss: the sequence tests nothing of it";
    EXPECT_GT(stats.host_cache_evictions, 0);
    EXPECT_EQ(stats.host_cache_hits + stats.host_cache_misses, misses);
  }
  EXPECT_GT(stats.stall_seconds, 0.0);
  EXPECT_EQ(stats.resident_bytes, static_cast<uint64_t>(kSlots * 3) * expert_bytes);
  // Every miss filled a free slot or replaced an evicted expert.
  int64_t resident_now = 0;
  for (const auto& [layer, experts] : model.hosted) resident_now += store.resident_experts(layer).size();
  EXPECT_EQ(misses - evictions, resident_now);
}

INSTANTIATE_TEST_SUITE_P(
    Tiers, ExpertStoreTest,
    ::testing::Values(StoreCase{"host_bf16", ExpertTier::kHost, DType::kBF16, std::nullopt},
                      StoreCase{"disk_bf16", ExpertTier::kDisk, DType::kBF16, std::nullopt},
                      StoreCase{"host_f32", ExpertTier::kHost, DType::kF32, std::nullopt},
                      StoreCase{"disk_f32", ExpertTier::kDisk, DType::kF32, std::nullopt},
                      StoreCase{"disk_f16_as_f32", ExpertTier::kDisk, DType::kF16, std::nullopt},
                      StoreCase{"host_f32_as_bf16", ExpertTier::kHost, DType::kF32, ScalarType::kBF16},
                      StoreCase{"disk_f32_as_bf16", ExpertTier::kDisk, DType::kF32, ScalarType::kBF16},
                      StoreCase{"disk_cache_bf16", ExpertTier::kDisk, DType::kBF16, std::nullopt, 4},
                      StoreCase{"disk_cache_f32_as_bf16", ExpertTier::kDisk, DType::kF32, ScalarType::kBF16,
                                5}),
    [](const auto& info) { return std::string(info.param.name); });

// Hand-worked LRU on layer 0 with 3 slots; experts a..f are the first six hosted ids.
TEST(ExpertStore, EvictsTheLeastRecentlyUsedAndNeverAPinnedExpert) {
  Checkpointed model(DType::kBF16, std::nullopt);
  SCOPED_TRACE("seed " + std::to_string(model.seed));
  ExpertStore store(model.config, *model.store_source, *model.backend,
                    model.store_options(ExpertTier::kHost, std::nullopt));
  const std::vector<int64_t> h = model.hosted_list(0);
  const int64_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5];
  using Experts = std::vector<int64_t>;

  ExpertLoadReport report = store.ensure_resident(0, {a, b, c}, 0);  // admitted in order: a < b < c
  EXPECT_EQ(report.loaded, (Experts{a, b, c}));
  EXPECT_TRUE(report.evicted.empty());
  store.record_use(0, b, 0.5f, 1);  // recency c < b < a
  store.record_use(0, a, 0.5f, 1);
  report = store.ensure_resident(0, {d}, 1);
  EXPECT_EQ(report.evicted, (Experts{c}));  // the least recent
  Experts abd = {a, b, d};
  std::sort(abd.begin(), abd.end());
  EXPECT_EQ(store.resident_experts(0), abd);
  // Recency now b < a < d. b is needed (pinned), so a goes instead of it.
  report = store.ensure_resident(0, {b, e}, 2);
  EXPECT_EQ(report.hits, 1);
  EXPECT_EQ(report.loaded, (Experts{e}));
  EXPECT_EQ(report.evicted, (Experts{a}));
  EXPECT_TRUE(store.resident(0, b));
  // Three new experts into a full layer: all three residents go, least recent first (b, touched at
  // step 1, then d, then e), and none of the three needed evicts another.
  report = store.ensure_resident(0, {a, c, f}, 3);
  EXPECT_EQ(report.misses, 3);
  EXPECT_EQ(report.evicted, (Experts{b, d, e}));
  std::vector<int64_t> expected = {a, c, f};
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(store.resident_experts(0), expected);
  expect_slots_hold_reference(*model.backend, store, *model.backend, model.reference.layers[0].moe, 0,
                              expected);
  // Other layers are untouched.
  EXPECT_TRUE(store.resident_experts(2).empty());
  EXPECT_EQ(store.stats().evictions, 5);
}

TEST(ExpertStore, PrefetchNeverEvictsThePinnedExpertsNorItsOwnList) {
  Checkpointed model(DType::kBF16, std::nullopt);
  SCOPED_TRACE("seed " + std::to_string(model.seed));
  ExpertStore store(model.config, *model.store_source, *model.backend,
                    model.store_options(ExpertTier::kDisk, std::nullopt));
  const std::vector<int64_t> h = model.hosted_list(2);
  const int64_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
  using Experts = std::vector<int64_t>;
  store.ensure_resident(2, {a, b}, 0);  // pinned until the next ensure_resident of layer 2
  ExpertLoadReport report = store.prefetch(2, {c, d, e}, 0);
  EXPECT_EQ(report.loaded, (Experts{c}));  // the one free slot
  EXPECT_EQ(report.skipped, 2);
  EXPECT_TRUE(report.evicted.empty());
  EXPECT_TRUE(store.resident(2, a) && store.resident(2, b) && store.resident(2, c));
  store.unpin_all();
  // Nothing pinned now: d and e take the two least recent (a, b), and e does not evict d.
  report = store.prefetch(2, {d, e, c}, 0);
  EXPECT_EQ(report.loaded, (Experts{d, e}));
  EXPECT_EQ(report.evicted, (Experts{a, b}));
  EXPECT_EQ(report.hits, 1);
  EXPECT_EQ(report.bytes_from_disk, 2 * store.expert_bytes());
  const ExpertStoreStats stats = store.stats();
  EXPECT_EQ(stats.prefetch_loads, 3);
  EXPECT_EQ(stats.misses, 2 + 3);
  EXPECT_GE(stats.prefetch_seconds, 0.0);
  expect_slots_hold_reference(*model.backend, store, *model.backend, model.reference.layers[2].moe, 2,
                              {c, d, e});
}

// Hand-worked LRU on layer 0 with 3 slots and a host cache of 4; experts a..f are the first six hosted ids.
// A miss the cache holds reads nothing from the checkpoint; the cache evicts its own least recent expert
// (picks recorded through record_use count, as the executors record every pick).
TEST(ExpertStore, AHostCacheServesMissesItHoldsAndEvictsItsLeastRecent) {
  Checkpointed model(DType::kBF16, std::nullopt);
  SCOPED_TRACE("seed " + std::to_string(model.seed));
  ExpertStore store(model.config, *model.store_source, *model.backend,
                    model.store_options(ExpertTier::kDisk, std::nullopt, 4));
  EXPECT_TRUE(store.has_host_cache());
  EXPECT_EQ(store.host_cache_capacity(0), 4);
  const std::vector<int64_t> h = model.hosted_list(0);
  const int64_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
  using Experts = std::vector<int64_t>;
  const uint64_t eb = store.expert_bytes();

  ExpertLoadReport report = store.ensure_resident(0, {a, b, c}, 0);  // all from disk, into the cache
  EXPECT_EQ(report.host_cache_misses, 3);
  EXPECT_EQ(report.bytes_from_disk, 3 * eb);
  report = store.ensure_resident(0, {d}, 1);  // slots evict a; the cache takes d in its free place
  EXPECT_EQ(report.evicted, (Experts{a}));
  EXPECT_EQ(report.host_cache_misses, 1);
  EXPECT_EQ(report.host_cache_evictions, 0);
  EXPECT_TRUE(store.host_cached(0, a)) << "evicted from the slots, but still in the cache";

  store.record_use(0, a, 0.5f, 2);  // cache recency now b < c < d < a
  const uint64_t read_before = model.store_source->bytes_read();
  report = store.ensure_resident(0, {a}, 2);  // slots evict b; a comes from the cache
  EXPECT_EQ(report.evicted, (Experts{b}));
  EXPECT_EQ(report.host_cache_hits, 1);
  EXPECT_EQ(report.bytes_from_host, eb);
  EXPECT_EQ(report.bytes_from_disk, 0u);
  EXPECT_EQ(model.store_source->bytes_read(), read_before) << "a cached expert was read from disk";
  expect_slots_hold_reference(*model.backend, store, *model.backend, model.reference.layers[0].moe, 0,
                              {a, c, d});

  report = store.ensure_resident(0, {e}, 3);  // the cache is full: its least recent, b, makes room
  EXPECT_EQ(report.host_cache_misses, 1);
  EXPECT_EQ(report.host_cache_evictions, 1);
  EXPECT_FALSE(store.host_cached(0, b));
  for (int64_t expert : {a, c, d, e}) EXPECT_TRUE(store.host_cached(0, expert)) << expert;
  report = store.ensure_resident(0, {b}, 4);  // b now from disk again
  EXPECT_EQ(report.host_cache_misses, 1);
  EXPECT_EQ(report.bytes_from_disk, eb);
  expect_slots_hold_reference(*model.backend, store, *model.backend, model.reference.layers[0].moe, 0,
                              store.resident_experts(0));
  const ExpertStoreStats stats = store.stats();
  EXPECT_EQ(stats.host_cache_hits, 1);
  EXPECT_EQ(stats.host_cache_misses, 6);
  EXPECT_EQ(stats.host_cache_evictions, 2);  // b, then the least recent of the rest for b
  EXPECT_EQ(stats.host_tier_bytes, 3 * 4 * eb);
}

TEST(ExpertStore, RefusesAHostBudgetOnTheHostTierOrBelowTheSlots) {
  Checkpointed model(DType::kBF16, std::nullopt);
  SCOPED_TRACE("seed " + std::to_string(model.seed));
  ExpertStoreOptions options = model.store_options(ExpertTier::kDisk, std::nullopt, 4);
  options.tier = ExpertTier::kHost;
  expect_error([&] { ExpertStore(model.config, *model.store_source, *model.backend, options); },
               ErrorCode::kInvalidArgument, {"host budget", "disk tier"});
  options = model.store_options(ExpertTier::kDisk, std::nullopt, 4);
  options.host_budget.slots_by_layer[2] = kSlots - 1;
  expect_error([&] { ExpertStore(model.config, *model.store_source, *model.backend, options); },
               ErrorCode::kInvalidArgument, {"layer 2", "2 experts", "fewer than its 3"});
  options = model.store_options(ExpertTier::kDisk, std::nullopt, 4);
  options.host_budget.slots_by_layer.erase(3);
  expect_error([&] { ExpertStore(model.config, *model.store_source, *model.backend, options); },
               ErrorCode::kInvalidArgument, {"host budget has no entry for MoE layer 3"});
  // A host budget above the hosted experts is capped at them, like the slots.
  options = model.store_options(ExpertTier::kDisk, std::nullopt, 100);
  ExpertStore store(model.config, *model.store_source, *model.backend, options);
  EXPECT_EQ(store.host_cache_capacity(0), kHostedPerLayer);
}

TEST(ExpertStore, ACpuFfnRefusesRowsOfAnExpertThatIsNotResident) {
  Checkpointed model(DType::kBF16, std::nullopt);
  SCOPED_TRACE("seed " + std::to_string(model.seed));
  ExpertStore store(model.config, *model.store_source, *model.backend,
                    model.store_options(ExpertTier::kHost, std::nullopt));
  const std::vector<int64_t> h = model.hosted_list(3);
  store.ensure_resident(3, {h[0], h[1], h[2]}, 0);
  const std::vector<float> x(static_cast<size_t>(2 * model.config.hidden_size), 1.0f);
  expect_error(
      [&] {
        run_ffn(*model.backend, model.config, store.layer_weights(3), x, {int32_t(h[0]), int32_t(h[3])});
      },
      ErrorCode::kInvalidArgument, {"expert_ffn", "expert " + std::to_string(h[3]), "not hosted here"});
}

TEST(ExpertStore, RefusesWhatItCannotDoAndChangesNothing) {
  Checkpointed model(DType::kBF16, std::nullopt);
  SCOPED_TRACE("seed " + std::to_string(model.seed));
  ExpertStore store(model.config, *model.store_source, *model.backend,
                    model.store_options(ExpertTier::kDisk, std::nullopt));
  const std::vector<int64_t> h = model.hosted_list(0);
  store.ensure_resident(0, {h[0]}, 5);
  const ExpertStoreStats before = store.stats();
  const uint64_t read_before = model.store_source->bytes_read();

  expect_error(
      [&] {
        store.ensure_resident(0, {h[1], h[2], h[3], h[4], h[1]}, 5);
      },
      ErrorCode::kInvalidArgument, {"layer 0", "needs 4 distinct experts", "budget is 3 slots", "split"});
  int64_t not_hosted = 0;
  while (model.hosted.at(0).count(not_hosted)) ++not_hosted;
  expect_error(
      [&] {
        store.ensure_resident(0, {h[1], not_hosted}, 5);
      },
      ErrorCode::kInvalidArgument,
      {"layer 0 expert " + std::to_string(not_hosted), "not hosted by this worker"});
  expect_error([&] { store.ensure_resident(0, {8}, 5); }, ErrorCode::kInvalidArgument,
               {"layer 0", "not expert 8"});
  expect_error([&] { store.ensure_resident(0, {-1}, 5); }, ErrorCode::kInvalidArgument, {"not expert -1"});
  expect_error([&] { store.ensure_resident(1, {h[1]}, 5); }, ErrorCode::kInvalidArgument,
               {"layer 1", "not a MoE layer", "0, 2, 3"});
  expect_error([&] { store.ensure_resident(7, {h[1]}, 5); }, ErrorCode::kInvalidArgument, {"layer 7"});
  expect_error([&] { store.ensure_resident(0, {h[1]}, 4); }, ErrorCode::kInvalidArgument,
               {"step 4", "step 5"});
  expect_error([&] { store.prefetch(1, {h[1]}, 5); }, ErrorCode::kInvalidArgument,
               {"layer 1", "not a MoE layer"});
  expect_error([&] { store.record_use(0, not_hosted, 1.0f, 5); }, ErrorCode::kInvalidArgument,
               {"not hosted"});
  expect_error([&] { store.layer_weights(1); }, ErrorCode::kInvalidArgument, {"layer 1", "not a MoE layer"});

  const ExpertStoreStats after = store.stats();
  EXPECT_EQ(after.hits, before.hits);
  EXPECT_EQ(after.misses, before.misses);
  EXPECT_EQ(model.store_source->bytes_read(), read_before);
  EXPECT_EQ(store.resident_experts(0), (std::vector<int64_t>{h[0]}));
  // The refused call pinned nothing: h[0] may still be replaced by a later call of the layer.
  EXPECT_EQ(store.ensure_resident(0, {h[1], h[2], h[3]}, 6).evicted, (std::vector<int64_t>{h[0]}));
}

TEST(ExpertStore, RefusesABudgetThatDoesNotMatchTheMoeLayersAndCapsSlotsAtHostedExperts) {
  Checkpointed model(DType::kBF16, std::nullopt);
  SCOPED_TRACE("seed " + std::to_string(model.seed));
  ExpertStoreOptions options = model.store_options(ExpertTier::kHost, std::nullopt);
  options.budget.slots_by_layer.erase(2);
  expect_error([&] { ExpertStore(model.config, *model.store_source, *model.backend, options); },
               ErrorCode::kInvalidArgument, {"no entry for MoE layer 2"});
  options = model.store_options(ExpertTier::kHost, std::nullopt);
  options.budget.slots_by_layer[1] = 2;
  expect_error([&] { ExpertStore(model.config, *model.store_source, *model.backend, options); },
               ErrorCode::kInvalidArgument, {"layer 1", "not a MoE layer"});
  options = model.store_options(ExpertTier::kHost, std::nullopt);
  options.budget.slots_by_layer[3] = -1;
  expect_error([&] { ExpertStore(model.config, *model.store_source, *model.backend, options); },
               ErrorCode::kInvalidArgument, {"layer 3", "-1 slots"});

  options = model.store_options(ExpertTier::kDisk, std::nullopt);
  options.budget.slots_by_layer[0] = 100;
  options.budget.slots_by_layer[2] = 0;
  ExpertStore store(model.config, *model.store_source, *model.backend, options);
  EXPECT_EQ(store.capacity(0), kHostedPerLayer);
  EXPECT_EQ(store.capacity(2), 0);
  EXPECT_EQ(store.stats().resident_bytes,
            static_cast<uint64_t>(kHostedPerLayer + 0 + kSlots) * store.expert_bytes());
  store.ensure_resident(0, model.hosted_list(0), 0);  // all six fit
  EXPECT_EQ(store.resident_experts(0), model.hosted_list(0));
  expect_error([&] { store.ensure_resident(2, {model.hosted_list(2)[0]}, 0); }, ErrorCode::kInvalidArgument,
               {"layer 2", "needs 1 distinct experts", "budget is 0 slots"});
}

// On a backend whose copies run only at synchronize (as a GPU's asynchronous ones), ensure_resident
// returns with every copy done, and the disk tier does not refill its staging buffer (one expert) before
// the copies out of it ran: three misses through one staging slot still land three different experts.
// admit_per_layer: a background admission copies at most that many of a layer's experts, the first of the
// list (the most wanted), and each admitted expert's slot holds its weights.
TEST(ExpertStore, AdmitInBackgroundTakesAtMostAdmitPerLayerOfEachLayer) {
  Checkpointed model(DType::kBF16, std::nullopt);
  SCOPED_TRACE("seed " + std::to_string(model.seed));
  ExpertStoreOptions options = model.store_options(ExpertTier::kHost, std::nullopt);
  options.admit_per_layer = 2;
  ExpertStore store(model.config, *model.store_source, *model.backend, options);
  const std::vector<int64_t> h2 = model.hosted_list(2), h3 = model.hosted_list(3);
  const ExpertLoadReport report = store.admit_in_background({{2, {h2[3], h2[0], h2[1]}}, {3, {h3[2]}}}, 1);
  model.backend->wait_side_copies();
  model.backend->synchronize();
  EXPECT_EQ(report.loaded, (std::vector<int64_t>{h2[3], h2[0], h3[2]}));
  EXPECT_FALSE(store.resident(2, h2[1])) << "the third of layer 2's list is past the limit";
  expect_slots_hold_reference(*model.backend, store, *model.backend, model.reference.layers[2].moe, 2,
                              {h2[3], h2[0]});
  options.admit_per_layer = -1;
  EXPECT_THROW(ExpertStore(model.config, *model.store_source, *model.backend, options), Error);
}

TEST(ExpertStore, AsynchronousCopiesHaveFinishedWhenEnsureResidentReturns) {
  Checkpointed model(DType::kBF16, std::nullopt);
  SCOPED_TRACE("seed " + std::to_string(model.seed));
  for (const auto& [tier, host_slots] :
       {std::pair{ExpertTier::kHost, 0}, std::pair{ExpertTier::kDisk, 0}, std::pair{ExpertTier::kDisk, 4}}) {
    SCOPED_TRACE(std::string(expert_tier_name(tier)) + " host cache " + std::to_string(host_slots));
    testing::HostMemoryBackend device(MemorySpace::kDevice);
    ExpertStoreOptions options = model.store_options(tier, std::nullopt, host_slots);
    options.staging_experts = 1;
    ExpertStore store(model.config, *model.store_source, device, options);
    EXPECT_EQ(device.num_pending_copies(), 0u);
    const std::vector<int64_t> h = model.hosted_list(3);
    const std::vector<std::vector<int64_t>> sequence = {{h[0], h[1], h[2]}, {h[3], h[4], h[5]}, {h[1], h[3]}};
    for (const std::vector<int64_t>& needed : sequence) {
      store.ensure_resident(3, needed, 0);
      EXPECT_EQ(device.num_pending_copies(), 0u) << "ensure_resident returned before its copies ran";
      expect_slots_hold_reference(device, store, *model.backend, model.reference.layers[3].moe, 3, needed);
    }
  }
}

// The store's step as both executors count it through their ResidentExpertFfn: a call on a layer at or
// below the previous one starts the next forward pass (a decode step with one MoE layer included).
TEST(ExpertStore, ResidentExpertFfnCountsOneStepPerForwardPass) {
  Checkpointed model(DType::kBF16, std::nullopt);
  SCOPED_TRACE("seed " + std::to_string(model.seed));
  ExpertStore store(model.config, *model.store_source, *model.backend,
                    model.store_options(ExpertTier::kHost, std::nullopt));
  ResidentExpertFfn ffn(model.config, *model.backend, store);
  EXPECT_EQ(ffn.step(), 0);
  const std::vector<std::pair<int64_t, int64_t>> layer_then_step = {{0, 0}, {2, 0}, {3, 0}, {0, 1}, {2, 1},
                                                                    {3, 1}, {3, 2}, {0, 3}, {0, 4}, {2, 4}};
  for (const auto& [layer, step] : layer_then_step) {
    EXPECT_EQ(ffn.begin_layer(layer), step) << "layer " << layer;
    EXPECT_EQ(ffn.step(), step);
  }
}

TEST(ExpertStore, ParsesTierNames) {
  EXPECT_EQ(parse_expert_tier("host"), ExpertTier::kHost);
  EXPECT_EQ(parse_expert_tier("disk"), ExpertTier::kDisk);
  EXPECT_EQ(expert_tier_name(ExpertTier::kDisk), "disk");
  expect_error([] { parse_expert_tier("ssd"); }, ErrorCode::kInvalidArgument, {"ssd", "host or disk"});
}

}  // namespace
}  // namespace epic
