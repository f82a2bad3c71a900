// Placement across nodes: replicas spread over nodes (each node serves its hot experts itself), the
// balance cost of that, the expected inter-node traffic on hand-worked cases, plan JSON round trips
// with the node list, and the routing rule that prefers a replica on the sender's node.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <set>

#include "comm/node_topology.h"
#include "coordinator/placement.h"
#include "coordinator/placement_traffic.h"
#include "tests/placement/placement_test_support.h"
#include "worker/expert_routing_table.h"

namespace epic {
namespace {

using testing::all_present;
using testing::fresh_seed;
using testing::seed_trace;
using testing::zipf_counts;

std::set<int> nodes_holding(const LayerPlacement& layer, int64_t expert,
                            const std::vector<int>& worker_node) {
  std::set<int> nodes;
  for (int worker : layer.expert_workers[expert]) nodes.insert(worker_node[worker]);
  return nodes;
}

TEST(NodeTopology, FromNamesNumbersNodesByFirstRankAndKeepsRankOrder) {
  const NodeTopology topology = NodeTopology::from_node_names({"b", "a", "b", "c", "a"});
  EXPECT_EQ(topology.num_nodes(), 3);
  EXPECT_EQ(topology.node_of_rank(), (std::vector<int>{0, 1, 0, 2, 1}));
  EXPECT_EQ(topology.ranks_of(0), (std::vector<int>{0, 2}));
  EXPECT_EQ(topology.ranks_of(1), (std::vector<int>{1, 4}));
  EXPECT_EQ(topology.local_index(4), 1);
  EXPECT_EQ(topology.node_name(2), "c");
  // The gateway keeps the sender's local index, modulo the destination's size.
  EXPECT_EQ(topology.gateway(1, 2), 4);  // rank 2 is node 0's second rank -> node 1's second
  EXPECT_EQ(topology.gateway(2, 2), 3);  // node 2 has one rank
  EXPECT_EQ(topology.describe(), "3 nodes (b: ranks 0,2, a: ranks 1,4, c: rank 3)");
}

TEST(NodeTopology, RanksPerNodeMakesConsecutiveNodesAndRefusesZero) {
  const NodeTopology topology = NodeTopology::from_ranks_per_node(5, 2);
  EXPECT_EQ(topology.node_of_rank(), (std::vector<int>{0, 0, 1, 1, 2}));
  EXPECT_EQ(topology.describe(), "3 nodes (node0: ranks 0-1, node1: ranks 2-3, node2: rank 4)");
  EXPECT_THROW(NodeTopology::from_ranks_per_node(4, 0), Error);
}

TEST(RoutingAcrossNodes, PrefersAReplicaOnTheSendersNodeAndRotatesOverThem) {
  ExpertRoutingTable table;
  table.num_workers = 4;
  // Expert 0 on workers 0, 1 (node 0) and 2 (node 1); expert 1 on worker 3 only.
  table.expert_workers[0] = {{0, 1, 2}, {3}};
  table.node_of_worker = {0, 0, 1, 1};
  std::vector<int> from_node0, from_node1;
  for (uint64_t key = 0; key < 4; ++key) {
    from_node0.push_back(table.worker_for_sender(0, 0, key, /*sender=*/1));
    from_node1.push_back(table.worker_for_sender(0, 0, key, /*sender=*/3));
  }
  EXPECT_EQ(from_node0, (std::vector<int>{0, 1, 0, 1}));
  EXPECT_EQ(from_node1, (std::vector<int>{2, 2, 2, 2}));
  EXPECT_EQ(table.worker_for_sender(0, 1, 7, 0), 3) << "no replica on the sender's node: the only one";
  table.node_of_worker.clear();  // one node: the plain rule
  for (uint64_t key = 0; key < 6; ++key)
    EXPECT_EQ(table.worker_for_sender(0, 0, key, 3), table.worker_for(0, 0, key));
}

// (expert, node) pairs where the node holds a replica of the expert: what lets a node serve it itself.
int64_t node_coverage(const LayerPlacement& layer, const std::vector<int>& worker_node) {
  int64_t pairs = 0;
  for (int64_t expert = 0; expert < layer.num_experts; ++expert)
    pairs += static_cast<int64_t>(nodes_holding(layer, expert, worker_node).size());
  return pairs;
}

TEST(TopologyPlacement, HotReplicasGoToNodesWithoutOne) {
  // 2 nodes x 2 workers, 8 experts, 3 slots: 4 spare slots replicate the 4 hottest experts (loads
  // 8, 7, 6, 5 before 1 ... 1), which must each end up on both nodes; node-blind packing puts some
  // replica pairs on one node.
  PlacementRequest request;
  request.num_workers = 4;
  request.layers = {all_present(0, 8)};
  request.slots_per_worker = 3;
  request.profile.load[0] = {8, 1, 7, 1, 6, 1, 5, 1};
  request.worker_node = {0, 0, 1, 1};
  request.experts_per_token = 2;
  const LayerPlacement layer = plan_placement(request).layer(0);
  for (int64_t hot : {0, 2, 4, 6}) {
    EXPECT_EQ(layer.expert_workers[hot].size(), 2u) << "expert " << hot;
    EXPECT_EQ(nodes_holding(layer, hot, request.worker_node).size(), 2u) << "expert " << hot;
  }
  EXPECT_LT(layer.max_over_mean_load(), 1.2);
}

TEST(TopologyPlacement, SpreadingCoversMoreNodesAtASmallBalanceCost) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937_64 rng(seed);
  for (int trial = 0; trial < 50; ++trial) {
    const int num_nodes = std::uniform_int_distribution<int>(2, 4)(rng);
    const int per_node = std::uniform_int_distribution<int>(1, 4)(rng);
    const int num_workers = num_nodes * per_node;
    const int64_t num_experts = std::uniform_int_distribution<int64_t>(num_workers, 64)(rng);
    PlacementRequest request;
    request.num_workers = num_workers;
    request.layers = {all_present(0, num_experts)};
    const int64_t minimum = (num_experts + num_workers - 1) / num_workers;
    request.slots_per_worker = minimum + std::uniform_int_distribution<int64_t>(1, 3)(rng);
    request.profile.load[0] = zipf_counts(num_experts, 1.2, rng);
    request.worker_node = NodeTopology::from_ranks_per_node(num_workers, per_node).node_of_rank();
    request.experts_per_token = 4;
    const LayerPlacement spread = plan_placement(request).layer(0);
    PlacementRequest one_node = request;
    one_node.worker_node.clear();
    const LayerPlacement blind = plan_placement(one_node).layer(0);
    EXPECT_GE(node_coverage(spread, request.worker_node), node_coverage(blind, request.worker_node))
        << "trial " << trial;
    EXPECT_LE(spread.max_over_mean_load(), blind.max_over_mean_load() * 1.25 + 0.05) << "trial " << trial;
  }
}

// Worked by hand: 2 nodes of 1 worker; 4 experts of equal load, top-2.
TEST(InterNodeTraffic, HandWorkedTwoNodes) {
  LayerPlacement layer;
  layer.num_experts = 4;
  layer.expert_load = {1, 1, 1, 1};
  layer.worker_experts = {{0, 1}, {2, 3}};
  layer.expert_workers = {{0}, {0}, {1}, {1}};
  // Each slot lands on the other node with probability 1/2: flat 2 * 1/2 = 1 row per token; the other
  // node is reached unless both slots stay home: 1 - (1/2)^2 = 0.75.
  InterNodeTraffic traffic = expected_inter_node_traffic(layer, {0, 1}, 2);
  EXPECT_DOUBLE_EQ(traffic.flat_rows_per_token, 1.0);
  EXPECT_DOUBLE_EQ(traffic.hierarchical_rows_per_token, 0.75);
  // Expert 0 replicated on both nodes and carrying half the load (loads 4, 1, 1, 2 of 8): from node 0,
  // a slot leaves with 3/8 (experts 2, 3); from node 1 with 1/8 (expert 1).
  layer.expert_load = {4, 1, 1, 2};
  layer.worker_experts = {{0, 1}, {0, 2, 3}};
  layer.expert_workers = {{0, 1}, {0}, {1}, {1}};
  traffic = expected_inter_node_traffic(layer, {0, 1}, 2);
  EXPECT_DOUBLE_EQ(traffic.flat_rows_per_token, (2 * 3.0 / 8 + 2 * 1.0 / 8) / 2);
  EXPECT_DOUBLE_EQ(traffic.hierarchical_rows_per_token,
                   ((1 - std::pow(5.0 / 8, 2)) + (1 - std::pow(7.0 / 8, 2))) / 2);
  // One node: nothing crosses.
  traffic = expected_inter_node_traffic(layer, {0, 0}, 2);
  EXPECT_EQ(traffic.flat_rows_per_token, 0.0);
  EXPECT_THROW(expected_inter_node_traffic(layer, {0}, 2), Error);
}

TEST(TopologyPlacement, PlanJsonKeepsTheNodesAndReportsTraffic) {
  PlacementRequest request;
  request.num_workers = 4;
  request.layers = {all_present(0, 8), all_present(2, 6)};
  request.slots_per_worker = 3;
  request.worker_node = {0, 0, 1, 1};
  request.experts_per_token = 2;
  const PlacementPlan plan = plan_placement(request);
  const std::string text = plan.to_json_text();
  EXPECT_NE(text.find("\"worker_nodes\": [0, 0, 1, 1]"), std::string::npos) << text;
  EXPECT_NE(text.find("\"inter_node_rows_per_token\""), std::string::npos) << text;
  const PlacementPlan back = PlacementPlan::from_json_text(text, "test");
  EXPECT_EQ(back.worker_node, plan.worker_node);
  EXPECT_EQ(back.experts_per_token, 2);
  EXPECT_EQ(back.layer(2).worker_experts, plan.layer(2).worker_experts);
  // A wrong node list is refused with the field named.
  std::string bad = text;
  bad.replace(bad.find("[0, 0, 1, 1]"), 12, "[0, 0, 1]");
  EXPECT_THROW(
      {
        try {
          PlacementPlan::from_json_text(bad, "test");
        } catch (const Error& error) {
          EXPECT_NE(std::string(error.what()).find("worker_nodes"), std::string::npos) << error.what();
          throw;
        }
      },
      Error);
  PlacementRequest wrong = request;
  wrong.worker_node = {0, 1};
  EXPECT_THROW(plan_placement(wrong), Error);
}

}  // namespace
}  // namespace epic
