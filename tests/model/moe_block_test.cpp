// The MoE block (the local executor, and its steps route -> group -> experts -> combine one by one)
// against a direct per-token loop in double precision (the ARCHITECTURE.md formula), on random
// data with a fresh seed, with a masked expert the router would otherwise choose.
#include "worker/moe_block.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>

#include "comm/self_communicator.h"
#include "kernels/backend.h"
#include "worker/expert_parallel_moe.h"
#include "worker/moe_executor.h"
#include "worker/routing_policy.h"
#include "worker/workspace.h"

namespace epic {
namespace {

double silu(double x) { return x / (1.0 + std::exp(-x)); }

// One expert's matrices on the host, row-major as the checkpoint stores them.
struct HostExpert {
  std::vector<float> gate, up;  // [I, H]
  std::vector<float> down;      // [H, I]
};

template <class T>
OwnedTensor upload(Backend& backend, ScalarType type, std::initializer_list<int64_t> shape,
                   const std::vector<T>& values) {
  OwnedTensor tensor = backend.new_tensor(type, shape);
  EXPECT_EQ(tensor.view().bytes(), values.size() * sizeof(T)) << tensor.view().describe();
  backend.copy_from_host(tensor, 0, values.data(), values.size() * sizeof(T));
  return tensor;
}

// A MoE layer as load_model_weights lays it out: every present expert hosted, stacked in ascending
// id order into gate_up [L, 2I, H] (gate rows, then up rows) and down [L, H, I].
MoeLayerWeights make_moe_layer(Backend& backend, int64_t hidden, int64_t inter,
                               const std::vector<float>& router, const std::vector<uint8_t>& present,
                               const std::map<int64_t, HostExpert>& experts) {
  MoeLayerWeights layer;
  layer.num_experts = static_cast<int64_t>(present.size());
  layer.present = present;
  std::vector<float> gate_up, down;
  std::vector<int32_t> local_index(present.size(), -1);
  for (const auto& [expert, w] : experts) {
    EXPECT_TRUE(present[expert]) << "expert " << expert << " has weights but is not present";
    local_index[expert] = static_cast<int32_t>(layer.hosted.size());
    layer.hosted.push_back(expert);
    gate_up.insert(gate_up.end(), w.gate.begin(), w.gate.end());
    gate_up.insert(gate_up.end(), w.up.begin(), w.up.end());
    down.insert(down.end(), w.down.begin(), w.down.end());
  }
  const int64_t num_hosted = static_cast<int64_t>(layer.hosted.size());
  layer.router = upload(backend, ScalarType::kF32, {layer.num_experts, hidden}, router);
  layer.present_mask = upload(backend, ScalarType::kU8, {layer.num_experts}, present);
  layer.gate_up = upload(backend, ScalarType::kF32, {num_hosted, 2 * inter, hidden}, gate_up);
  layer.down = upload(backend, ScalarType::kF32, {num_hosted, hidden, inter}, down);
  layer.local_index = upload(backend, ScalarType::kI32, {layer.num_experts}, local_index);
  backend.synchronize();  // the host vectors die here
  return layer;
}

std::vector<float> download(Backend& backend, const Tensor& tensor) {
  std::vector<float> values(static_cast<size_t>(tensor.numel()));
  backend.copy_to_host(tensor, 0, values.data(), values.size() * sizeof(float));
  return values;
}

class MoeBlock : public ::testing::Test {
 protected:
  static constexpr int64_t kHidden = 24, kInter = 10, kNumExperts = 7, kTopK = 3, kTokens = 13;
  static constexpr int64_t kMasked = 2;

  void SetUp() override {
    const unsigned seed = std::random_device{}();
    seed_trace_ =
        std::make_unique<::testing::ScopedTrace>(__FILE__, __LINE__, "seed " + std::to_string(seed));
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    tokens_.resize(kTokens * kHidden);
    for (float& v : tokens_) v = normal(rng);
    router_.resize(kNumExperts * kHidden);
    for (float& v : router_) v = normal(rng) / std::sqrt(float(kHidden));
    // The masked expert's router row points along the tokens' sum, so unmasked it would win for
    // most tokens: masking must be what keeps it out.
    for (int64_t i = 0; i < kHidden; ++i) {
      double sum = 0;
      for (int64_t t = 0; t < kTokens; ++t) sum += tokens_[t * kHidden + i];
      router_[kMasked * kHidden + i] = static_cast<float>(sum);
    }
    present_.assign(kNumExperts, 1);
    present_[kMasked] = 0;
    for (int64_t e = 0; e < kNumExperts; ++e) {
      if (!present_[e]) continue;
      HostExpert& w = experts_[e];
      for (auto* v : {&w.gate, &w.up}) {
        v->resize(kInter * kHidden);
        for (float& x : *v) x = normal(rng) / std::sqrt(float(kHidden));
      }
      w.down.resize(kHidden * kInter);
      for (float& x : w.down) x = normal(rng) / std::sqrt(float(kInter));
    }
  }

  // Router logits of token t for every expert (masked ones too), in double.
  std::vector<double> router_logits(int64_t t) const {
    std::vector<double> logits(kNumExperts, 0.0);
    for (int64_t e = 0; e < kNumExperts; ++e)
      for (int64_t i = 0; i < kHidden; ++i)
        logits[e] += double(router_[e * kHidden + i]) * tokens_[t * kHidden + i];
    return logits;
  }

  // Experts by descending probability (ties: lower id), over `allowed` experts only.
  static std::vector<int64_t> ranked(const std::vector<double>& logits, const std::vector<uint8_t>& allowed) {
    std::vector<int64_t> order;
    for (int64_t e = 0; e < kNumExperts; ++e)
      if (allowed[e]) order.push_back(e);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return logits[a] > logits[b]; });
    return order;
  }

  // The block's output for every token, straight from the formula: top_k experts among `allowed`.
  std::vector<double> expected_output(bool normalize) const {
    return expected_output(normalize, present_, kTopK);
  }
  std::vector<double> expected_output(bool normalize, const std::vector<uint8_t>& allowed,
                                      int64_t top_k) const {
    std::vector<double> expected(kTokens * kHidden, 0.0);
    for (int64_t t = 0; t < kTokens; ++t) {
      const float* x = &tokens_[t * kHidden];
      const std::vector<double> logits = router_logits(t);
      double max_logit = -INFINITY;
      for (int64_t e = 0; e < kNumExperts; ++e)
        if (allowed[e]) max_logit = std::max(max_logit, logits[e]);
      std::vector<double> probability(kNumExperts, 0.0);
      double total = 0;
      for (int64_t e = 0; e < kNumExperts; ++e)
        if (allowed[e]) total += probability[e] = std::exp(logits[e] - max_logit);
      const std::vector<int64_t> order = ranked(logits, allowed);
      double chosen_mass = 0;
      for (int64_t j = 0; j < top_k; ++j) chosen_mass += probability[order[j]] / total;
      for (int64_t j = 0; j < top_k; ++j) {
        const int64_t e = order[j];
        double weight = probability[e] / total;
        if (normalize) weight /= chosen_mass;
        const HostExpert& w = experts_.at(e);
        std::vector<double> act(kInter);
        for (int64_t r = 0; r < kInter; ++r) {
          double g = 0, u = 0;
          for (int64_t i = 0; i < kHidden; ++i) {
            g += double(w.gate[r * kHidden + i]) * x[i];
            u += double(w.up[r * kHidden + i]) * x[i];
          }
          act[r] = silu(g) * u;
        }
        for (int64_t i = 0; i < kHidden; ++i) {
          double y = 0;
          for (int64_t r = 0; r < kInter; ++r) y += double(w.down[i * kInter + r]) * act[r];
          expected[t * kHidden + i] += weight * y;
        }
      }
    }
    return expected;
  }

  ModelConfig config(bool normalize) const {
    ModelConfig c;
    c.hidden_size = kHidden;
    c.moe_intermediate_size = kInter;
    c.num_experts = kNumExperts;
    c.num_experts_per_tok = kTopK;
    c.norm_topk_prob = normalize;
    c.num_hidden_layers = 1;
    return c;
  }

  // A model whose layer 0 is the fixture's MoE layer; the layers after it are dense.
  ModelWeights one_moe_layer(Backend& backend, int64_t num_layers = 1) const {
    ModelWeights weights;
    weights.layers.resize(static_cast<size_t>(num_layers));
    weights.layers[0].is_moe = true;
    weights.layers[0].moe = make_moe_layer(backend, kHidden, kInter, router_, present_, experts_);
    return weights;
  }

  static void expect_near(const std::vector<float>& actual, const std::vector<double>& expected) {
    ASSERT_EQ(actual.size(), expected.size());
    for (size_t k = 0; k < expected.size(); ++k)
      EXPECT_NEAR(actual[k], expected[k], 1e-5 * (1 + std::abs(expected[k])))
          << "token " << k / kHidden << " element " << k % kHidden;
  }

  std::unique_ptr<::testing::ScopedTrace> seed_trace_;
  std::vector<float> tokens_, router_;
  std::vector<uint8_t> present_;
  std::map<int64_t, HostExpert> experts_;
};

TEST_F(MoeBlock, TheMaskedExpertWouldBeChosenWithoutItsMask) {
  int64_t would_win = 0;
  for (int64_t t = 0; t < kTokens; ++t) {
    const std::vector<int64_t> order = ranked(router_logits(t), std::vector<uint8_t>(kNumExperts, 1));
    would_win += std::find(order.begin(), order.begin() + kTopK, kMasked) != order.begin() + kTopK;
  }
  EXPECT_GT(would_win, 0) << "the test data does not exercise the mask";
}

TEST_F(MoeBlock, LocalExecutorEqualsTheDirectFormula) {
  const auto backend = make_cpu_backend();
  const ModelWeights weights = one_moe_layer(*backend);
  EXPECT_EQ(weights.layers[0].moe.hosted, (std::vector<int64_t>{0, 1, 3, 4, 5, 6}));
  const OwnedTensor hidden = upload(*backend, ScalarType::kF32, {kTokens, kHidden}, tokens_);
  for (bool normalize : {false, true}) {
    SCOPED_TRACE(normalize ? "norm_topk_prob" : "no renormalisation");
    const ModelConfig c = config(normalize);
    LocalMoeExecutor executor(c, weights, *backend);
    Workspace workspace(*backend);
    const OwnedTensor out =
        upload(*backend, ScalarType::kF32, {kTokens, kHidden}, std::vector<float>(kTokens * kHidden, NAN));
    executor.forward(0, hidden, hidden, out, workspace);
    expect_near(download(*backend, out), expected_output(normalize));

    // A worker with no rows still runs the block (the expert-parallel collectives need it).
    const OwnedTensor none_in = backend->new_tensor(ScalarType::kF32, {0, kHidden});
    const OwnedTensor none_out = backend->new_tensor(ScalarType::kF32, {0, kHidden});
    EXPECT_NO_THROW(executor.forward(0, none_in, none_in, none_out, workspace));
  }
}

// A routing policy (fewer experts per token, experts removed) is the block over the narrower choice: the
// local executor and the expert-parallel one (what epic eval runs) both equal the direct formula with
// those experts disallowed and top-k lowered; the policy is dropped again with null.
TEST_F(MoeBlock, RoutingPolicyNarrowsTheChoiceOfEveryExecutor) {
  const auto backend = make_cpu_backend();
  const ModelWeights weights = one_moe_layer(*backend);
  const OwnedTensor hidden = upload(*backend, ScalarType::kF32, {kTokens, kHidden}, tokens_);
  SelfCommunicator comm;
  ExpertRoutingTable table;
  table.expert_workers[0].resize(kNumExperts);
  for (int64_t e = 0; e < kNumExperts; ++e)
    if (present_[e]) table.expert_workers[0][e] = {0};
  // Remove the expert most tokens rank first among the present ones, so removal changes the routing.
  std::vector<int64_t> first_choice(kNumExperts, 0);
  for (int64_t t = 0; t < kTokens; ++t) ++first_choice[ranked(router_logits(t), present_)[0]];
  const int64_t removed = std::max_element(first_choice.begin(), first_choice.end()) - first_choice.begin();
  std::vector<uint8_t> allowed = present_;
  allowed[removed] = 0;
  for (bool normalize : {false, true}) {
    SCOPED_TRACE(normalize ? "norm_topk_prob" : "no renormalisation");
    const ModelConfig c = config(normalize);
    LocalMoeExecutor local(c, weights, *backend);
    ExpertParallelMoeExecutor parallel(c, weights, *backend, comm, table);
    for (MoeExecutor* executor : {static_cast<MoeExecutor*>(&local), static_cast<MoeExecutor*>(&parallel)}) {
      SCOPED_TRACE(executor == &local ? "local executor" : "expert-parallel executor");
      for (int64_t top_k : {int64_t{1}, int64_t{2}, kTopK}) {
        SCOPED_TRACE("top-k " + std::to_string(top_k) + " without expert " + std::to_string(removed));
        executor->set_routing(RoutingPolicy::make(c, weights, *backend, top_k, {{0, {removed}}}));
        Workspace workspace(*backend);
        const OwnedTensor out = upload(*backend, ScalarType::kF32, {kTokens, kHidden},
                                       std::vector<float>(kTokens * kHidden, NAN));
        executor->forward(0, hidden, hidden, out, workspace);
        expect_near(download(*backend, out), expected_output(normalize, allowed, top_k));
        executor->set_routing(RoutingPolicy::make(c, weights, *backend, top_k, {}));
        executor->forward(0, hidden, hidden, out, workspace);
        expect_near(download(*backend, out), expected_output(normalize, present_, top_k));
      }
      executor->set_routing(nullptr);  // as trained again
      Workspace workspace(*backend);
      const OwnedTensor out = backend->new_tensor(ScalarType::kF32, {kTokens, kHidden});
      executor->forward(0, hidden, hidden, out, workspace);
      expect_near(download(*backend, out), expected_output(normalize));
    }
  }
}

TEST_F(MoeBlock, RoutingPolicyRefusesWhatCannotBeRouted) {
  const auto backend = make_cpu_backend();
  const ModelWeights weights = one_moe_layer(*backend, /*num_layers=*/2);  // layer 1 is dense
  const ModelConfig c = config(true);
  const auto refuses = [&](int64_t top_k, const std::map<int64_t, std::vector<int64_t>>& removed,
                           const std::string& message) {
    try {
      RoutingPolicy::make(c, weights, *backend, top_k, removed);
      ADD_FAILURE() << "accepted: " << message;
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
      EXPECT_NE(std::string(e.what()).find(message), std::string::npos) << e.what();
    }
  };
  refuses(0, {}, "trained with top-k 3");
  refuses(kTopK + 1, {}, "trained with top-k 3");
  refuses(kTopK, {{1, {0}}}, "layer 1: not a MoE layer");
  refuses(kTopK, {{0, {kNumExperts}}}, "the layer has experts 0 to 6");
  // 6 present experts; removing 4 leaves 2 (the masked one counts as gone already).
  refuses(kTopK, {{0, {0, 1, 3, 4}}}, "keeps 2 routable experts");
  EXPECT_NO_THROW(RoutingPolicy::make(c, weights, *backend, 2, {{0, {0, 1, 3, 4}}}));
  EXPECT_EQ(RoutingPolicy::make(c, weights, *backend, 2, {{0, {4, 0, 4}}})->removed(0),
            (std::vector<int64_t>{0, 4}));
}

// The host mirror of the routing (the offloading executor's substitution and prefetch): the mask is the
// present experts less the removed ones, and the softmax runs over the routable experts only, so a
// removed expert with the largest logit neither takes probability nor sets the max.
TEST_F(MoeBlock, RoutableHostMaskAndSoftmaxSkipTheRemovedExperts) {
  const auto backend = make_cpu_backend();
  const ModelWeights weights = one_moe_layer(*backend);
  const MoeLayerWeights& moe = weights.layers[0].moe;
  const auto policy = RoutingPolicy::make(config(true), weights, *backend, 2, {{0, {0, 4}}});
  std::vector<uint8_t> expected_mask = present_;
  expected_mask[0] = expected_mask[4] = 0;
  const std::vector<uint8_t> mask = routable_host_mask(moe, policy.get(), 0);
  EXPECT_EQ(mask, expected_mask);
  EXPECT_EQ(routable_host_mask(moe, nullptr, 0), present_);

  std::vector<float> row(kNumExperts);
  for (int64_t e = 0; e < kNumExperts; ++e) row[e] = 0.25f * static_cast<float>(e) - 0.5f;
  row[0] = 40.0f;  // removed, and far above every routable logit
  double max = -INFINITY, total = 0;
  for (int64_t e = 0; e < kNumExperts; ++e)
    if (mask[e]) max = std::max(max, double(row[e]));
  for (int64_t e = 0; e < kNumExperts; ++e)
    if (mask[e]) total += std::exp(double(row[e]) - max);
  std::vector<float> probs;
  routable_softmax(row.data(), mask, probs);
  ASSERT_EQ(probs.size(), static_cast<size_t>(kNumExperts));
  const RoutableSoftmaxSum sum = routable_softmax_sum(row.data(), mask);
  EXPECT_EQ(sum.max, static_cast<float>(max));
  EXPECT_NEAR(sum.total, total, 1e-12 * total);
  for (int64_t e = 0; e < kNumExperts; ++e) {
    if (!mask[e]) {
      EXPECT_EQ(probs[e], 0.0f) << "expert " << e;
      continue;
    }
    // fp32 exp and sum over at most 7 experts: a few ulps.
    const double expected = std::exp(double(row[e]) - max) / total;
    EXPECT_NEAR(probs[e], expected, 1e-6) << "expert " << e;
  }
}

TEST_F(MoeBlock, StepsOneByOneEqualTheDirectFormula) {
  const auto backend = make_cpu_backend();
  const MoeLayerWeights layer = make_moe_layer(*backend, kHidden, kInter, router_, present_, experts_);
  const OwnedTensor hidden = upload(*backend, ScalarType::kF32, {kTokens, kHidden}, tokens_);
  const int64_t slots = kTokens * kTopK;
  for (bool normalize : {false, true}) {
    SCOPED_TRACE(normalize ? "norm_topk_prob" : "no renormalisation");
    const ModelConfig c = config(normalize);
    Workspace workspace(*backend);
    const RoutedTokens routed = route_tokens(*backend, c, layer, layer.present_mask, c.num_experts_per_tok,
                                             hidden, workspace, Tensor{});
    std::vector<int32_t> expert_ids(slots);
    backend->copy_to_host(routed.expert_ids, 0, expert_ids.data(), expert_ids.size() * sizeof(int32_t));
    for (int64_t t = 0; t < kTokens; ++t) {
      const std::vector<int64_t> order = ranked(router_logits(t), present_);
      for (int64_t j = 0; j < kTopK; ++j)
        EXPECT_EQ(expert_ids[t * kTopK + j], order[j]) << "token " << t << " slot " << j;
    }

    const GroupedRows grouped = group_rows(*backend, routed.expert_ids, kNumExperts, kTopK, workspace);
    const OwnedTensor sorted = backend->new_tensor(ScalarType::kF32, {slots, kHidden});
    backend->gather_rows(hidden, grouped.source_row, sorted);
    const OwnedTensor expert_out = backend->new_tensor(ScalarType::kF32, {slots, kHidden});
    run_experts(*backend, c, layer, sorted, grouped.expert_offsets, expert_out, workspace);
    const OwnedTensor out =
        upload(*backend, ScalarType::kF32, {kTokens, kHidden}, std::vector<float>(kTokens * kHidden, NAN));
    backend->combine_top_k(expert_out, grouped.sorted_position, routed.weights, out);
    expect_near(download(*backend, out), expected_output(normalize));
  }
}

TEST(MoeGrouping, KeepsEveryRowOnceInExpertOrder) {
  const auto backend = make_cpu_backend();
  Workspace workspace(*backend);
  // 4 tokens, top-2: token t's slots are 2t and 2t + 1.
  const OwnedTensor expert_ids =
      upload(*backend, ScalarType::kI32, {4, 2}, std::vector<int32_t>{3, 1, 1, 0, 3, 0, 2, 1});
  const GroupedRows grouped = group_rows(*backend, expert_ids, 4, 2, workspace);
  auto ints = [&](const Tensor& tensor) {
    std::vector<int32_t> values(static_cast<size_t>(tensor.numel()));
    backend->copy_to_host(tensor, 0, values.data(), values.size() * sizeof(int32_t));
    return values;
  };
  EXPECT_EQ(ints(grouped.expert_offsets), (std::vector<int32_t>{0, 2, 5, 6, 8}));
  // Sorted rows come from slots 3, 5 | 1, 2, 7 | 6 | 0, 4: their tokens, and where each slot went.
  EXPECT_EQ(ints(grouped.source_row), (std::vector<int32_t>{1, 2, 0, 1, 3, 3, 0, 2}));
  EXPECT_EQ(ints(grouped.sorted_position), (std::vector<int32_t>{6, 2, 3, 0, 7, 1, 5, 4}));
}

}  // namespace
}  // namespace epic
