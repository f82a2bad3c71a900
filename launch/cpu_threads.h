// Threads per rank for the CPU backend: the machine's cores shared among the ranks on this node
// (OMPI_COMM_WORLD_LOCAL_SIZE / SLURM_NTASKS_PER_NODE), so N ranks do not oversubscribe N-fold.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <thread>

namespace epic::cli {

inline int default_cpu_threads() {
  int local_ranks = 1;
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"}) {
    if (const char* value = std::getenv(name)) {
      local_ranks = std::max(1, std::atoi(value));
      break;
    }
  }
  const int cores = std::max(1u, std::thread::hardware_concurrency());
  return std::clamp(cores / local_ranks, 1, 16);
}

}  // namespace epic::cli
