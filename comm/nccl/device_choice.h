// Which CUDA device a rank drives: pure functions over what the launcher and the host say (no CUDA
// here, so every branch is unit-tested on a machine without a GPU). select_device.h applies them.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace epic {

// This rank's place among the ranks of its node.
struct NodeLocalRank {
  int rank = 0;        // 0 .. num_ranks - 1
  int num_ranks = 1;   // ranks of the job on this node
  std::string source;  // where `rank` came from, for messages: "OMPI_COMM_WORLD_LOCAL_RANK", "host names"
};

// The node-local rank from the host names of every rank (index = rank): the ranks on `hosts[rank]`'s
// node in rank order. Always available, and bounded (an all-gather through the host communicator);
// MPI_Comm_split_type(MPI_COMM_TYPE_SHARED) would give the same but is a blocking MPI call no timeout
// can bound.
NodeLocalRank node_local_rank_from_hosts(const std::vector<std::string>& hosts, int rank);

// The launcher's own node-local rank, when it sets one: OMPI_COMM_WORLD_LOCAL_RANK (mpirun), else
// SLURM_LOCALID (srun). It wins over the host names (the launcher may map ranks to nodes in ways a host
// name does not show, e.g. containers with one host name). `lookup` is getenv (a parameter for tests).
// An unparsable value is an error naming the variable. num_ranks stays from `from_hosts`.
NodeLocalRank node_local_rank(const NodeLocalRank& from_hosts,
                              const std::function<const char*(const char*)>& lookup);

// The device index for this rank: `device_override` (--device) when given, else the node-local rank.
// Error(kInvalidArgument) when the override is not a visible device or when the node has more ranks
// than visible devices; Error(kUnsupported) when no device is visible. Messages say how to fix it.
int choose_device(const NodeLocalRank& local, int num_visible_devices, std::optional<int> device_override);

// Two ranks of one NCCL communicator on the same GPU is unsupported (NCCL may hang). device_ids are
// per-rank PCI bus ids (comparable across ranks whatever CUDA_VISIBLE_DEVICES each sees), hosts the
// host names. Throws Error(kInvalidArgument) naming every pair of ranks that share a GPU.
void check_distinct_devices(const std::vector<std::string>& hosts,
                            const std::vector<std::string>& device_ids);

}  // namespace epic
