// The non-virtual parts of Communicator and the choice between MPI and a one-rank communicator.
#include "comm/communicator.h"

#include <mpi.h>

#include <cstdio>
#include <cstdlib>

#include "comm/mpi_communicator.h"
#include "comm/self_communicator.h"

namespace epic {

std::string Communicator::broadcast_bytes(const std::string& data, int root) {
  // Length first so every rank can size its buffer; a string may hold NULs, so never strlen.
  int64_t length = rank() == root ? static_cast<int64_t>(data.size()) : 0;
  broadcast(&length, static_cast<int64_t>(sizeof(length)), root);
  std::string result = rank() == root ? data : std::string(static_cast<size_t>(length), '\0');
  broadcast(result.data(), length, root);
  return result;
}

void Communicator::end_job_after_error(const std::function<void()>& report, int exit_code) {
  end_job(report, exit_code);
  std::fflush(stdout);
  std::fflush(stderr);
  std::_Exit(exit_code);
}

void Communicator::end_job(const std::function<void()>& report, int exit_code) {
  report();
  std::fflush(stdout);
  std::fflush(stderr);
  std::exit(exit_code);
}

bool launched_under_mpi() {
  // OpenMPI's mpirun sets OMPI_COMM_WORLD_SIZE; srun --mpi=pmix and other PMIx launchers set PMIX_RANK;
  // PMI-1/PMI-2 launchers (MPICH's hydra, srun --mpi=pmi2) set PMI_RANK / PMI_SIZE.
  for (const char* variable : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"}) {
    if (std::getenv(variable) != nullptr) return true;
  }
  return false;
}

std::unique_ptr<Communicator> make_communicator(const CommOptions& options) {
  int initialized = 0;
  MPI_Initialized(&initialized);  // legal before MPI_Init
  if (launched_under_mpi() || initialized) return std::make_unique<MpiCommunicator>(options);
  return make_self_communicator();
}

}  // namespace epic
