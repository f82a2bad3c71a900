// The host reference of the dispatch layout (worker/expert_dispatch_plan.h): a spelled-out case worked by
// hand, and random routings (fresh seed, printed) checked against ExpertRoutingTable::worker_for with the
// CPU executor's occurrence key and against the layout's own invariants (each token once per rank that
// serves any of its slots, every slot served exactly once, blocks in token order).
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "worker/expert_dispatch_plan.h"

namespace epic {
namespace {

TEST(DispatchPlan, SpelledOutReplicasAndSharedTokens) {
  // 2 ranks, 3 experts: expert 0 on rank 0, expert 1 on rank 1, expert 2 on both. Rank 1 sends 3 tokens,
  // top-2: {2, 0}, {1, 2}, {2, 1}. Expert 2's occurrences 0, 1, 2 get keys 1, 2, 3 -> ranks 1, 0, 1.
  ExpertRoutingTable table;
  table.num_workers = 2;
  table.expert_workers[0] = {{0}, {1}, {0, 1}};
  const ReplicaTable replicas = flatten_replicas(table, 0, 3);
  EXPECT_EQ(replicas.offsets, (std::vector<int32_t>{0, 1, 2, 4}));
  EXPECT_EQ(replicas.workers, (std::vector<int32_t>{0, 1, 0, 1}));
  const std::vector<int32_t> ids{2, 0, 1, 2, 2, 1};
  const std::vector<float> weights{0.6f, 0.4f, 0.7f, 0.3f, 0.9f, 0.1f};
  const DispatchPlan plan = plan_dispatch(ids, weights, 3, 2, /*rank=*/1, 2, replicas);
  EXPECT_EQ(plan.destination, (std::vector<int32_t>{1, 0, 1, 0, 1, 1}));
  EXPECT_EQ(plan.send_counts, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(plan.send_pairs, (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(plan.send_position, (std::vector<int32_t>{0, 1, -1, 0, 1, 2}));
  EXPECT_EQ(plan.sent_token, (std::vector<int32_t>{0, 1, 0, 1, 2}));
  EXPECT_EQ(plan.sent_expert_ids, (std::vector<int32_t>{-1, 0, -1, 2, 2, -1, 1, -1, 2, 1}));
  EXPECT_EQ(plan.sent_weights, (std::vector<float>{0, 0.4f, 0, 0.3f, 0.6f, 0, 0.7f, 0, 0.9f, 0.1f}));
}

TEST(DispatchPlan, RandomRoutingAgreesWithWorkerForAndServesEverySlotOnce) {
  const uint64_t seed = (uint64_t{std::random_device{}()} << 32) ^ std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 random(seed);
  for (int trial = 0; trial < 50; ++trial) {
    const int num_ranks = 1 + static_cast<int>(random() % 6);
    const int64_t num_experts = 2 + static_cast<int64_t>(random() % 20);
    const int64_t top_k = 1 + static_cast<int64_t>(random() % std::min<int64_t>(num_experts, 8));
    const int64_t num_tokens = static_cast<int64_t>(random() % 200);
    const int rank = static_cast<int>(random() % num_ranks);
    ExpertRoutingTable table;
    table.num_workers = num_ranks;
    std::vector<std::vector<int>>& experts = table.expert_workers[3];
    experts.resize(num_experts);
    for (auto& workers : experts) {
      for (int r = 0; r < num_ranks; ++r)
        if (random() % 3 == 0) workers.push_back(r);
      if (workers.empty()) workers.push_back(static_cast<int>(random() % num_ranks));
    }
    std::vector<int32_t> ids(num_tokens * top_k);
    std::vector<float> weights(ids.size());
    for (int64_t t = 0; t < num_tokens; ++t) {
      std::vector<int32_t> all(num_experts);
      for (int64_t e = 0; e < num_experts; ++e) all[e] = static_cast<int32_t>(e);
      std::shuffle(all.begin(), all.end(), random);
      for (int64_t j = 0; j < top_k; ++j) {
        ids[t * top_k + j] = all[j];
        weights[t * top_k + j] = 0.01f + static_cast<float>(random() % 1000) / 1000.0f;
      }
    }
    const DispatchPlan plan = plan_dispatch(ids, weights, num_tokens, top_k, rank, num_ranks,
                                            flatten_replicas(table, 3, num_experts));
    std::vector<uint64_t> occurrences(num_experts, 0);
    for (size_t s = 0; s < ids.size(); ++s)
      ASSERT_EQ(plan.destination[s], table.worker_for(3, ids[s], occurrences[ids[s]]++ + rank)) << "slot " << s;
    // Walk the records: blocks in rank order, tokens ascending, every slot exactly once, where it must be.
    std::vector<int> served(ids.size(), 0);
    size_t record = 0;
    for (int r = 0; r < num_ranks; ++r) {
      int32_t previous = -1;
      for (int64_t i = 0; i < plan.send_counts[r]; ++i, ++record) {
        const int32_t token = plan.sent_token[record];
        ASSERT_GT(token, previous) << "rank " << r << " block not in token order";
        previous = token;
        ASSERT_EQ(plan.send_position[r * num_tokens + token], i);
        int pairs = 0;
        for (int64_t j = 0; j < top_k; ++j) {
          const int64_t slot = token * top_k + j;
          const int32_t id = plan.sent_expert_ids[record * top_k + j];
          if (id < 0) {
            EXPECT_NE(plan.destination[slot], r);
            EXPECT_EQ(plan.sent_weights[record * top_k + j], 0.0f);
            continue;
          }
          ++pairs;
          ++served[slot];
          EXPECT_EQ(plan.destination[slot], r);
          EXPECT_EQ(id, ids[slot]);
          EXPECT_EQ(plan.sent_weights[record * top_k + j], weights[slot]);
        }
        EXPECT_GT(pairs, 0) << "a token sent to a rank that serves none of its slots";
      }
    }
    EXPECT_EQ(record, plan.sent_token.size());
    for (size_t s = 0; s < served.size(); ++s) ASSERT_EQ(served[s], 1) << "slot " << s;
    for (int r = 0; r < num_ranks; ++r)
      for (int64_t t = 0; t < num_tokens; ++t) {
        bool here = false;
        for (int64_t j = 0; j < top_k; ++j) here = here || plan.destination[t * top_k + j] == r;
        EXPECT_EQ(plan.send_position[r * num_tokens + t] >= 0, here);
      }
  }
}

TEST(DispatchPlan, UnhostedExpertIsAnInternalError) {
  ExpertRoutingTable table;
  table.num_workers = 2;
  table.expert_workers[0] = {{0}, {}};
  try {
    plan_dispatch({1}, {1.0f}, 1, 1, 0, 2, flatten_replicas(table, 0, 2));
    FAIL() << "no error";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), ErrorCode::kInternal);
    EXPECT_NE(std::string(error.what()).find("expert 1"), std::string::npos) << error.what();
  }
}

}  // namespace
}  // namespace epic
