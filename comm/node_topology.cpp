// Node topology from host names or a declared node size.
#include "comm/node_topology.h"

#include <unistd.h>

#include <array>
#include <cstring>
#include <map>

#include "comm/communicator.h"
#include "kernels/error.h"

namespace epic {
namespace {

std::string rank_ranges(const std::vector<int>& ranks) {
  std::string text;
  for (size_t i = 0; i < ranks.size();) {
    size_t j = i;
    while (j + 1 < ranks.size() && ranks[j + 1] == ranks[j] + 1) ++j;
    if (!text.empty()) text += ",";
    text += std::to_string(ranks[i]);
    if (j > i) text += "-" + std::to_string(ranks[j]);
    i = j + 1;
  }
  return text;
}

}  // namespace

NodeTopology NodeTopology::from_node_names(const std::vector<std::string>& names) {
  if (names.empty()) throw Error(ErrorCode::kInternal, "node topology: no ranks");
  NodeTopology topology;
  topology.node_of_rank_.assign(names.size(), 0);
  topology.local_index_.assign(names.size(), 0);
  topology.ranks_of_node_.clear();
  topology.node_names_.clear();
  std::map<std::string, int> node_by_name;
  for (size_t rank = 0; rank < names.size(); ++rank) {
    auto [it, added] = node_by_name.emplace(names[rank], static_cast<int>(topology.node_names_.size()));
    if (added) {
      topology.node_names_.push_back(names[rank]);
      topology.ranks_of_node_.emplace_back();
    }
    const int node = it->second;
    topology.node_of_rank_[rank] = node;
    topology.local_index_[rank] = static_cast<int>(topology.ranks_of_node_[node].size());
    topology.ranks_of_node_[node].push_back(static_cast<int>(rank));
  }
  return topology;
}

NodeTopology NodeTopology::from_ranks_per_node(int world_size, int ranks_per_node) {
  if (world_size < 1 || ranks_per_node < 1)
    throw Error(ErrorCode::kInvalidArgument, "ranks per node must be at least 1 (got " +
                                                 std::to_string(ranks_per_node) + " for " +
                                                 std::to_string(world_size) + " ranks)");
  std::vector<std::string> names(world_size);
  for (int rank = 0; rank < world_size; ++rank) names[rank] = "node" + std::to_string(rank / ranks_per_node);
  return from_node_names(names);
}

int NodeTopology::gateway(int node, int sender) const {
  const std::vector<int>& ranks = ranks_of(node);
  return ranks[static_cast<size_t>(local_index(sender)) % ranks.size()];
}

std::string NodeTopology::describe() const {
  std::string text = std::to_string(num_nodes()) + (num_nodes() == 1 ? " node (" : " nodes (");
  for (int node = 0; node < num_nodes(); ++node) {
    if (node) text += ", ";
    const std::vector<int>& ranks = ranks_of_node_[node];
    text += node_names_[node] + ": rank" + (ranks.size() == 1 ? " " : "s ") + rank_ranges(ranks);
  }
  return text + ")";
}

std::string this_host_name() {
  std::array<char, 256> name{};
  if (gethostname(name.data(), name.size() - 1) != 0 || name[0] == '\0') return "?";
  return name.data();
}

NodeTopology discover_node_topology(Communicator& comm) {
  std::array<char, 256> name{};  // fixed size for the all-gather; the name fits (gethostname's own bound)
  const std::string host = this_host_name();
  std::strncpy(name.data(), host.c_str(), name.size() - 1);
  std::vector<char> all(name.size() * static_cast<size_t>(comm.size()));
  comm.all_gather(name.data(), static_cast<int64_t>(name.size()), all.data());
  std::vector<std::string> names(comm.size());
  for (int rank = 0; rank < comm.size(); ++rank) names[rank] = std::string(all.data() + rank * name.size());
  return NodeTopology::from_node_names(names);
}

NodeTopology node_topology_for_job(Communicator& comm, int ranks_per_node) {
  if (ranks_per_node > 0) return NodeTopology::from_ranks_per_node(comm.size(), ranks_per_node);
  return discover_node_topology(comm);
}

}  // namespace epic
