// Which ranks of a job share a node. Expert parallelism across nodes needs it: the link between nodes
// is many times slower than the one inside a node, so the hierarchical dispatch sends a token across
// once per destination node (to a gateway rank there) and fans it out inside the node, and the planner
// spreads replicas so each node can serve hot experts itself.
// Nodes are numbered in order of their lowest rank; ranks keep their order inside a node.
#pragma once

#include <string>
#include <vector>

namespace epic {

class Communicator;

class NodeTopology {
 public:
  NodeTopology() = default;  // one rank on one node
  // One entry per rank: the name of its node (the host name); equal names share a node.
  static NodeTopology from_node_names(const std::vector<std::string>& names);
  // Every `ranks_per_node` consecutive ranks form a node (the last one may be smaller): a declared
  // topology, for planning a cluster from elsewhere or emulating one on a single host.
  // Error(kInvalidArgument) unless world_size >= 1 and ranks_per_node >= 1.
  static NodeTopology from_ranks_per_node(int world_size, int ranks_per_node);

  int world_size() const { return static_cast<int>(node_of_rank_.size()); }
  int num_nodes() const { return static_cast<int>(ranks_of_node_.size()); }
  int node_of(int rank) const { return node_of_rank_.at(rank); }
  const std::vector<int>& node_of_rank() const { return node_of_rank_; }
  const std::vector<int>& ranks_of(int node) const { return ranks_of_node_.at(node); }
  const std::string& node_name(int node) const { return node_names_.at(node); }
  // Position of the rank among its node's ranks (0 for the node's lowest rank).
  int local_index(int rank) const { return local_index_.at(rank); }
  // The rank of `node` that receives what `sender` sends across to that node: the one with the
  // sender's local index (modulo the node's size), so the senders of a node spread over the gateways.
  int gateway(int node, int sender) const;
  bool same_node(int a, int b) const { return node_of(a) == node_of(b); }
  // "2 nodes (node1: ranks 0-1, node2: ranks 2-3)".
  std::string describe() const;

 private:
  std::vector<int> node_of_rank_ = {0};
  std::vector<int> local_index_ = {0};
  std::vector<std::vector<int>> ranks_of_node_ = {{0}};
  std::vector<std::string> node_names_ = {"local"};
};

// This process's host name (its node of the cluster), "?" when the system does not say.
std::string this_host_name();
// Every rank's host name, gathered (a collective: every rank calls it).
NodeTopology discover_node_topology(Communicator& comm);
// ranks_per_node > 0: the declared topology; 0: discover_node_topology.
NodeTopology node_topology_for_job(Communicator& comm, int ranks_per_node);

}  // namespace epic
