// The MoE block's four steps against a direct per-token loop (the ARCHITECTURE.md formula),
// on random data with a fresh seed, including masked experts.
#include "worker/moe_block.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "kernels/backend.h"

namespace epic {
namespace {

double silu(double x) { return x / (1.0 + std::exp(-x)); }

TEST(MoeBlock, StepsEqualTheDirectFormula) {
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t hidden = 24, inter = 10, num_experts = 7, top_k = 3, num_tokens = 13;

  MoeLayerWeights layer;
  layer.num_experts = num_experts;
  layer.router.resize(num_experts * hidden);
  for (float& v : layer.router) v = normal(rng) / std::sqrt(float(hidden));
  layer.present = {1, 1, 0, 1, 1, 1, 1};  // expert 2 masked out
  for (int64_t e = 0; e < num_experts; ++e) {
    if (!layer.present[e]) continue;
    ExpertWeights& w = layer.experts[e];
    for (auto* v : {&w.gate, &w.up}) {
      v->resize(inter * hidden);
      for (float& x : *v) x = normal(rng) / std::sqrt(float(hidden));
    }
    w.down.resize(hidden * inter);
    for (float& x : w.down) x = normal(rng) / std::sqrt(float(inter));
  }
  std::vector<float> tokens(num_tokens * hidden);
  for (float& v : tokens) v = normal(rng);

  auto backend = make_cpu_backend();
  for (bool normalize : {false, true}) {
    SCOPED_TRACE(normalize ? "norm_topk_prob" : "no renormalisation");
    std::vector<float> out(num_tokens * hidden, NAN);
    moe_block_forward(*backend, layer, tokens.data(), num_tokens, hidden, inter, top_k, normalize,
                      out.data());
    for (int64_t t = 0; t < num_tokens; ++t) {
      const float* x = &tokens[t * hidden];
      // Softmax over present experts, top-k by probability.
      std::vector<double> logits(num_experts, -INFINITY);
      double max_logit = -INFINITY;
      for (int64_t e = 0; e < num_experts; ++e) {
        if (!layer.present[e]) continue;
        logits[e] = 0;
        for (int64_t i = 0; i < hidden; ++i) logits[e] += double(layer.router[e * hidden + i]) * x[i];
        max_logit = std::max(max_logit, logits[e]);
      }
      std::vector<double> probability(num_experts, 0.0);
      double total = 0;
      for (int64_t e = 0; e < num_experts; ++e)
        if (layer.present[e]) total += probability[e] = std::exp(logits[e] - max_logit);
      std::vector<int64_t> order;
      for (int64_t e = 0; e < num_experts; ++e) order.push_back(e);
      std::stable_sort(order.begin(), order.end(),
                       [&](int64_t a, int64_t b) { return probability[a] > probability[b]; });
      double chosen_mass = 0;
      for (int64_t j = 0; j < top_k; ++j) chosen_mass += probability[order[j]] / total;
      std::vector<double> expected(hidden, 0.0);
      for (int64_t j = 0; j < top_k; ++j) {
        const int64_t e = order[j];
        ASSERT_TRUE(layer.present[e]) << "a masked expert was chosen";
        double weight = probability[e] / total;
        if (normalize) weight /= chosen_mass;
        const ExpertWeights& w = layer.experts.at(e);
        std::vector<double> act(inter);
        for (int64_t r = 0; r < inter; ++r) {
          double g = 0, u = 0;
          for (int64_t i = 0; i < hidden; ++i) {
            g += double(w.gate[r * hidden + i]) * x[i];
            u += double(w.up[r * hidden + i]) * x[i];
          }
          act[r] = silu(g) * u;
        }
        for (int64_t i = 0; i < hidden; ++i) {
          double y = 0;
          for (int64_t r = 0; r < inter; ++r) y += double(w.down[i * inter + r]) * act[r];
          expected[i] += weight * y;
        }
      }
      for (int64_t i = 0; i < hidden; ++i)
        EXPECT_NEAR(out[t * hidden + i], expected[i], 1e-5 * (1 + std::abs(expected[i])))
            << "token " << t << " element " << i;
    }
  }
}

TEST(MoeBlock, GroupingKeepsEveryRowOnceInExpertOrder) {
  Routing routing;
  routing.num_tokens = 4;
  routing.top_k = 2;
  routing.expert_ids = {3, 1, 1, 0, 3, 0, 2, 1};
  routing.weights.assign(8, 0.5f);
  const ExpertGroups groups = group_rows_by_expert(routing);
  EXPECT_EQ(groups.expert_ids, (std::vector<int64_t>{0, 1, 2, 3}));
  EXPECT_EQ(groups.offsets, (std::vector<int64_t>{0, 2, 5, 6, 8}));
  EXPECT_EQ(groups.slots, (std::vector<int64_t>{3, 5, 1, 2, 7, 6, 0, 4}));
}

}  // namespace
}  // namespace epic
