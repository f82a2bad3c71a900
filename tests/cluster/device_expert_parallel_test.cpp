// The NCCL expert-parallel executor under mpirun (-np 2 and 4, one GPU per rank), on random routing with a
// fresh seed (EPIC_TEST_SEED replays one): (1) the device layout kernels against the host reference of
// worker/expert_dispatch_plan.h, every destination, position, count and record checked; (2) the executor
// against LocalMoeExecutor on this rank's GPU with every expert, for the same rows: fp32, real SwiGLU
// experts with random weights, replicated experts, unpicked experts, and a round where the last rank has
// no tokens. Tolerance: the two differ only in fp32 sum order (rank partials added in rank order instead
// of all k slots in slot order), so |diff| <= 1e-5 * max|reference| of the rank's output; the same with
// two-batch overlap (two micro-batches, exchanges on their own stream). (3) the low-latency mode
// (DeviceLowLatency below): agreed steps within and beyond the bound, its byte counts and timed phases,
// and a step captured in a CUDA graph and replayed with new rows (counted once per step).
// Skips visibly on every rank when the ranks do not each have a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_backend_access.h"
#include "kernels/cuda/ep_dispatch_kernels.h"
#include "tests/support/mpi_gtest_main.h"
#include "worker/device_expert_parallel_moe.h"
#include "worker/ep_mode.h"
#include "worker/expert_dispatch_plan.h"
#include "worker/moe_executor.h"

namespace epic {
namespace {

constexpr double kTestTimeoutSeconds = 60.0;
constexpr int64_t kNumExperts = 12, kHidden = 64, kInter = 32, kTopK = 4, kLayer = 0;

MpiCommunicator& host() { return testing::MpiGtestEnvironment::comm(); }

template <class T>
OwnedTensor upload(Backend& backend, ScalarType type, std::initializer_list<int64_t> shape,
                   const std::vector<T>& values) {
  OwnedTensor tensor = backend.new_tensor(type, shape);
  if (!values.empty()) backend.copy_from_host(tensor, 0, values.data(), values.size() * sizeof(T));
  backend.synchronize();
  return tensor;
}

template <class T>
std::vector<T> download(Backend& backend, const Tensor& tensor, int64_t count) {
  std::vector<T> values(static_cast<size_t>(count));
  if (count > 0) backend.copy_to_host(tensor, 0, values.data(), values.size() * sizeof(T));
  return values;
}

std::vector<float> random_values(std::mt19937_64& generator, int64_t count, float scale) {
  std::uniform_real_distribution<float> magnitude(0.05f, 1.0f);
  std::bernoulli_distribution negative(0.5);
  std::vector<float> values(static_cast<size_t>(count));
  for (float& v : values) v = scale * (negative(generator) ? -magnitude(generator) : magnitude(generator));
  return values;
}

// Every expert on 1 .. num_ranks workers (random, the same on every rank), expert 0 on all of them.
ExpertRoutingTable random_table(std::mt19937_64& shared, int num_ranks) {
  ExpertRoutingTable table;
  table.num_workers = num_ranks;
  std::vector<std::vector<int>>& experts = table.expert_workers[kLayer];
  experts.resize(kNumExperts);
  for (int64_t e = 0; e < kNumExperts; ++e) {
    for (int r = 0; r < num_ranks; ++r)
      if (e == 0 || std::bernoulli_distribution(0.35)(shared)) experts[e].push_back(r);
    if (experts[e].empty()) experts[e].push_back(static_cast<int>(shared() % num_ranks));
  }
  return table;
}

// One MoE layer whose expert e has the same random weights on every rank; only `hosted` are loaded.
ModelWeights make_weights(Backend& backend, const std::vector<float>& router,
                          const std::vector<float>& gate_up, const std::vector<float>& down,
                          const std::vector<int64_t>& hosted) {
  ModelWeights weights;
  weights.layers.resize(1);
  weights.layers[0].is_moe = true;
  MoeLayerWeights& moe = weights.layers[0].moe;
  moe.num_experts = kNumExperts;
  moe.present.assign(kNumExperts, 1);
  moe.hosted = hosted;
  std::vector<int32_t> local_index(kNumExperts, -1);
  std::vector<float> hosted_gate_up, hosted_down;
  for (size_t slot = 0; slot < hosted.size(); ++slot) {
    const int64_t e = hosted[slot];
    local_index[e] = static_cast<int32_t>(slot);
    hosted_gate_up.insert(hosted_gate_up.end(), gate_up.begin() + e * 2 * kInter * kHidden,
                          gate_up.begin() + (e + 1) * 2 * kInter * kHidden);
    hosted_down.insert(hosted_down.end(), down.begin() + e * kHidden * kInter,
                       down.begin() + (e + 1) * kHidden * kInter);
  }
  const int64_t num_hosted = std::max<int64_t>(1, static_cast<int64_t>(hosted.size()));
  if (hosted.empty()) {  // an empty shard still needs tensors of one (never used) expert
    hosted_gate_up.assign(2 * kInter * kHidden, 0.0f);
    hosted_down.assign(kHidden * kInter, 0.0f);
  }
  moe.router = upload(backend, ScalarType::kF32, {kNumExperts, kHidden}, router);
  moe.present_mask = upload(backend, ScalarType::kU8, {kNumExperts}, moe.present);
  moe.gate_up = upload(backend, ScalarType::kF32, {num_hosted, 2 * kInter, kHidden}, hosted_gate_up);
  moe.down = upload(backend, ScalarType::kF32, {num_hosted, kHidden, kInter}, hosted_down);
  moe.local_index = upload(backend, ScalarType::kI32, {kNumExperts}, local_index);
  return weights;
}

// got against want (LocalMoeExecutor's) at 1e-5 of the largest |want|: the executors agree up to fp32 sum
// order (device_expert_parallel_moe.h). At most five failures are printed.
void expect_close_to_reference(const std::vector<float>& got, const std::vector<float>& want) {
  ASSERT_EQ(got.size(), want.size());
  float scale = 0.0f;
  for (float v : want) scale = std::max(scale, std::fabs(v));
  ASSERT_GT(scale, 0.0f);
  const float tolerance = 1e-5f * scale;
  int64_t wrong = 0;
  for (size_t i = 0; i < got.size(); ++i)
    if (!(std::fabs(got[i] - want[i]) <= tolerance) && wrong++ < 5)
      ADD_FAILURE() << "token " << i / kHidden << " column " << i % kHidden << ": " << got[i] << " vs "
                    << want[i] << " (tolerance " << tolerance << ")";
  EXPECT_EQ(wrong, 0) << "elements outside the tolerance";
}

ModelConfig moe_config() {
  ModelConfig config;
  config.hidden_size = kHidden;
  config.num_hidden_layers = 1;
  config.moe_intermediate_size = kInter;
  config.num_experts = kNumExperts;
  config.num_experts_per_tok = kTopK;
  config.norm_topk_prob = true;
  return config;
}

class DeviceExpertParallel : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const int32_t have_gpu = cuda_device_count() > 0 ? 1 : 0;
    const std::vector<int32_t> gpus = host().all_gather_value<int32_t>(have_gpu);
    if (std::count(gpus.begin(), gpus.end(), 1) != static_cast<int64_t>(gpus.size())) {
      skip_reason_ = "not every rank sees a CUDA device (run on the GPU machine, one GPU per rank)";
      if (host().rank() == 0)
        std::printf("epic_device_ep_test: skipped on every rank: %s\n", skip_reason_.c_str());
      return;
    }
    uint64_t seed = std::random_device{}() ^ (uint64_t{std::random_device{}()} << 32);
    if (const char* replay = std::getenv("EPIC_TEST_SEED")) seed = std::strtoull(replay, nullptr, 10);
    host().broadcast(&seed, sizeof(seed), 0);
    seed_ = seed;
    if (host().rank() == 0)
      std::printf("[ SEED     ] %llu (EPIC_TEST_SEED replays it)\n", static_cast<unsigned long long>(seed));
    backend_ = make_cuda_backend(cuda_device_count() > 1 ? host().rank() % cuda_device_count() : 0);
    nccl_ = make_backend_nccl_communicator(host(), CommOptions{kTestTimeoutSeconds}, *backend_);
  }
  static void TearDownTestSuite() {
    nccl_.reset();
    backend_.reset();
  }
  void SetUp() override {
    if (!skip_reason_.empty()) GTEST_SKIP() << skip_reason_;
    rank_ = host().rank();
    size_ = host().size();
    const std::string name = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    shared_.seed(seed_ + std::hash<std::string>{}(name));
    own_.seed(seed_ + 1000003ULL * (rank_ + 1) + std::hash<std::string>{}(name));
  }
  void TearDown() override { host().barrier(); }

  int rank_ = 0, size_ = 1;
  std::mt19937_64 shared_, own_;
  static inline std::string skip_reason_;
  static inline uint64_t seed_ = 0;
  static inline std::unique_ptr<Backend> backend_;
  static inline std::unique_ptr<NcclCommunicator> nccl_;
};

TEST_F(DeviceExpertParallel, LayoutKernelsMatchTheHostPlan) {
  Backend& backend = *backend_;
  const ExpertRoutingTable table = random_table(shared_, size_);
  const ReplicaTable replicas = flatten_replicas(table, kLayer, kNumExperts);
  for (int64_t num_tokens : {1, 7, 300, 2000}) {
    SCOPED_TRACE("tokens " + std::to_string(num_tokens));
    const int64_t num_slots = num_tokens * kTopK;
    std::vector<int32_t> ids(num_slots);
    std::vector<float> weights = random_values(own_, num_slots, 1.0f);
    for (int64_t t = 0; t < num_tokens; ++t) {  // k distinct experts per token, as route_top_k gives
      std::vector<int32_t> all(kNumExperts);
      for (int e = 0; e < kNumExperts; ++e) all[e] = e;
      std::shuffle(all.begin(), all.end(), own_);
      std::copy(all.begin(), all.begin() + kTopK, ids.begin() + t * kTopK);
    }
    const DispatchPlan plan = plan_dispatch(ids, weights, num_tokens, kTopK, rank_, size_, replicas);
    // The host plan's replica choice is ExpertParallelMoeExecutor's.
    std::vector<uint64_t> occurrences(kNumExperts, 0);
    for (int64_t s = 0; s < num_slots; ++s)
      ASSERT_EQ(plan.destination[s], table.worker_for(kLayer, ids[s], occurrences[ids[s]]++ + rank_))
          << "slot " << s;

    const std::vector<float> rows = random_values(own_, num_tokens * kHidden, 1.0f);
    const OwnedTensor hidden = upload(backend, ScalarType::kF32, {num_tokens, kHidden}, rows);
    const OwnedTensor expert_ids = upload(backend, ScalarType::kI32, {num_slots}, ids);
    const OwnedTensor route_weights = upload(backend, ScalarType::kF32, {num_slots}, weights);
    const OwnedTensor replica_offsets =
        upload(backend, ScalarType::kI32, {kNumExperts + 1}, replicas.offsets);
    const OwnedTensor replica_workers =
        upload(backend, ScalarType::kI32, {static_cast<int64_t>(replicas.workers.size())}, replicas.workers);
    const OwnedTensor offsets = backend.new_tensor(ScalarType::kI32, {kNumExperts + 1});
    const OwnedTensor source = backend.new_tensor(ScalarType::kI32, {num_slots});
    const OwnedTensor position = backend.new_tensor(ScalarType::kI32, {num_slots});
    const OwnedTensor destination = backend.new_tensor(ScalarType::kI32, {num_slots});
    const OwnedTensor send_position = backend.new_tensor(ScalarType::kI32, {size_ * num_tokens});
    const OwnedTensor counts = backend.new_tensor(ScalarType::kI32, {4LL * size_});  // int64 [2R]
    backend.group_by_expert(expert_ids, kNumExperts, kTopK, offsets, source, position);
    cudaStream_t stream = cuda_backend_stream(backend);
    ep_kernels::slot_destinations(expert_ids.view().as<int32_t>(), position.view().as<int32_t>(),
                                  offsets.view().as<int32_t>(), replica_offsets.view().as<int32_t>(),
                                  replica_workers.view().as<int32_t>(), num_slots, rank_,
                                  destination.view().as<int32_t>(), stream);
    int64_t* device_counts = static_cast<int64_t*>(counts.view().data);
    ep_kernels::rank_layout(destination.view().as<int32_t>(), num_tokens, kTopK, size_,
                            send_position.view().as<int32_t>(), device_counts, device_counts + size_, stream);
    const int64_t total = static_cast<int64_t>(plan.sent_token.size());
    const int64_t record_bytes = ep_kernels::dispatch_record_bytes(kHidden, ScalarType::kF32, kTopK);
    const OwnedTensor records =
        backend.new_tensor(ScalarType::kU8, {std::max<int64_t>(1, total * record_bytes)});
    ep_kernels::pack_dispatch(hidden.view().data, ScalarType::kF32, expert_ids.view().as<int32_t>(),
                              route_weights.view().as<float>(), destination.view().as<int32_t>(),
                              send_position.view().as<int32_t>(), device_counts, num_tokens, kTopK, kHidden,
                              size_, record_bytes, records.view().data, stream);
    EXPECT_EQ(download<int32_t>(backend, destination, num_slots), plan.destination);
    EXPECT_EQ(download<int32_t>(backend, send_position, size_ * num_tokens), plan.send_position);
    const std::vector<int32_t> count_words = download<int32_t>(backend, counts, 4LL * size_);
    std::vector<int64_t> device_count_values(2 * size_);
    std::memcpy(device_count_values.data(), count_words.data(), device_count_values.size() * sizeof(int64_t));
    for (int r = 0; r < size_; ++r) {
      EXPECT_EQ(device_count_values[r], plan.send_counts[r]) << "tokens to rank " << r;
      EXPECT_EQ(device_count_values[size_ + r], plan.send_pairs[r]) << "pairs to rank " << r;
    }
    const std::vector<uint8_t> bytes = download<uint8_t>(backend, records, total * record_bytes);
    for (int64_t i = 0; i < total; ++i) {
      const uint8_t* record = bytes.data() + i * record_bytes;
      ASSERT_EQ(std::memcmp(record, rows.data() + plan.sent_token[i] * kHidden, kHidden * sizeof(float)), 0)
          << "record " << i << " row (token " << plan.sent_token[i] << ")";
      ASSERT_EQ(std::memcmp(record + kHidden * sizeof(float), plan.sent_expert_ids.data() + i * kTopK,
                            kTopK * sizeof(int32_t)),
                0)
          << "record " << i << " expert ids";
      ASSERT_EQ(std::memcmp(record + kHidden * sizeof(float) + kTopK * sizeof(int32_t),
                            plan.sent_weights.data() + i * kTopK, kTopK * sizeof(float)),
                0)
          << "record " << i << " weights";
    }
  }
}

// The expert store's log under the NCCL exchange (ep_kernels::expert_use_sums) against host sums: received
// slots with ids of real experts, of slots served elsewhere (E) and padding (weight 0), at several sizes.
// Uses exactly; the weight sums within 1e-5 relative of a double sum (fp32 over at most 8000 positive terms
// in a tree: the bound is ~log2(n) roundings). Every entry is written (NaN and -1 before).
TEST_F(DeviceExpertParallel, ExpertUseSumsMatchTheHostSums) {
  Backend& backend = *backend_;
  for (int64_t num_received : {1, 7, 300, 2000}) {
    SCOPED_TRACE("received " + std::to_string(num_received));
    const int64_t num_slots = num_received * kTopK;
    std::vector<int32_t> ids(num_slots);
    std::vector<float> weights(num_slots);
    std::uniform_real_distribution<float> weight(0.01f, 1.0f);
    std::vector<int64_t> expected_uses(kNumExperts, 0);
    std::vector<double> expected_sums(kNumExperts, 0.0);
    for (int64_t s = 0; s < num_slots; ++s) {
      const uint64_t kind = own_() % 5;  // 0: served elsewhere, 1: padding, else a pick
      ids[s] = kind == 0 ? static_cast<int32_t>(kNumExperts) : static_cast<int32_t>(own_() % kNumExperts);
      weights[s] = kind <= 1 ? 0.0f : weight(own_);
      if (kind >= 2) {
        expected_uses[ids[s]] += 1;
        expected_sums[ids[s]] += weights[s];
      }
    }
    const OwnedTensor expert_ids = upload(backend, ScalarType::kI32, {num_slots}, ids);
    const OwnedTensor slot_weights = upload(backend, ScalarType::kF32, {num_slots}, weights);
    const OwnedTensor offsets = backend.new_tensor(ScalarType::kI32, {kNumExperts + 2});
    const OwnedTensor source = backend.new_tensor(ScalarType::kI32, {num_slots});
    const OwnedTensor position = backend.new_tensor(ScalarType::kI32, {num_slots});
    backend.group_by_expert(expert_ids, kNumExperts + 1, kTopK, offsets, source, position);
    const OwnedTensor sorted = backend.new_tensor(ScalarType::kF32, {num_slots});
    const OwnedTensor uses =
        upload(backend, ScalarType::kI32, {kNumExperts}, std::vector<int32_t>(kNumExperts, -1));
    const OwnedTensor sums = upload(backend, ScalarType::kF32, {kNumExperts},
                                    std::vector<float>(kNumExperts, std::numeric_limits<float>::quiet_NaN()));
    ep_kernels::expert_use_sums(expert_ids.view().as<int32_t>(), slot_weights.view().as<float>(),
                                position.view().as<int32_t>(), offsets.view().as<int32_t>(), num_slots,
                                kNumExperts, sorted.view().as<float>(), uses.view().as<int32_t>(),
                                sums.view().as<float>(), cuda_backend_stream(backend));
    const std::vector<int32_t> got_uses = download<int32_t>(backend, uses, kNumExperts);
    const std::vector<float> got_sums = download<float>(backend, sums, kNumExperts);
    for (int64_t e = 0; e < kNumExperts; ++e) {
      EXPECT_EQ(got_uses[e], expected_uses[e]) << "expert " << e;
      EXPECT_NEAR(got_sums[e], expected_sums[e], 1e-5 * std::max(1.0, expected_sums[e])) << "expert " << e;
    }
  }
}

// The normal mode (with `options`) against LocalMoeExecutor holding every expert, on this rank's GPU, over
// rounds of a few tokens (most experts unpicked), many, and the last rank without tokens.
void run_rounds_against_one_gpu(Backend& backend, NcclCommunicator& nccl, std::mt19937_64& shared,
                                std::mt19937_64& own, const DeviceMoeOptions& options) {
  const int rank = nccl.rank(), size = nccl.size();
  const ModelConfig config = moe_config();
  const ExpertRoutingTable table = random_table(shared, size);
  const std::vector<float> router = random_values(shared, kNumExperts * kHidden, 1.0f);
  const std::vector<float> gate_up = random_values(shared, kNumExperts * 2 * kInter * kHidden, 0.2f);
  const std::vector<float> down = random_values(shared, kNumExperts * kHidden * kInter, 0.2f);
  std::vector<int64_t> mine, all;
  for (int64_t e = 0; e < kNumExperts; ++e) {
    all.push_back(e);
    if (table.hosts(rank, kLayer, e)) mine.push_back(e);
  }
  const ModelWeights shard = make_weights(backend, router, gate_up, down, mine);
  const ModelWeights whole = make_weights(backend, router, gate_up, down, all);
  DeviceExpertParallelMoeExecutor executor(config, shard, backend, nccl, table, options);
  LocalMoeExecutor reference(config, whole, backend);
  Workspace workspace(backend), reference_workspace(backend);
  // Rounds: a few tokens (most experts unpicked), many, and the last rank without tokens.
  for (int round = 0; round < 3; ++round) {
    int64_t num_tokens = round == 0 ? 3 : (round == 1 ? 700 + static_cast<int64_t>(own() % 300) : 40);
    if (round == 2 && rank == size - 1) num_tokens = 0;
    SCOPED_TRACE("round " + std::to_string(round) + ", tokens " + std::to_string(num_tokens));
    const std::vector<float> rows = random_values(own, num_tokens * kHidden, 2.0f);
    const int64_t shape_rows = std::max<int64_t>(num_tokens, 0);
    const OwnedTensor hidden = upload(backend, ScalarType::kF32, {shape_rows, kHidden}, rows);
    const std::vector<float> nan_fill(num_tokens * kHidden, std::numeric_limits<float>::quiet_NaN());
    const OwnedTensor out = upload(backend, ScalarType::kF32, {shape_rows, kHidden}, nan_fill);
    executor.forward(kLayer, hidden, hidden, out, workspace);
    if (num_tokens == 0) continue;
    const OwnedTensor expected = upload(backend, ScalarType::kF32, {shape_rows, kHidden}, nan_fill);
    reference.forward(kLayer, hidden, hidden, expected, reference_workspace);
    expect_close_to_reference(download<float>(backend, out, num_tokens * kHidden),
                              download<float>(backend, expected, num_tokens * kHidden));
  }
  EXPECT_EQ(executor.stats().calls, 3);
  EXPECT_EQ(executor.stats().overlapped_calls, options.overlap ? 3 : 0);
  EXPECT_EQ(executor.stats().low_latency_calls, 0);
}

TEST_F(DeviceExpertParallel, ExecutorMatchesOneGpuUpToSumOrder) {
  run_rounds_against_one_gpu(*backend_, *nccl_, shared_, own_, DeviceMoeOptions{EpMode::kNormal});
}

// Two-batch overlap: two micro-batches, their exchanges on a stream of their own; each token's sum is the
// normal mode's, so the same tolerance holds.
TEST_F(DeviceExpertParallel, OverlappedExecutorMatchesOneGpuUpToSumOrder) {
  DeviceMoeOptions options{EpMode::kNormal};
  options.overlap = true;
  run_rounds_against_one_gpu(*backend_, *nccl_, shared_, own_, options);
}

// The low-latency mode (fixed-size blocks, counts read on the device) against LocalMoeExecutor on this
// rank's GPU, same tolerance as above (the same summation order as the normal mode). Steps agreed through
// the host as epic run agrees them (begin_step with the most rows of any rank): 1 token everywhere, a rank
// with none, exactly the bound everywhere, mixed sizes, and a step beyond the bound (auto: normal mode).
// Then one step captured in a CUDA graph on every rank and replayed with new rows (new routing too): the
// results must follow the new inputs.
class DeviceLowLatency : public DeviceExpertParallel {
 protected:
  static constexpr int64_t kBound = 16;

  void SetUp() override {
    DeviceExpertParallel::SetUp();
    if (IsSkipped()) return;
    config_ = moe_config();
    table_ = random_table(shared_, size_);
    const std::vector<float> router = random_values(shared_, kNumExperts * kHidden, 1.0f);
    const std::vector<float> gate_up = random_values(shared_, kNumExperts * 2 * kInter * kHidden, 0.2f);
    const std::vector<float> down = random_values(shared_, kNumExperts * kHidden * kInter, 0.2f);
    std::vector<int64_t> mine, all;
    for (int64_t e = 0; e < kNumExperts; ++e) {
      all.push_back(e);
      if (table_.hosts(rank_, kLayer, e)) mine.push_back(e);
    }
    shard_ = make_weights(*backend_, router, gate_up, down, mine);
    whole_ = make_weights(*backend_, router, gate_up, down, all);
  }

  int64_t agreed_max(int64_t rows) {
    const std::vector<int64_t> all = host().all_gather_value<int64_t>(rows);
    return *std::max_element(all.begin(), all.end());
  }

  // out (rows of hidden) against LocalMoeExecutor on the same rows.
  void expect_matches_reference(const Tensor& hidden, const Tensor& out, int64_t num_tokens) {
    if (num_tokens == 0) return;
    Backend& backend = *backend_;
    LocalMoeExecutor reference(config_, whole_, backend);
    Workspace reference_workspace(backend);
    const std::vector<float> nan_fill(num_tokens * kHidden, std::numeric_limits<float>::quiet_NaN());
    const OwnedTensor expected = upload(backend, ScalarType::kF32, {num_tokens, kHidden}, nan_fill);
    reference.forward(kLayer, hidden, hidden, expected, reference_workspace);
    expect_close_to_reference(download<float>(backend, out, num_tokens * kHidden),
                              download<float>(backend, expected, num_tokens * kHidden));
  }

  ModelConfig config_;
  ExpertRoutingTable table_;
  ModelWeights shard_, whole_;
};

TEST_F(DeviceLowLatency, StepsWithinTheBoundMatchOneGpu) {
  Backend& backend = *backend_;
  DeviceExpertParallelMoeExecutor executor(config_, shard_, backend, *nccl_, table_,
                                           DeviceMoeOptions{EpMode::kAuto, kBound});
  EXPECT_FALSE(executor.capturable()) << "auto without an agreed step runs the normal mode";
  Workspace workspace(backend);
  const int last = size_ - 1;
  // Rows per rank in each step: 1 everywhere; the last rank none; the bound everywhere; mixed; beyond.
  const std::vector<std::string> names = {"one token", "a rank with none", "the bound", "mixed",
                                          "beyond the bound"};
  for (size_t step = 0; step < names.size(); ++step) {
    int64_t num_tokens = 1;
    if (step == 1) num_tokens = rank_ == last ? 0 : 1 + static_cast<int64_t>(own_() % kBound);
    if (step == 2) num_tokens = kBound;
    if (step == 3) num_tokens = 2 + static_cast<int64_t>(own_() % (kBound - 1));
    if (step == 4) num_tokens = kBound + 1 + static_cast<int64_t>(own_() % 40);
    SCOPED_TRACE(names[step] + ", tokens " + std::to_string(num_tokens));
    const int64_t max_rows = agreed_max(num_tokens);
    executor.begin_step(max_rows);
    EXPECT_EQ(executor.capturable(), max_rows <= kBound);
    const std::vector<float> rows = random_values(own_, num_tokens * kHidden, 2.0f);
    const OwnedTensor hidden = upload(backend, ScalarType::kF32, {num_tokens, kHidden}, rows);
    const std::vector<float> nan_fill(num_tokens * kHidden, std::numeric_limits<float>::quiet_NaN());
    const OwnedTensor out = upload(backend, ScalarType::kF32, {num_tokens, kHidden}, nan_fill);
    executor.forward(kLayer, hidden, hidden, out, workspace);
    executor.finish_step();
    EXPECT_FALSE(executor.capturable());
    expect_matches_reference(hidden, out, num_tokens);
  }
  EXPECT_EQ(executor.stats().calls, 5);
  EXPECT_EQ(executor.stats().low_latency_calls, 4);
}

TEST_F(DeviceLowLatency, ModeLowLatencyRunsUnagreedCallsAndRefusesStepsBeyondTheBound) {
  Backend& backend = *backend_;
  DeviceMoeOptions options{EpMode::kLowLatency, kBound};
  options.time_low_latency_phases = true;  // as bench-moe: a host wait per call, phase times recorded
  DeviceExpertParallelMoeExecutor executor(config_, shard_, backend, *nccl_, table_, options);
  EXPECT_TRUE(executor.capturable()) << "low-latency without an agreed step: the full bound";
  Workspace workspace(backend);
  const int64_t num_tokens = 1 + static_cast<int64_t>(own_() % kBound);
  const OwnedTensor hidden = upload(backend, ScalarType::kF32, {num_tokens, kHidden},
                                    random_values(own_, num_tokens * kHidden, 2.0f));
  const std::vector<float> nan_fill(num_tokens * kHidden, std::numeric_limits<float>::quiet_NaN());
  const OwnedTensor out = upload(backend, ScalarType::kF32, {num_tokens, kHidden}, nan_fill);
  executor.forward(kLayer, hidden, hidden, out, workspace);
  expect_matches_reference(hidden, out, num_tokens);
  const DeviceMoeStats& stats = executor.stats();
  EXPECT_EQ(stats.low_latency_calls, 1);
  // Fixed-size blocks: every peer gets the full bound's block each way, whatever the counts.
  const int64_t record_bytes = ep_kernels::dispatch_record_bytes(kHidden, ScalarType::kF32, kTopK);
  const uint64_t peers = static_cast<uint64_t>(size_ - 1);
  EXPECT_EQ(stats.dispatch_bytes_sent, peers * static_cast<uint64_t>(low_latency_block_bytes(
                                                   low_latency_capacity(kBound), record_bytes)));
  EXPECT_EQ(stats.combine_bytes_sent,
            peers * static_cast<uint64_t>(low_latency_capacity(kBound) * kHidden) * sizeof(float));
  EXPECT_GT(stats.dispatch_seconds, 0.0);
  EXPECT_GT(stats.expert_seconds, 0.0);
  EXPECT_GT(stats.combine_seconds, 0.0);
  // Every rank gets the same agreed size, so every rank refuses alike (no exchange starts).
  try {
    executor.begin_step(kBound + 1);
    ADD_FAILURE() << "a step beyond --ep-low-latency-max-tokens was accepted in low-latency mode";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("--ep-low-latency-max-tokens"), std::string::npos) << e.what();
  }
}

TEST_F(DeviceLowLatency, CapturedStepReplaysWithNewInputs) {
  Backend& backend = *backend_;
  DeviceExpertParallelMoeExecutor executor(config_, shard_, backend, *nccl_, table_,
                                           DeviceMoeOptions{EpMode::kAuto, kBound});
  Workspace workspace(backend);
  // Two shapes: every rank with rows, then the last rank with none (it still serves its experts).
  for (int shape = 0; shape < 2; ++shape) {
    const int64_t num_tokens =
        shape == 1 && rank_ == size_ - 1 ? 0 : 1 + static_cast<int64_t>(own_() % kBound);
    SCOPED_TRACE("shape " + std::to_string(shape) + ", tokens " + std::to_string(num_tokens));
    const int64_t max_rows = agreed_max(num_tokens);
    const OwnedTensor hidden = upload(backend, ScalarType::kF32, {num_tokens, kHidden},
                                      random_values(own_, num_tokens * kHidden, 2.0f));
    const OwnedTensor out = backend.new_tensor(ScalarType::kF32, {num_tokens, kHidden});
    // Eager first, as the model runner does (sizes the buffers, uploads the replica table), then capture.
    executor.begin_step(max_rows);
    ASSERT_TRUE(executor.capturable());
    executor.forward(kLayer, hidden, hidden, out, workspace);
    executor.finish_step();
    expect_matches_reference(hidden, out, num_tokens);
    executor.begin_step(max_rows);
    std::unique_ptr<Graph> graph =
        backend.capture([&] { executor.forward(kLayer, hidden, hidden, out, workspace); });
    executor.finish_step();
    ASSERT_NE(graph, nullptr) << "the CUDA backend did not capture the low-latency step";
    for (int replay = 0; replay < 3; ++replay) {
      SCOPED_TRACE("replay " + std::to_string(replay));
      const std::vector<float> rows = random_values(own_, num_tokens * kHidden, 2.0f);
      if (num_tokens > 0) backend.copy_from_host(hidden, 0, rows.data(), rows.size() * sizeof(float));
      const std::vector<float> nan_fill(num_tokens * kHidden, std::numeric_limits<float>::quiet_NaN());
      if (num_tokens > 0) backend.copy_from_host(out, 0, nan_fill.data(), nan_fill.size() * sizeof(float));
      backend.synchronize();  // the host vectors are the copies' sources
      executor.begin_step(max_rows);
      graph->replay();
      executor.finish_step();  // bounded wait for the replayed exchanges
      expect_matches_reference(hidden, out, num_tokens);
    }
  }
  // Counted per step (eager, capture, three replays, for each shape), not per forward() call.
  EXPECT_EQ(executor.stats().low_latency_calls, 10);
}

}  // namespace
}  // namespace epic

int main(int argc, char** argv) {
  return epic::testing::run_mpi_gtests(argc, argv, epic::kTestTimeoutSeconds);
}
