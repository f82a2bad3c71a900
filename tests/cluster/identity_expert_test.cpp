// The expert-parallel executor alone under mpirun (CTest runs it with 2, 3 and 4 ranks), on the CPU
// backend with an identity expert (IdentityExpertBackend: expert_ffn copies x to y), so a MoE layer
// computes out[t] = sum_j w[t, j] * x[t]. A spelled-out topology per rank count (below): 10 experts,
// top-2, one layer; each token's router input holds the same large value at its two chosen experts'
// positions and the router is the identity, so both weights are exactly 0.5 and out must equal x bit
// for bit. The tables are chosen so that experts no token picks, a rank whose tokens all stay on its
// own experts (sends nothing), a rank with zero tokens, and replicated experts whose replicas both
// serve rows all happen; the test asserts each from the executor's own counters. A second case routes
// random rows through a random router (distinct weights) and compares with the host's sum in slot
// order, bitwise. A third proves the expert check of bench-moe catches a wrong expert row.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "comm/mpi_communicator.h"
#include "comm/node_topology.h"
#include "kernels/backend.h"
#include "tests/support/mpi_gtest_main.h"
#include "worker/expert_ffn_checker.h"
#include "worker/expert_parallel_moe.h"
#include "worker/identity_expert_backend.h"
#include "worker/moe_block.h"
#include "worker/workspace.h"

namespace epic {
namespace {

constexpr double kTestTimeoutSeconds = 30.0;
constexpr int64_t kNumExperts = 10, kHidden = 16, kInter = 4, kTopK = 2;
constexpr int64_t kLayer = 0;
// The router input at a token's two chosen experts: both logits equal and far above the others (0).
constexpr float kChosenLogit = 8.0f;

// One spelled-out cluster: which experts each worker hosts and which two experts each token of each
// rank picks. Occurrences of a replicated expert rotate over its replicas starting at the sending
// rank (occurrence + rank, mod replicas: expert_parallel_moe.cpp), which the comments work out.
struct Topology {
  std::vector<std::vector<int64_t>> worker_experts;              // worker -> hosted experts
  std::vector<std::vector<std::pair<int32_t, int32_t>>> tokens;  // rank -> each token's two experts
  int sends_nothing_rank = -1;  // has tokens, all on experts only it hosts (or its own replica)
  int zero_token_rank = -1;     // -1: no such rank at this size
  std::vector<int64_t> unpicked_experts;
  std::vector<int64_t> replicated_experts;  // each replica must compute rows
};

Topology topology_for(int num_workers) {
  switch (num_workers) {
    case 2:  // expert 5 on both workers; rank 1's 5s go 1 (key 1), 0 (key 2), 1 (key 3)
      return {{{0, 1, 2, 3, 5, 8}, {4, 5, 6, 7, 9}},
              {{{0, 1}, {2, 3}, {1, 3}}, {{0, 5}, {5, 6}, {3, 5}, {4, 6}}},
              /*sends_nothing_rank=*/0,
              /*zero_token_rank=*/-1,
              {7, 8, 9},
              {5}};
    case 3:  // expert 5 on workers 1 and 2; rank 2's 5s go 1, 2, 1, 2 (keys 2..5); rank 1 has no tokens
      return {{{0, 1, 2, 8}, {3, 4, 5, 6}, {5, 7, 9}},
              {{{1, 2}, {0, 2}, {0, 1}}, {}, {{0, 5}, {3, 5}, {5, 7}, {4, 5}, {0, 7}}},
              /*sends_nothing_rank=*/0,
              /*zero_token_rank=*/1,
              {6, 8, 9},
              {5}};
    case 4:  // expert 4 on workers 0 and 2, expert 2 on 1 and 3. Rank 0's one 4 (key 0) stays on rank 0;
             // rank 2's 2s go 1, 3, 1 and its 4s go 0, 2; rank 3's one 2 (key 3) stays on rank 3
      return {{{0, 1, 4}, {2, 3, 8}, {4, 5}, {2, 6, 7, 9}},
              {{{0, 1}, {1, 4}}, {}, {{2, 4}, {2, 5}, {2, 6}, {4, 5}, {3, 7}}, {{6, 7}, {2, 3}, {0, 5}}},
              /*sends_nothing_rank=*/0,
              /*zero_token_rank=*/1,
              {8, 9},
              {2, 4}};
    default:
      return {};
  }
}

ExpertRoutingTable routing_table(const Topology& topology) {
  ExpertRoutingTable table;
  table.num_workers = static_cast<int>(topology.worker_experts.size());
  std::vector<std::vector<int>>& experts = table.expert_workers[kLayer];
  experts.resize(kNumExperts);
  for (int worker = 0; worker < table.num_workers; ++worker)
    for (int64_t expert : topology.worker_experts[worker]) experts[expert].push_back(worker);
  return table;
}

template <class T>
OwnedTensor upload(Backend& backend, ScalarType type, std::initializer_list<int64_t> shape,
                   const std::vector<T>& values) {
  OwnedTensor tensor = backend.new_tensor(type, shape);
  if (!values.empty()) backend.copy_from_host(tensor, 0, values.data(), values.size() * sizeof(T));
  return tensor;
}

// Values with |v| in [0.05, 1] and a random sign: never zero, so a row that is dropped or zeroed
// cannot pass by accident.
std::vector<float> random_values(std::mt19937_64& generator, int64_t count) {
  std::uniform_real_distribution<float> magnitude(0.05f, 1.0f);
  std::bernoulli_distribution negative(0.5);
  std::vector<float> values(static_cast<size_t>(count));
  for (float& v : values) v = negative(generator) ? -magnitude(generator) : magnitude(generator);
  return values;
}

// One MoE layer of kNumExperts experts holding only `hosted` (ascending), with the given router and
// random expert weights (the identity expert never reads them; the expert check does).
ModelWeights make_weights(Backend& backend, const std::vector<int64_t>& hosted,
                          const std::vector<float>& router, std::mt19937_64& generator) {
  ModelWeights weights;
  weights.layers.resize(1);
  weights.layers[0].is_moe = true;
  MoeLayerWeights& moe = weights.layers[0].moe;
  moe.num_experts = kNumExperts;
  moe.present.assign(kNumExperts, 1);
  moe.hosted = hosted;
  std::sort(moe.hosted.begin(), moe.hosted.end());
  std::vector<int32_t> local_index(kNumExperts, -1);
  for (size_t slot = 0; slot < moe.hosted.size(); ++slot)
    local_index[moe.hosted[slot]] = static_cast<int32_t>(slot);
  const int64_t num_hosted = static_cast<int64_t>(moe.hosted.size());
  moe.router = upload(backend, ScalarType::kF32, {kNumExperts, kHidden}, router);
  moe.present_mask = upload(backend, ScalarType::kU8, {kNumExperts}, moe.present);
  moe.gate_up = upload(backend, ScalarType::kF32, {num_hosted, 2 * kInter, kHidden},
                       random_values(generator, num_hosted * 2 * kInter * kHidden));
  moe.down = upload(backend, ScalarType::kF32, {num_hosted, kHidden, kInter},
                    random_values(generator, num_hosted * kHidden * kInter));
  moe.local_index = upload(backend, ScalarType::kI32, {kNumExperts}, local_index);
  backend.synchronize();
  return weights;
}

ModelConfig moe_config() {
  ModelConfig config;
  config.hidden_size = kHidden;
  config.num_hidden_layers = 1;
  config.moe_intermediate_size = kInter;
  config.num_experts = kNumExperts;
  config.num_experts_per_tok = kTopK;
  config.norm_topk_prob = true;  // the two equal weights become exactly 0.5
  return config;
}

class IdentityExpert : public ::testing::Test {
 protected:
  void SetUp() override {
    rank_ = comm().rank();
    num_workers_ = comm().size();
    // A fresh seed per run, the same on every rank (the router must be), printed with any failure.
    uint64_t seed = std::random_device{}();
    seed = (seed << 32) ^ std::random_device{}();
    comm().broadcast(&seed, sizeof(seed), 0);
    seed_trace_ =
        std::make_unique<::testing::ScopedTrace>(__FILE__, __LINE__, "seed " + std::to_string(seed));
    shared_generator_.seed(seed);
    own_generator_.seed(seed + 1000003ULL * (rank_ + 1));
  }
  // No rank starts the next test while another is still in this one.
  void TearDown() override { comm().barrier(); }
  static MpiCommunicator& comm() { return testing::MpiGtestEnvironment::comm(); }

  // This rank's part of the spelled-out cluster: its experts behind the identity router, its tokens'
  // router rows (each token's two experts at kChosenLogit), random rows x and a NaN-filled output.
  struct SpelledOutInputs {
    ModelWeights weights;
    std::vector<float> x;
    OwnedTensor hidden, router_rows, out;
    int64_t num_tokens = 0;
  };
  SpelledOutInputs spelled_out_inputs(const Topology& topology) {
    SpelledOutInputs in;
    const std::vector<std::pair<int32_t, int32_t>>& my_tokens = topology.tokens[rank_];
    in.num_tokens = static_cast<int64_t>(my_tokens.size());
    std::vector<float> identity_router(kNumExperts * kHidden, 0.0f);
    for (int64_t e = 0; e < kNumExperts; ++e) identity_router[e * kHidden + e] = 1.0f;
    in.weights = make_weights(*cpu_, topology.worker_experts[rank_], identity_router, own_generator_);
    std::vector<float> router_input(in.num_tokens * kHidden, 0.0f);
    for (int64_t t = 0; t < in.num_tokens; ++t) {
      router_input[t * kHidden + my_tokens[t].first] = kChosenLogit;
      router_input[t * kHidden + my_tokens[t].second] = kChosenLogit;
    }
    in.x = random_values(own_generator_, in.num_tokens * kHidden);
    in.hidden = upload(*cpu_, ScalarType::kF32, {in.num_tokens, kHidden}, in.x);
    in.router_rows = upload(*cpu_, ScalarType::kF32, {in.num_tokens, kHidden}, router_input);
    const std::vector<float> nan_fill(in.num_tokens * kHidden, std::numeric_limits<float>::quiet_NaN());
    in.out = upload(*cpu_, ScalarType::kF32, {in.num_tokens, kHidden}, nan_fill);
    return in;
  }

  int rank_ = 0, num_workers_ = 1;
  std::mt19937_64 shared_generator_;  // the same draws on every rank
  std::mt19937_64 own_generator_;     // this rank's draws
  std::unique_ptr<::testing::ScopedTrace> seed_trace_;
  std::unique_ptr<Backend> cpu_ = make_cpu_backend(1);
};

TEST_F(IdentityExpert, SpelledOutTopologyGivesEveryRowBackExactly) {
  const Topology topology = topology_for(num_workers_);
  ASSERT_EQ(static_cast<int>(topology.worker_experts.size()), num_workers_)
      << "no topology spelled out for " << num_workers_ << " ranks: run with -np 2, 3 or 4";
  const ExpertRoutingTable table = routing_table(topology);
  const std::vector<std::pair<int32_t, int32_t>>& my_tokens = topology.tokens[rank_];
  const SpelledOutInputs in = spelled_out_inputs(topology);
  const int64_t num_tokens = in.num_tokens;
  const std::vector<float>& x = in.x;

  IdentityExpertBackend identity(*cpu_);
  const ModelConfig config = moe_config();
  ExpertParallelMoeExecutor executor(config, in.weights, identity, comm(), table);
  Workspace workspace(identity);
  executor.forward(kLayer, in.hidden, in.router_rows, in.out, workspace);

  // The routing is the spelled-out one, with weights exactly 0.5.
  ASSERT_EQ(identity.routed_expert_ids().size(), static_cast<size_t>(num_tokens * kTopK));
  for (int64_t t = 0; t < num_tokens; ++t) {
    const auto [low, high] = std::minmax(my_tokens[t].first, my_tokens[t].second);
    EXPECT_EQ(identity.routed_expert_ids()[t * kTopK], low) << "token " << t;
    EXPECT_EQ(identity.routed_expert_ids()[t * kTopK + 1], high) << "token " << t;
    EXPECT_EQ(identity.routed_weights()[t * kTopK], 0.5f) << "token " << t;
    EXPECT_EQ(identity.routed_weights()[t * kTopK + 1], 0.5f) << "token " << t;
  }
  // 0.5 * x + 0.5 * x == x exactly: every element of every token, bit for bit.
  std::string first;
  EXPECT_EQ(count_bitwise_mismatches(read_as_f32(*cpu_, in.out), x, kHidden, &first), 0) << first;

  // Each case of the topology really happened, seen from the executor's counters.
  const MoePhaseStats& stats = executor.stats();
  EXPECT_EQ(identity.identity_rows(), stats.rows_computed);
  int64_t total_rows = 0;
  for (int64_t rows : comm().all_gather_value<int64_t>(stats.rows_computed)) total_rows += rows;
  int64_t total_slots = 0;
  for (const auto& tokens : topology.tokens) total_slots += static_cast<int64_t>(tokens.size()) * kTopK;
  EXPECT_EQ(total_rows, total_slots) << "every (token, slot) row computed exactly once over the cluster";
  // Where this rank's rows went, from the routing and the table's replica rule (occurrence + rank).
  int64_t rows_to_others = 0;
  std::vector<uint64_t> occurrences(kNumExperts, 0);
  for (int32_t expert : identity.routed_expert_ids())
    if (table.worker_for(kLayer, expert, occurrences[expert]++ + static_cast<uint64_t>(rank_)) != rank_)
      ++rows_to_others;
  EXPECT_EQ(stats.rows_sent, num_tokens * kTopK);
  if (rank_ == topology.sends_nothing_rank) {
    EXPECT_GT(num_tokens, 0);
    EXPECT_EQ(rows_to_others, 0) << "its tokens stay on its own experts";
  } else if (num_tokens > 0) {
    EXPECT_GT(rows_to_others, 0);
  }
  if (rank_ == topology.zero_token_rank) {
    EXPECT_EQ(num_tokens, 0);
    EXPECT_GT(stats.rows_computed, 0) << "a rank without tokens still serves its experts";
  }
  std::vector<int64_t> rows_per_expert(kNumExperts, 0);
  if (executor.expert_rows().count(kLayer)) rows_per_expert = executor.expert_rows().at(kLayer);
  for (int64_t expert : topology.unpicked_experts) {
    for (const auto& tokens : topology.tokens)
      for (const auto& [a, b] : tokens)
        ASSERT_TRUE(a != expert && b != expert) << "the table picks " << expert;
    EXPECT_EQ(rows_per_expert[expert], 0) << "expert " << expert;
  }
  const std::vector<std::vector<int64_t>> rows_on_rank =
      comm().all_gather_v<int64_t>(std::span<const int64_t>(rows_per_expert));
  for (int64_t expert : topology.replicated_experts) {
    const std::vector<int>& replicas = table.expert_workers.at(kLayer)[expert];
    ASSERT_GE(replicas.size(), 2u) << "expert " << expert << " is meant to be replicated";
    for (int worker : replicas)
      EXPECT_GT(rows_on_rank[worker][expert], 0) << "replica of expert " << expert << " on worker " << worker;
  }
}

TEST_F(IdentityExpert, RandomRoutingMatchesTheHostSumInSlotOrder) {
  const Topology topology = topology_for(num_workers_);
  ASSERT_EQ(static_cast<int>(topology.worker_experts.size()), num_workers_);
  const ExpertRoutingTable table = routing_table(topology);
  const std::vector<float> router = random_values(shared_generator_, kNumExperts * kHidden);
  const ModelWeights weights = make_weights(*cpu_, topology.worker_experts[rank_], router, own_generator_);
  // 0 to 12 tokens on each rank; rank 1 has none, so a rank without tokens takes part here too.
  const int64_t num_tokens = rank_ == 1 ? 0 : std::uniform_int_distribution<int64_t>(1, 12)(own_generator_);
  const std::vector<float> x = random_values(own_generator_, num_tokens * kHidden);
  const OwnedTensor hidden = upload(*cpu_, ScalarType::kF32, {num_tokens, kHidden}, x);
  const OwnedTensor out = cpu_->new_tensor(ScalarType::kF32, {num_tokens, kHidden});

  IdentityExpertBackend identity(*cpu_);
  const ModelConfig config = moe_config();
  ExpertParallelMoeExecutor executor(config, weights, identity, comm(), table);
  Workspace workspace(identity);
  executor.forward(kLayer, hidden, hidden, out, workspace);  // the router reads the same fp32 rows

  const std::vector<float>& routed = identity.routed_weights();
  ASSERT_EQ(routed.size(), static_cast<size_t>(num_tokens * kTopK));
  for (int64_t t = 0; t < num_tokens; ++t)
    EXPECT_NE(routed[t * kTopK], routed[t * kTopK + 1])
        << "token " << t << ": distinct logits, distinct weights";
  const std::vector<float> expected = identity_moe_output(x, routed, kTopK, kHidden, ScalarType::kF32);
  std::string first;
  EXPECT_EQ(count_bitwise_mismatches(read_as_f32(*cpu_, out), expected, kHidden, &first), 0) << first;
  int64_t total_rows = 0;
  for (int64_t rows : comm().all_gather_value<int64_t>(executor.stats().rows_computed)) total_rows += rows;
  int64_t total_slots = 0;
  for (int64_t tokens : comm().all_gather_value<int64_t>(num_tokens)) total_slots += tokens * kTopK;
  EXPECT_EQ(total_rows, total_slots);
}

// Corrupts one element of the first row of every expert_ffn output: what the expert check must catch.
class OneWrongElementBackend final : public ForwardingBackend {
 public:
  using ForwardingBackend::ForwardingBackend;
  void expert_ffn(const Tensor& x, const Tensor& expert_offsets, const Tensor& gate_up, const Tensor& down,
                  const Tensor& local_index, const Tensor& intermediate, const Tensor& y) override {
    inner().expert_ffn(x, expert_offsets, gate_up, down, local_index, intermediate, y);
    // Outputs here are of order 1 (weights within [-1, 1], hidden 16, intermediate 4): adding 1.0 puts
    // the element far past 1e-4 of the row's largest value.
    if (y.dim(0) > 0) y.as<float>()[3] += 1.0f;
  }
};

TEST_F(IdentityExpert, ExpertCheckPassesTheRealFfnAndCatchesOneWrongElement) {
  const Topology topology = topology_for(num_workers_);
  ASSERT_EQ(static_cast<int>(topology.worker_experts.size()), num_workers_);
  const ExpertRoutingTable table = routing_table(topology);
  const std::vector<float> router = random_values(shared_generator_, kNumExperts * kHidden);
  const ModelWeights weights = make_weights(*cpu_, topology.worker_experts[rank_], router, own_generator_);
  const int64_t num_tokens = 9;
  const OwnedTensor hidden = upload(*cpu_, ScalarType::kF32, {num_tokens, kHidden},
                                    random_values(own_generator_, num_tokens * kHidden));
  const OwnedTensor out = cpu_->new_tensor(ScalarType::kF32, {num_tokens, kHidden});
  const ModelConfig config = moe_config();
  const double tolerance = expert_ffn_check_tolerance(ScalarType::kF32);

  ExpertFfnCheckingBackend checked(*cpu_, /*max_rows_per_call=*/64, tolerance);
  ExpertParallelMoeExecutor executor(config, weights, checked, comm(), table);
  Workspace workspace(checked);
  executor.forward(kLayer, hidden, hidden, out, workspace);
  EXPECT_EQ(checked.rows_checked(), executor.stats().rows_computed) << "every row fits in the sample";
  EXPECT_EQ(checked.wrong_elements(), 0) << checked.first_mismatch();

  OneWrongElementBackend faulty(*cpu_);
  ExpertFfnCheckingBackend checked_faulty(faulty, /*max_rows_per_call=*/64, tolerance);
  checked_faulty.set_label("layer 0");
  ExpertParallelMoeExecutor faulty_executor(config, weights, checked_faulty, comm(), table);
  Workspace faulty_workspace(checked_faulty);
  faulty_executor.forward(kLayer, hidden, hidden, out, faulty_workspace);
  if (faulty_executor.stats().rows_computed > 0) {
    EXPECT_EQ(checked_faulty.wrong_elements(), 1);
    EXPECT_NE(checked_faulty.first_mismatch().find("layer 0, expert "), std::string::npos)
        << checked_faulty.first_mismatch();
    EXPECT_NE(checked_faulty.first_mismatch().find("row 0 of its group, element 3"), std::string::npos)
        << checked_faulty.first_mismatch();
  } else {
    EXPECT_EQ(checked_faulty.wrong_elements(), 0);
  }
}

// ---- Hierarchical dispatch (worker/expert_parallel_hierarchical.cpp) ----------------------------------
// The same spelled-out clusters, declared as nodes of `ranks_per_node` consecutive ranks. With identity
// experts and both weights 0.5, every grouping of a token's sum is exact (0.5 x + 0.5 x, 0.5 x + 0), so
// the hierarchical output must be x bit for bit whatever rank or node each slot lands on.
class HierarchicalDispatch : public IdentityExpert, public ::testing::WithParamInterface<int> {
 protected:
  NodeTopology topology() const { return NodeTopology::from_ranks_per_node(num_workers_, GetParam()); }
  ExpertRoutingTable table_with_nodes(const Topology& spelled_out) const {
    ExpertRoutingTable table = routing_table(spelled_out);
    table.node_of_worker = topology().node_of_rank();
    return table;
  }
};

TEST_P(HierarchicalDispatch, SpelledOutTopologyGivesEveryRowBackExactly) {
  const Topology spelled_out = topology_for(num_workers_);
  ASSERT_EQ(static_cast<int>(spelled_out.worker_experts.size()), num_workers_)
      << "no topology spelled out for " << num_workers_ << " ranks: run with -np 2, 3 or 4";
  const ExpertRoutingTable table = table_with_nodes(spelled_out);
  const SpelledOutInputs in = spelled_out_inputs(spelled_out);
  const int64_t num_tokens = in.num_tokens;

  IdentityExpertBackend identity(*cpu_);
  const ModelConfig config = moe_config();
  ExpertParallelMoeExecutor executor(config, in.weights, identity, comm(), table,
                                     HostExchangeOptions{EpDispatch::kHierarchical, topology()});
  Workspace workspace(identity);
  executor.forward(kLayer, in.hidden, in.router_rows, in.out, workspace);
  std::string first;
  EXPECT_EQ(count_bitwise_mismatches(read_as_f32(*cpu_, in.out), in.x, kHidden, &first), 0) << first;

  // Every (token, slot) row computed exactly once over the cluster, replicas included.
  int64_t total_rows = 0;
  for (int64_t rows : comm().all_gather_value<int64_t>(executor.stats().rows_computed)) total_rows += rows;
  int64_t total_slots = 0;
  for (const auto& tokens : spelled_out.tokens) total_slots += static_cast<int64_t>(tokens.size()) * kTopK;
  EXPECT_EQ(total_rows, total_slots);

  // Bytes across nodes over the cluster, worked out here from the routing: a record (row + 1 + 3k ints)
  // per token and other node it reaches, and one row (the node's sum) back per record.
  const NodeTopology nodes = topology();
  const int64_t row_bytes = kHidden * 4, record_bytes = row_bytes + (1 + 3 * kTopK) * 4;
  std::vector<uint64_t> occurrences(kNumExperts, 0);
  uint64_t records_out = 0;
  for (int64_t t = 0; t < num_tokens; ++t) {
    std::vector<bool> reached(nodes.num_nodes(), false);
    for (int64_t k = 0; k < kTopK; ++k) {
      const int32_t expert = identity.routed_expert_ids()[t * kTopK + k];
      const int worker =
          table.worker_for_sender(kLayer, expert, occurrences[expert]++ + uint64_t(rank_), rank_);
      reached[nodes.node_of(worker)] = true;
    }
    for (int node = 0; node < nodes.num_nodes(); ++node)
      records_out += reached[node] && node != nodes.node_of(rank_);
  }
  const std::vector<uint64_t> out_per_rank = comm().all_gather_value<uint64_t>(records_out);
  uint64_t crossed_total = 0;
  for (uint64_t bytes : comm().all_gather_value<uint64_t>(executor.stats().inter_node_bytes_sent))
    crossed_total += bytes;
  uint64_t expected_total = 0;
  for (uint64_t records : out_per_rank) expected_total += records * (record_bytes + row_bytes);
  EXPECT_EQ(crossed_total, expected_total) << "bytes across nodes, whole cluster";
  if (nodes.num_nodes() == 1) {
    EXPECT_EQ(executor.stats().inter_node_bytes_sent, 0u);
  }
}

TEST_P(HierarchicalDispatch, RealExpertsMatchFlatUpToTheSumOrder) {
  const Topology spelled_out = topology_for(num_workers_);
  ASSERT_EQ(static_cast<int>(spelled_out.worker_experts.size()), num_workers_);
  const ExpertRoutingTable table = table_with_nodes(spelled_out);
  const std::vector<float> router = random_values(shared_generator_, kNumExperts * kHidden);
  const ModelWeights weights = make_weights(*cpu_, spelled_out.worker_experts[rank_], router, own_generator_);
  // 0 to 12 tokens on each rank; rank 1 has none.
  const int64_t num_tokens = rank_ == 1 ? 0 : std::uniform_int_distribution<int64_t>(1, 12)(own_generator_);
  const OwnedTensor hidden = upload(*cpu_, ScalarType::kF32, {num_tokens, kHidden},
                                    random_values(own_generator_, num_tokens * kHidden));
  const OwnedTensor flat_out = cpu_->new_tensor(ScalarType::kF32, {num_tokens, kHidden});
  const OwnedTensor hierarchical_out = cpu_->new_tensor(ScalarType::kF32, {num_tokens, kHidden});
  const ModelConfig config = moe_config();
  Workspace workspace(*cpu_);
  ExpertParallelMoeExecutor flat(config, weights, *cpu_, comm(), table);
  flat.forward(kLayer, hidden, hidden, flat_out, workspace);
  ExpertParallelMoeExecutor hierarchical(config, weights, *cpu_, comm(), table,
                                         HostExchangeOptions{EpDispatch::kHierarchical, topology()});
  hierarchical.forward(kLayer, hidden, hidden, hierarchical_out, workspace);
  // The same products summed in another grouping: within a few fp32 ulp (1e-6) of the row's largest value.
  const std::vector<float> got = read_as_f32(*cpu_, hierarchical_out), want = read_as_f32(*cpu_, flat_out);
  for (int64_t t = 0; t < num_tokens; ++t) {
    float row_max = 0;
    for (int64_t i = 0; i < kHidden; ++i) row_max = std::max(row_max, std::fabs(want[t * kHidden + i]));
    for (int64_t i = 0; i < kHidden; ++i)
      ASSERT_LE(std::fabs(got[t * kHidden + i] - want[t * kHidden + i]), 1e-6f * row_max)
          << "token " << t << " element " << i << ": hierarchical " << got[t * kHidden + i] << ", flat "
          << want[t * kHidden + i];
  }
  EXPECT_EQ(hierarchical.stats().rows_computed, flat.stats().rows_computed)
      << "both schemes send each (token, slot) to the same worker";
}

// 1 rank per node (every hop crosses nodes), 2 (two-rank nodes, the last one smaller at 3 ranks), and
// one node holding every rank (nothing crosses).
INSTANTIATE_TEST_SUITE_P(RanksPerNode, HierarchicalDispatch, ::testing::Values(1, 2, 4),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return std::to_string(info.param) + "_ranks_per_node";
                         });

}  // namespace
}  // namespace epic

int main(int argc, char** argv) {
  return epic::testing::run_mpi_gtests(argc, argv, epic::kTestTimeoutSeconds);
}
